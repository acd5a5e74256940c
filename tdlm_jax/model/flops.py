"""Model FLOPs of the denoiser, by the usual accounting (Kaplan et al. 2020; PaLM, appendix B).

A training step costs 6·N FLOPs per token for the weight matmuls (2·N forward, 4·N
backward: the gradients with respect to activations and to weights), plus the attention
scores q·kᵀ and the weighted values p·v, which have no parameters: 4·seq·d_model FLOPs per
token and layer forward, 12·seq·d_model with the backward pass. The denoiser's attention is
bidirectional, so that is its count. The autoregressive baseline (`cfg.causal`) needs only
the score pairs at or before each query, and its attention term is halved (2·seq·d_model
forward, 6·seq·d_model with the backward pass): those pairs are (seq + 1)/(2·seq) of the
matrix, which the count rounds to 1/2, as FlashAttention's benchmarks do. cuDNN, told
`is_causal`, skips the masked tiles; the XLA path computes the full score matrix and masks
it, so there the hardware does twice the attention FLOPs that are counted.

What N counts (`matmul_params`): every weight that multiplies each token's activations once:
per layer the fused q/k/v projection (3·d²), the output projection (d²) and the SwiGLU
gate, up and down projections (3·d·mlp_dim), plus the output head (d·vocab_size, all ids,
including the [MASK] and [PAD] logits that are computed and then set to −inf). Not counted:
the embedding (a gather, not a matmul), RMSNorm gains (elementwise), and the optional
time-conditioning projection, which runs once per sequence, not once per token; its
2·d² FLOPs per sequence appear here divided over the sequence. Elementwise work (norms,
RoPE, softmax, SiLU, the loss, the optimizer) is left out, as the convention does: it is why
XLA's own count of a forward pass comes out a few percent above `forward_flops_per_token`.
"""

from __future__ import annotations

from tdlm_jax.model.transformer import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
    """N: the parameters used in a matmul once per token (blocks and output head)."""
    per_layer = 4 * cfg.d_model * cfg.d_model + 3 * cfg.d_model * cfg.mlp_dim
    return cfg.num_layers * per_layer + cfg.d_model * cfg.vocab_size


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs per token of q·kᵀ and p·v over all layers: 2·2·seq·d_model per layer,
    half that (2·seq·d_model) for the causal baseline."""
    per_layer = 4 * seq_len * cfg.d_model
    return cfg.num_layers * (per_layer // 2 if cfg.causal else per_layer)


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one forward pass, per token: 2·N + attention (+ time conditioning)."""
    flops = 2 * matmul_params(cfg) + attention_flops_per_token(cfg, seq_len)
    if cfg.time_conditioning:
        flops += 2 * cfg.d_model * cfg.d_model / seq_len  # once per sequence
    return float(flops)


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one training step, per token: 3× the forward pass, i.e.
    6·N + 12·layers·seq·d_model (6·layers·seq·d_model if causal) (+ time conditioning)."""
    return 3.0 * forward_flops_per_token(cfg, seq_len)


def mfu(flops_per_token: float, tokens_per_second: float, peak_flops_per_second: float) -> float:
    """Model FLOPs utilization: achieved model FLOP/s as a fraction of the peak."""
    if peak_flops_per_second <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak_flops_per_second}")
    return flops_per_token * tokens_per_second / peak_flops_per_second
