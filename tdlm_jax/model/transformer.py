"""The denoiser: a bidirectional pre-norm transformer in Flax NNX.

RoPE, RMSNorm and SwiGLU, as in LLaDA. Parameters are float32; `dtype` sets the compute
dtype (bfloat16 for speed), and logits are always returned in float32. Attention is
bidirectional and never attends to padding keys.

For the tier-3 (advanced) metrics the denoiser can also return its internals
(`attention_summary=`): the final hidden states and a summary of every layer's attention
probabilities, reduced inside the layer loop. That path computes attention explicitly, with
the same arithmetic as the fused `jax.nn.dot_product_attention`, so it changes what is
returned, not the logits. Training never takes the whole logits: `Denoiser.scores` gives
what the losses and metrics need of them, chunk by chunk (`tdlm_jax.model.head`).

The [MASK] and [PAD] ids are never predicted: their logits are −inf (MDLM's SUBS
parameterization), so the model's distribution is over the `num_predictable` text ids only.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from tdlm_jax.errors import ConfigError
from tdlm_jax.model.head import TokenScores, chunked_scores


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
    attention_impl: str = "auto"  # 'auto', 'xla' or 'cudnn' (see resolve_attention_impl)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


def rotary_embedding(x_TxNxH: jax.Array, length: int, base: float) -> jax.Array:
    """Rotates query/key channel pairs by position-dependent angles (RoPE, rotate-half form);
    `x_TxNxH` holds the B·L tokens of rows of `length`, so token i is at position i mod length."""
    head_dim = x_TxNxH.shape[-1]
    inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    positions_T = jnp.arange(x_TxNxH.shape[0]) % length
    angles_TxH2 = positions_T.astype(jnp.float32)[:, None] * inv_freq[None, :]
    sin, cos = jnp.sin(angles_TxH2)[:, None, :], jnp.cos(angles_TxH2)[:, None, :]
    x1, x2 = jnp.split(x_TxNxH.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_TxNxH.dtype)


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


def cudnn_attention_args(valid_BxL: jax.Array, causal: bool) -> dict[str, Any]:
    """The keyword arguments of `jax.nn.dot_product_attention` with which cuDNN attends as
    `attention_mask(valid_BxL, causal)` allows, at every valid query: no bias and no mask,
    but each row's valid-token count as `query_seq_lengths` and `key_value_seq_lengths`
    (int32[B]), and `is_causal` for the autoregressive baseline.

    jax then asks cuDNN for its PADDING (or PADDING_CAUSAL) mask, which the kernel builds
    itself: there is no dense [B, 1, L, L] bias to read, so no dbias to compute in the
    backward pass, and the kernel skips the tiles past a row's length or above the diagonal.

    Correct only because padding is a suffix of every row (`valid_BxL` a prefix), which is
    how the data is laid out: `data.pipeline` pads only the end of a window and fills
    evaluation batches with whole rows of padding; the autoregressive baseline shifts that
    right behind a leading True (still a prefix); the samplers pass all True. A mask with
    holes would be read as its count of True entries: it needs the XLA path.

    Queries past a row's length get output 0 rather than the XLA path's attention over the
    valid keys; nothing reads them (no valid query attends to a padding key, and the losses
    and metrics skip padding positions). Lengths are at least 1: a row that is all padding
    would otherwise leave cuDNN a softmax over no key, whose result jax does not define; with
    1, its first position attends to itself and every value stays finite (and unread).
    """
    lengths_B = jnp.maximum(valid_BxL.sum(axis=-1, dtype=jnp.int32), 1)
    return {"query_seq_lengths": lengths_B, "key_value_seq_lengths": lengths_B, "is_causal": causal}


def explicit_attention(q_BxLxNxH: jax.Array, k_BxLxNxH: jax.Array, v_BxLxNxH: jax.Array,
                       mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Attention over the keys `mask` allows, written out so the probabilities are visible.

    The arithmetic of the XLA path of `jax.nn.dot_product_attention`: float32 scores
    q·kᵀ/√head_dim, padding keys set to a large negative *finite* value (not −inf, so that a
    row with no valid key is uniform rather than NaN, as in the fused path), softmax in
    float32, and probs cast to the value dtype for probs·v. The heads are moved in front of
    the sequence and merged with the batch first, [B·N, L, H]: on CPU, XLA runs the two
    batched matmuls faster this way than in the [B, L, N, H] layout the fused path keeps, and with
    B = 1 (tier 2's per-row gradients) no array has a dimension of size 1, on which XLA:CPU's
    fusions run about 10× slower (`Denoiser.residual_stream`). Returns (output [B, L, N, H],
    probs float32[B, N, queries, keys]).
    """
    batch, length, heads, head_dim = q_BxLxNxH.shape
    q_XxLxH, k_XxLxH, v_XxLxH = (x.transpose(0, 2, 1, 3).reshape(batch * heads, length, head_dim)
                                 for x in (q_BxLxNxH, k_BxLxNxH, v_BxLxNxH))
    # The mask per (row, head): Q is 1 (padding keys only) or L (the causal mask too).
    mask_XxQxL = jnp.broadcast_to(mask, (batch, heads, *mask.shape[2:])).reshape(batch * heads, *mask.shape[2:])
    scores_XxLxL = jnp.einsum("xqh,xkh->xqk", q_XxLxH, k_XxLxH, preferred_element_type=jnp.float32)
    scores_XxLxL = scores_XxLxL * jnp.float32(1.0 / math.sqrt(head_dim))
    large_negative = jnp.float32(-0.7 * float(jnp.finfo(jnp.float32).max))
    scores_XxLxL = jnp.where(mask_XxQxL, scores_XxLxL, large_negative)
    probs_XxLxL = jax.nn.softmax(scores_XxLxL, axis=-1)
    out_XxLxH = jnp.einsum("xqk,xkh->xqh", probs_XxLxL.astype(v_BxLxNxH.dtype), v_XxLxH)
    out_BxLxNxH = out_XxLxH.reshape(batch, heads, length, head_dim).transpose(0, 2, 1, 3)
    return out_BxLxNxH, probs_XxLxL.reshape(batch, heads, length, length)


ATTENTION_IMPLS = ("auto", "xla", "cudnn")


def cudnn_unsupported(dtype: str, head_dim: int, seq_len: int, device: jax.Device) -> str | None:
    """Why cuDNN's fused attention cannot run these shapes on `device`, or None if it can.

    The limits are those `jax.nn.dot_product_attention(implementation='cudnn')` checks:
    an NVIDIA GPU, bf16 or fp16 inputs, a head dim that is a multiple of 8 and at most 128
    (256 from Hopper, compute capability 9.0, on). `seq_len` sets no limit: jax requires an
    even sequence length for the backward pass only with a bias, and the padding reaches
    cuDNN as sequence lengths (`cudnn_attention_args`), not as a bias.
    """
    if device.platform != "gpu" or "cuda" not in str(getattr(device.client, "platform_version", "")).lower():
        return f"needs an NVIDIA GPU, not {device.platform} ({device.device_kind})"
    if dtype not in ("bfloat16", "float16"):
        return f"needs model.dtype='bfloat16', not {dtype!r}"
    capability = tuple(int(x) for x in str(getattr(device, "compute_capability", "0.0")).split(".")[:2])
    max_head_dim = 256 if capability >= (9, 0) else 128
    if head_dim % 8 or head_dim > max_head_dim:
        return f"needs a head dim (d_model / num_heads) that is a multiple of 8, at most {max_head_dim}: not {head_dim}"
    return None


def resolve_attention_impl(requested: str, dtype: str, head_dim: int, seq_len: int,
                           device: jax.Device | None = None) -> str:
    """The kernel `model.attention_impl` runs on `device` (default: the first device): 'xla' or 'cudnn'.

    'auto' takes cuDNN's fused flash attention wherever it applies (`cudnn_unsupported`)
    and the XLA path elsewhere (CPU, TPU, float32). Raises ConfigError if 'cudnn' is
    requested where it does not apply, or the name is unknown.
    """
    if requested not in ATTENTION_IMPLS:
        raise ConfigError(f"config error: model.attention_impl={requested!r}: "
                          f"must be one of {', '.join(ATTENTION_IMPLS)}")
    if requested == "xla":
        return "xla"
    reason = cudnn_unsupported(dtype, head_dim, seq_len, device or jax.devices()[0])
    if requested == "cudnn" and reason:
        raise ConfigError(f"config error: model.attention_impl='cudnn' {reason}: use 'auto' or 'xla'")
    return "xla" if reason else "cudnn"


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.qkv = _linear(cfg.d_model, 3 * cfg.d_model, cfg, rngs)
        # Residual-branch outputs start small so that deep stacks begin near identity.
        self.out = _linear(cfg.d_model, cfg.d_model, cfg, rngs, scale=1.0 / (2 * cfg.num_layers))

    def __call__(self, x_TxD: jax.Array, valid_BxL: jax.Array, *, return_probs: bool = False
                 ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """The attention output [B·L, D]; with `return_probs`, also float32 probs [B, N, L, L].

        The kernel is `resolve_attention_impl(cfg.attention_impl, ...)`: the XLA path is
        `explicit_attention`, whose probabilities XLA drops unless they are returned; the
        cuDNN kernel never builds them, so `return_probs` always takes the explicit path.
        """
        batch, length = valid_BxL.shape
        cfg = self.cfg
        qkv_Tx3xNxH = self.qkv(x_TxD).reshape(batch * length, 3, cfg.num_heads, cfg.head_dim)
        q, k = (rotary_embedding(qkv_Tx3xNxH[:, i], length, cfg.rope_base) for i in (0, 1))
        q, k, v = (x.reshape(batch, length, cfg.num_heads, cfg.head_dim) for x in (q, k, qkv_Tx3xNxH[:, 2]))
        impl = resolve_attention_impl(cfg.attention_impl, cfg.dtype, cfg.head_dim, length)
        if return_probs or impl == "xla":
            out_BxLxNxH, probs_BxNxLxL = explicit_attention(q, k, v, attention_mask(valid_BxL, cfg.causal))
        else:  # cuDNN builds the padding (and causal) mask itself from sequence lengths
            out_BxLxNxH = jax.nn.dot_product_attention(q, k, v, **cudnn_attention_args(valid_BxL, cfg.causal),
                                                       implementation="cudnn")
        out_TxD = self.out(out_BxLxNxH.reshape(batch * length, cfg.d_model))
        return (out_TxD, probs_BxNxLxL) if return_probs else out_TxD


class SwiGLU(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.gate = _linear(cfg.d_model, cfg.mlp_dim, cfg, rngs)
        self.up = _linear(cfg.d_model, cfg.mlp_dim, cfg, rngs)
        self.down = _linear(cfg.mlp_dim, cfg.d_model, cfg, rngs, scale=1.0 / (2 * cfg.num_layers))

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        # On [B·L, D]: on CPU, XLA computes the weight gradients of dots over a [B, L, D] input
        # through transposing copies that cost more than the dots themselves (docs/performance.md).
        x_TxD = x_BxLxD.reshape(-1, x_BxLxD.shape[-1])
        return self.down(jax.nn.silu(self.gate(x_TxD)) * self.up(x_TxD)).reshape(x_BxLxD.shape)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = nnx.RMSNorm(cfg.d_model, dtype=cfg.dtype, rngs=rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = nnx.RMSNorm(cfg.d_model, dtype=cfg.dtype, rngs=rngs)
        self.mlp = SwiGLU(cfg, rngs)

    def __call__(self, x_TxD: jax.Array, valid_BxL: jax.Array, *, return_probs: bool = False
                 ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """The block's output [B·L, D]; with `return_probs`, also its attention probs [B, N, L, L]."""
        if return_probs:
            attn_out, probs_BxNxLxL = self.attn(self.attn_norm(x_TxD), valid_BxL, return_probs=True)
        else:
            attn_out = self.attn(self.attn_norm(x_TxD), valid_BxL)
        x_TxD = x_TxD + attn_out
        x_TxD = x_TxD + self.mlp(self.mlp_norm(x_TxD))
        return (x_TxD, probs_BxNxLxL) if return_probs else x_TxD


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

    def embed_tokens(self, ids: jax.Array) -> jax.Array:
        """The embeddings of `ids` (any shape) in the compute dtype, gathered from the float32 table
        and then cast (`nnx.Embed` casts the whole table first, so its gradient, a scatter-add
        of tens of thousands of [MASK] rows per step, would be summed in bf16)."""
        return jnp.take(self.embed.embedding[...], ids, axis=0).astype(self.cfg.dtype)

    def residual_stream(self, noisy_BxL: jax.Array, valid_BxL: jax.Array, t_B: jax.Array | None = None, *,
                        attention_summary: Callable[[jax.Array], Any] | None = None) -> tuple[jax.Array, Any]:
        """(The residual stream after the last block [B, L, D] in the compute dtype, None), or
        with `attention_summary`, a function of one layer's float32 attention probabilities
        [B, heads, queries, keys] (padding keys get probability 0), (stream, its values for
        every layer stacked on a leading axis). Each layer's probabilities are reduced inside
        the layer loop, so no more than one layer's [B, heads, L, L] is ever built.

        Inside, the stream is [B·L, D] (tokens × features), never [B, L, D]: on CPU, XLA
        computes the weight gradient of a dot over a [B, L, D] input through a transposing
        copy that costs more than the dot, and its YNNPACK fusions run about 10× slower on
        arrays with a dimension of size 1, which is what B is where tier 2 takes every row's
        gradient on its own (`metrics.research.per_row_bucket_gradients`)."""
        batch, length = noisy_BxL.shape
        x = self.embed_tokens(noisy_BxL.reshape(batch * length))
        if self.time_proj is not None:
            time_BxD = self.time_proj(timestep_embedding(t_B, self.cfg.d_model).astype(x.dtype))
            x = x + jnp.repeat(time_BxD, length, axis=0)  # row b's time at its L tokens
        summaries = []
        run_block = _rematerialized(self.cfg.remat_policy) if self.cfg.remat else _call_block
        for block in self.blocks:
            if attention_summary is not None:
                x, probs_BxNxLxL = block(x, valid_BxL, return_probs=True)
                summaries.append(attention_summary(probs_BxNxLxL))
            else:
                x = run_block(block, x, valid_BxL)
        x = x.reshape(batch, length, -1)
        if attention_summary is None:
            return x, None
        return x, jax.tree.map(lambda *layers: jnp.stack(layers), *summaries)

    def __call__(self, noisy_BxL: jax.Array, valid_BxL: jax.Array, t_B: jax.Array | None = None, *,
                 attention_summary: Callable[[jax.Array], Any] | None = None
                 ) -> jax.Array | tuple[jax.Array, dict[str, Any]]:
        """Returns float32 logits [B, L, vocab_size], −inf at ids that are never predicted.

        With `attention_summary` (see `residual_stream`), returns (logits, internals), where
        internals holds
        - "hidden_BxLxD": the residual stream after the last block, *before* the final
          RMSNorm, float32. Pre-norm, because the norm rescales every position to RMS ≈ 1
          (times a learned gain), which would hide exactly the growth and collapse of
          the representations that the advanced metrics are meant to show.
        - "attention_by_layer": `attention_summary` of every layer's attention probabilities,
          stacked [layers, ...] (`lambda p: p` gives all of them, [layers, B, heads, L, L]).
        The logits are the same as without internals (up to float rounding).
        """
        x, by_layer = self.residual_stream(noisy_BxL, valid_BxL, t_B, attention_summary=attention_summary)
        logits = self.head(self.final_norm(x)).astype(jnp.float32)
        predictable_V = jnp.arange(self.cfg.vocab_size) < self.cfg.num_predictable
        logits = jnp.where(predictable_V, logits, -jnp.inf)
        if attention_summary is None:
            return logits
        return logits, {"hidden_BxLxD": x.astype(jnp.float32), "attention_by_layer": by_layer}

    def scores(self, noisy_BxL: jax.Array, valid_BxL: jax.Array, t_B: jax.Array | None, targets_BxL: jax.Array
               ) -> TokenScores:
        """What training needs of the logits at every position, against `targets_BxL`
        (predictable ids everywhere), computed by `head.chunked_scores`: the same values as
        `scores_from_logits(self(...), targets)`, without holding the whole logits."""
        x, _ = self.residual_stream(noisy_BxL, valid_BxL, t_B)
        normed = self.final_norm(x.reshape(-1, x.shape[-1])).reshape(x.shape)  # on [B·L, D], as the blocks
        return chunked_scores(normed, self.head.kernel[...], targets_BxL, self.cfg.num_predictable)


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
