"""The denoiser: a bidirectional pre-norm transformer in Flax NNX.

RoPE, RMSNorm and SwiGLU, as in LLaDA. Parameters are float32; `dtype` sets the compute
dtype (bfloat16 for speed), and logits are always returned in float32. Attention is
bidirectional and never attends to padding keys.

For the tier-3 (advanced) metrics the denoiser can also return its internals
(`return_internals=True`): the final hidden states and every layer's attention
probabilities. That path computes attention explicitly, with the same arithmetic as the
fused `jax.nn.dot_product_attention`, so it changes what is returned, not the logits.

The [MASK] and [PAD] ids are never predicted: their logits are −inf (MDLM's SUBS
parameterization), so the model's distribution is over the `num_predictable` text ids only.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static shape and precision of the denoiser."""

    vocab_size: int  # input ids, including [MASK] and [PAD]
    num_predictable: int  # ids [0, num_predictable) are the only ones the model predicts
    d_model: int = 128
    num_heads: int = 4
    num_layers: int = 4
    mlp_dim: int = 512
    dtype: str = "float32"
    time_conditioning: bool = False
    rope_base: float = 10_000.0
    causal: bool = False  # True for the autoregressive baseline
    remat: bool = False  # recompute each block's activations in the backward pass (saves memory)
    remat_policy: str = "nothing_saveable"  # what a rematerialized block keeps: a jax.checkpoint_policies name

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


def rotary_embedding(x_BxLxNxH: jax.Array, base: float) -> jax.Array:
    """Rotates query/key channel pairs by position-dependent angles (RoPE, rotate-half form)."""
    length, head_dim = x_BxLxNxH.shape[1], x_BxLxNxH.shape[-1]
    inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles_LxH2 = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    sin = jnp.sin(angles_LxH2)[None, :, None, :]
    cos = jnp.cos(angles_LxH2)[None, :, None, :]
    x1, x2 = jnp.split(x_BxLxNxH.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BxLxNxH.dtype)


def timestep_embedding(t_B: jax.Array, dim: int) -> jax.Array:
    """Sinusoidal features of the diffusion time, for optional time conditioning."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10_000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    args = 1000.0 * t_B[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


def _linear(d_in: int, d_out: int, cfg: ModelConfig, rngs: nnx.Rngs, scale: float = 1.0,
            float32_output: bool = False) -> nnx.Linear:
    """A bias-free projection with float32 parameters computing in `cfg.dtype`; with
    `float32_output` its products are accumulated and returned in float32 (the output head:
    the loss and softmax over the vocabulary must see float32 logits, not rounded bf16 ones)."""
    init = nnx.initializers.variance_scaling(scale, "fan_in", "truncated_normal")
    return nnx.Linear(d_in, d_out, use_bias=False, kernel_init=init, dtype=cfg.dtype, param_dtype=jnp.float32,
                      preferred_element_type=jnp.float32 if float32_output else None, rngs=rngs)


def attention_mask(valid_BxL: jax.Array, causal: bool) -> jax.Array:
    """Which keys each query may attend to, bool [B, 1, 1 or queries, keys]: valid keys, and
    for the autoregressive baseline only keys at or before the query."""
    mask = valid_BxL[:, None, None, :]
    if causal:
        length = valid_BxL.shape[1]
        mask = mask & jnp.tril(jnp.ones((length, length), bool))[None, None]
    return mask


def explicit_attention(q_BxLxNxH: jax.Array, k_BxLxNxH: jax.Array, v_BxLxNxH: jax.Array,
                       mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Attention over the keys `mask` allows, written out so the probabilities are visible.

    Mirrors the XLA path of `jax.nn.dot_product_attention`: float32 scores q·kᵀ/√head_dim,
    padding keys set to a large negative *finite* value (not −inf, so that a row with no
    valid key is uniform rather than NaN, as in the fused path), softmax in float32, and
    probs cast to the value dtype for probs·v. Returns (output [B, L, N, H], probs
    float32[B, N, queries, keys]).
    """
    scores_BxNxLxL = jnp.einsum("bqnh,bknh->bnqk", q_BxLxNxH, k_BxLxNxH, preferred_element_type=jnp.float32)
    scores_BxNxLxL = scores_BxNxLxL * jnp.float32(1.0 / math.sqrt(q_BxLxNxH.shape[-1]))
    large_negative = jnp.float32(-0.7 * float(jnp.finfo(jnp.float32).max))
    scores_BxNxLxL = jnp.where(mask, scores_BxNxLxL, large_negative)
    probs_BxNxLxL = jax.nn.softmax(scores_BxNxLxL, axis=-1)
    out_BxLxNxH = jnp.einsum("bnqk,bknh->bqnh", probs_BxNxLxL.astype(v_BxLxNxH.dtype), v_BxLxNxH)
    return out_BxLxNxH, probs_BxNxLxL


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.qkv = _linear(cfg.d_model, 3 * cfg.d_model, cfg, rngs)
        # Residual-branch outputs start small so that deep stacks begin near identity.
        self.out = _linear(cfg.d_model, cfg.d_model, cfg, rngs, scale=1.0 / (2 * cfg.num_layers))

    def __call__(self, x_BxLxD: jax.Array, valid_BxL: jax.Array, *, return_probs: bool = False
                 ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """The attention output [B, L, D]; with `return_probs`, also float32 probs [B, N, L, L].

        Only the `return_probs` path materializes the [B, N, L, L] probabilities; training
        keeps the fused kernel, which may never build them.
        """
        batch, length, _ = x_BxLxD.shape
        cfg = self.cfg
        qkv = self.qkv(x_BxLxD).reshape(batch, length, 3, cfg.num_heads, cfg.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, k = rotary_embedding(q, cfg.rope_base), rotary_embedding(k, cfg.rope_base)
        mask = attention_mask(valid_BxL, cfg.causal)
        if return_probs:
            out_BxLxNxH, probs_BxNxLxL = explicit_attention(q, k, v, mask)
            return self.out(out_BxLxNxH.reshape(batch, length, cfg.d_model)), probs_BxNxLxL
        out_BxLxNxH = jax.nn.dot_product_attention(q, k, v, mask=mask)
        return self.out(out_BxLxNxH.reshape(batch, length, cfg.d_model))


class SwiGLU(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.gate = _linear(cfg.d_model, cfg.mlp_dim, cfg, rngs)
        self.up = _linear(cfg.d_model, cfg.mlp_dim, cfg, rngs)
        self.down = _linear(cfg.mlp_dim, cfg.d_model, cfg, rngs, scale=1.0 / (2 * cfg.num_layers))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = nnx.RMSNorm(cfg.d_model, dtype=cfg.dtype, rngs=rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = nnx.RMSNorm(cfg.d_model, dtype=cfg.dtype, rngs=rngs)
        self.mlp = SwiGLU(cfg, rngs)

    def __call__(self, x: jax.Array, valid_BxL: jax.Array, *, return_probs: bool = False
                 ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """The block's output; with `return_probs`, also its attention probs [B, N, L, L]."""
        if return_probs:
            attn_out, probs_BxNxLxL = self.attn(self.attn_norm(x), valid_BxL, return_probs=True)
        else:
            attn_out = self.attn(self.attn_norm(x), valid_BxL)
        x = x + attn_out
        x = x + self.mlp(self.mlp_norm(x))
        return (x, probs_BxNxLxL) if return_probs else x


class Denoiser(nnx.Module):
    """Maps a partially masked sequence to logits over the clean tokens at every position."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=jnp.float32,
                               embedding_init=nnx.initializers.normal(1.0), rngs=rngs)
        self.time_proj = _linear(cfg.d_model, cfg.d_model, cfg, rngs) if cfg.time_conditioning else None
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
        self.final_norm = nnx.RMSNorm(cfg.d_model, dtype=cfg.dtype, rngs=rngs)
        self.head = _linear(cfg.d_model, cfg.vocab_size, cfg, rngs, float32_output=True)

    def __call__(self, noisy_BxL: jax.Array, valid_BxL: jax.Array, t_B: jax.Array | None = None, *,
                 return_internals: bool = False) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
        """Returns float32 logits [B, L, vocab_size], −inf at ids that are never predicted.

        With `return_internals`, returns (logits, internals), where internals holds
        - "hidden_BxLxD": the residual stream after the last block, *before* the final
          RMSNorm, float32. Pre-norm, because the norm rescales every position to RMS ≈ 1
          (times a learned gain), which would hide exactly the growth and collapse of
          the representations that the advanced metrics are meant to show.
        - "attention_probs_KxBxNxLxL": every layer's attention probabilities, float32
          [layers, B, heads, queries, keys]; padding keys get probability 0.
        The logits are the same as without internals (up to float rounding).
        """
        x = self.embed(noisy_BxL)
        if self.time_proj is not None:
            x = x + self.time_proj(timestep_embedding(t_B, self.cfg.d_model).astype(x.dtype))[:, None, :]
        probs_by_layer = []
        run_block = _rematerialized(self.cfg.remat_policy) if self.cfg.remat else _call_block
        for block in self.blocks:
            if return_internals:
                x, probs_BxNxLxL = block(x, valid_BxL, return_probs=True)
                probs_by_layer.append(probs_BxNxLxL)
            else:
                x = run_block(block, x, valid_BxL)
        logits = self.head(self.final_norm(x)).astype(jnp.float32)
        predictable_V = jnp.arange(self.cfg.vocab_size) < self.cfg.num_predictable
        logits = jnp.where(predictable_V, logits, -jnp.inf)
        if not return_internals:
            return logits
        internals = {
            "hidden_BxLxD": x.astype(jnp.float32),
            "attention_probs_KxBxNxLxL": jnp.stack(probs_by_layer),
        }
        return logits, internals


REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable", "everything_saveable")


def _call_block(block: Block, x: jax.Array, valid_BxL: jax.Array) -> jax.Array:
    return block(x, valid_BxL)


def _rematerialized(policy: str):
    """`_call_block` under `nnx.remat`: the block's intermediates are not stored for the
    backward pass but recomputed from its input, except what `policy` saves (e.g.
    'dots_saveable' keeps matmul outputs and recomputes only the cheap elementwise ops)."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}; allowed: {', '.join(REMAT_POLICIES)}")
    return nnx.remat(_call_block, policy=getattr(jax.checkpoint_policies, policy))
