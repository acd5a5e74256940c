"""The autoregressive baseline's objective: next-token prediction with the same transformer.

The model reads the sequence shifted right by one with [MASK] as the start token (an id the
data never contains) under a causal mask, and predicts every valid token from the ones
before it, the first included. Its loss is the exact NLL per valid token, so it compares
directly with the diffusion NELBO per token: same data, tokenizer, batch and denoiser; only
the objective differs.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tdlm_jax.model.head import TokenScores


def shift_right(x_BxL: jax.Array, first: Any) -> jax.Array:
    """[first, x_0, ..., x_{L-2}]: position i sees what precedes token i."""
    return jnp.concatenate([jnp.full_like(x_BxL[:, :1], first), x_BxL[:, :-1]], axis=1)


def next_token_logits(model: Callable, tokens_BxL: jax.Array, valid_BxL: jax.Array, start_id: int) -> jax.Array:
    """Logits whose position i predicts token i, from tokens < i."""
    return model(shift_right(tokens_BxL, start_id), shift_right(valid_BxL, True), None)


def token_nll(graphdef: nnx.GraphDef, params: Any, tokens_BxL: jax.Array, valid_BxL: jax.Array,
              start_id: int) -> tuple[jax.Array, TokenScores]:
    """(−log p(token | tokens before it) at valid positions, 0 elsewhere; the model's scores),
    computed without holding the whole logits (`Denoiser.scores`)."""
    model = nnx.merge(graphdef, params)
    scores = model.scores(shift_right(tokens_BxL, start_id), shift_right(valid_BxL, True), None,
                          jnp.where(valid_BxL, tokens_BxL, 0))
    return jnp.where(valid_BxL, scores.nll_BxL, 0.0), scores


def row_losses(graphdef: nnx.GraphDef, params: Any, tokens_BxL: jax.Array, valid_BxL: jax.Array,
               start_id: int, num_valid: jax.Array | None = None) -> tuple[jax.Array, TokenScores]:
    """Each row's NLL, summed over its valid tokens and divided by the batch's valid tokens
    (`num_valid`, passed in when these rows are a microbatch of a larger batch)."""
    nll_BxL, scores = token_nll(graphdef, params, tokens_BxL, valid_BxL, start_id)
    if num_valid is None:
        num_valid = jnp.maximum(valid_BxL.sum(), 1).astype(jnp.float32)
    return nll_BxL.sum(axis=-1) / num_valid, scores


def nll_float64(logits_BxLxV: np.ndarray, tokens_BxL: np.ndarray, valid_BxL: np.ndarray) -> np.ndarray:
    """Per-sequence NLL (nats) in float64 on the host, from float32 logits.

    Generative perplexity is a small difference of large sums over many tokens; float32
    log-softmax and summation visibly bias it (a known reproduction problem), float64 not.
    """
    logits = np.asarray(logits_BxLxV, np.float64)
    top = logits.max(axis=-1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))
    picked = np.take_along_axis(log_probs, np.asarray(tokens_BxL)[..., None], axis=-1)[..., 0]
    return -np.where(valid_BxL, picked, 0.0).sum(axis=-1)


def generative_perplexity(ar_model: Callable, tokens_NxL: np.ndarray, start_id: int, batch_size: int = 32
                          ) -> dict[str, float]:
    """How likely a trained AR model finds generated samples, and how diverse they are.

    `gen/perplexity` = exp(total NLL / total tokens), summed in float64. Low perplexity alone
    rewards repetitive text, so `gen/unigram_entropy` (nats, of the samples' token
    frequencies, also float64) comes with it: a collapse to a few frequent tokens shows
    there as a low entropy.
    """
    tokens_NxL = np.asarray(tokens_NxL)
    valid_NxL = np.ones_like(tokens_NxL, bool)
    logits_fn = jax.jit(lambda t, v: next_token_logits(ar_model, t, v, start_id))
    nll = np.concatenate([
        nll_float64(jax.device_get(logits_fn(tokens_NxL[i:i + batch_size], valid_NxL[i:i + batch_size])),
                    tokens_NxL[i:i + batch_size], valid_NxL[i:i + batch_size])
        for i in range(0, len(tokens_NxL), batch_size)])
    counts = np.bincount(tokens_NxL.ravel()).astype(np.float64)
    freqs = counts[counts > 0] / counts.sum()
    return {"gen/perplexity": float(np.exp(nll.sum() / tokens_NxL.size)),
            "gen/nll_per_token": float(nll.sum() / tokens_NxL.size),
            "gen/unigram_entropy": float(-(freqs * np.log(freqs)).sum()),
            "gen/num_samples": int(len(tokens_NxL))}
