"""The denoiser: a bidirectional pre-norm transformer in Flax NNX.

RoPE, RMSNorm and SwiGLU, as in LLaDA. Parameters are float32; `dtype` sets the compute
dtype (bfloat16 for speed), and logits are always returned in float32. Attention is
bidirectional and never attends to padding keys.

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


def _linear(d_in: int, d_out: int, cfg: ModelConfig, rngs: nnx.Rngs, scale: float = 1.0) -> nnx.Linear:
    init = nnx.initializers.variance_scaling(scale, "fan_in", "truncated_normal")
    return nnx.Linear(d_in, d_out, use_bias=False, kernel_init=init, dtype=cfg.dtype,
                      param_dtype=jnp.float32, rngs=rngs)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.qkv = _linear(cfg.d_model, 3 * cfg.d_model, cfg, rngs)
        # Residual-branch outputs start small so that deep stacks begin near identity.
        self.out = _linear(cfg.d_model, cfg.d_model, cfg, rngs, scale=1.0 / (2 * cfg.num_layers))

    def __call__(self, x_BxLxD: jax.Array, valid_BxL: jax.Array) -> jax.Array:
        batch, length, _ = x_BxLxD.shape
        cfg = self.cfg
        qkv = self.qkv(x_BxLxD).reshape(batch, length, 3, cfg.num_heads, cfg.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, k = rotary_embedding(q, cfg.rope_base), rotary_embedding(k, cfg.rope_base)
        key_mask = valid_BxL[:, None, None, :]  # [B, heads, queries, keys], broadcast
        out_BxLxNxH = jax.nn.dot_product_attention(q, k, v, mask=key_mask)
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

    def __call__(self, x: jax.Array, valid_BxL: jax.Array) -> jax.Array:
        x = x + self.attn(self.attn_norm(x), valid_BxL)
        return x + self.mlp(self.mlp_norm(x))


class Denoiser(nnx.Module):
    """Maps a partially masked sequence to logits over the clean tokens at every position."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=jnp.float32,
                               embedding_init=nnx.initializers.normal(1.0), rngs=rngs)
        self.time_proj = _linear(cfg.d_model, cfg.d_model, cfg, rngs) if cfg.time_conditioning else None
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
        self.final_norm = nnx.RMSNorm(cfg.d_model, dtype=cfg.dtype, rngs=rngs)
        self.head = _linear(cfg.d_model, cfg.vocab_size, cfg, rngs)

    def __call__(self, noisy_BxL: jax.Array, valid_BxL: jax.Array, t_B: jax.Array | None = None) -> jax.Array:
        """Returns float32 logits [B, L, vocab_size], −inf at ids that are never predicted."""
        x = self.embed(noisy_BxL)
        if self.time_proj is not None:
            x = x + self.time_proj(timestep_embedding(t_B, self.cfg.d_model).astype(x.dtype))[:, None, :]
        for block in self.blocks:
            x = block(x, valid_BxL)
        logits = self.head(self.final_norm(x)).astype(jnp.float32)
        predictable_V = jnp.arange(self.cfg.vocab_size) < self.cfg.num_predictable
        return jnp.where(predictable_V, logits, -jnp.inf)
