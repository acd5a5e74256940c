"""The output head scored in chunks: what the losses and metrics need of the logits, without
ever holding all of them.

Every objective and metric of training needs only three numbers per position of the
[positions, vocabulary] logits: −log p(target), the argmax, and log max_v p(v). At
owt_gpt2_small's shapes one float32 [32·1024, 50304] logits tensor is 6.6 GB, and the plain
path keeps two or three of them live at the peak (the logits through the backward pass,
log-softmax's saved exp, their gradient). `chunked_scores` computes the head, the log-softmax
and the three numbers over chunks of at most `CHUNK_BYTES` of float32 logits, one after the
other, under a custom VJP that recomputes each chunk's logits in the backward pass: so at
most about one chunk of logits is live, forward or backward. Its backward runs both GEMMs
in the compute dtype with float32 accumulation (the logits' gradient rounded to the compute
dtype once, as mixed-precision training does), and is the exact gradient of the cross-
entropy: softmax − one-hot, times the incoming cotangent.

`scores_from_logits` is the same three numbers from whole logits (sampling and the
evaluation commands, which need the logits themselves, and the tests' reference).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import struct

# At most this many bytes of float32 logits per chunk: big enough that each chunk's GEMM
# keeps an accelerator busy (≈1300 positions at a 50K vocabulary), small enough that a few of
# them fit beside the activations. A head small enough for one chunk runs unchunked.
CHUNK_BYTES = 256 * 2**20


@struct.dataclass
class TokenScores:
    """Per-position results of the head: all the training losses and metrics read."""

    nll_BxL: jax.Array  # float32: −log p(target); differentiable
    predicted_BxL: jax.Array  # int32: argmax_v p(v)
    max_log_prob_BxL: jax.Array  # float32: log max_v p(v); a statistic, never differentiated


def scores_from_logits(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> TokenScores:
    """The scores of whole logits (−inf at ids that are never predicted), in float32."""
    log_probs = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets_BxL[..., None], axis=-1)[..., 0]
    return TokenScores(nll_BxL=nll, predicted_BxL=jnp.argmax(log_probs, axis=-1).astype(jnp.int32),
                       max_log_prob_BxL=jax.lax.stop_gradient(log_probs.max(axis=-1)))


def chunk_positions(num_positions: int, vocab_size: int, chunk_bytes: int = CHUNK_BYTES) -> tuple[int, int]:
    """(number of chunks, positions per chunk) for `num_positions` rows of float32 logits."""
    per_chunk = max(1, chunk_bytes // (4 * vocab_size))
    num_chunks = math.ceil(num_positions / per_chunk)
    return num_chunks, math.ceil(num_positions / num_chunks)


def _logits(h_CxD: jax.Array, kernel_DxV: jax.Array, num_predictable: int) -> jax.Array:
    """float32 logits of one chunk: a compute-dtype GEMM accumulated in float32, −inf at ids
    that are never predicted (as `Denoiser.__call__` returns them)."""
    logits = jnp.dot(h_CxD, kernel_DxV.astype(h_CxD.dtype), preferred_element_type=jnp.float32)
    return jnp.where(jnp.arange(kernel_DxV.shape[1]) < num_predictable, logits, -jnp.inf)


def _chunk_forward(h_CxD, kernel_DxV, targets_C, num_predictable):
    logits_CxV = _logits(h_CxD, kernel_DxV, num_predictable)
    top_C = logits_CxV.max(axis=-1)
    log_normalizer_C = top_C + jnp.log(jnp.exp(logits_CxV - top_C[:, None]).sum(axis=-1))
    target_logit_C = jnp.take_along_axis(logits_CxV, targets_C[:, None], axis=-1)[:, 0]
    scores = (log_normalizer_C - target_logit_C, jnp.argmax(logits_CxV, axis=-1).astype(jnp.int32),
              top_C - log_normalizer_C)
    return scores, log_normalizer_C


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunk_scores(h_CxD, kernel_DxV, targets_C, num_predictable):
    return _chunk_forward(h_CxD, kernel_DxV, targets_C, num_predictable)[0]


def _chunk_scores_fwd(h_CxD, kernel_DxV, targets_C, num_predictable):
    scores, log_normalizer_C = _chunk_forward(h_CxD, kernel_DxV, targets_C, num_predictable)
    return scores, (h_CxD, kernel_DxV, targets_C, log_normalizer_C)  # not the logits: recomputed


def _chunk_scores_bwd(num_predictable, residuals, cotangents):
    h_CxD, kernel_DxV, targets_C, log_normalizer_C = residuals
    nll_cotangent_C = cotangents[0]  # the argmax and max log-prob are statistics: no gradient
    probs_CxV = jnp.exp(_logits(h_CxD, kernel_DxV, num_predictable) - log_normalizer_C[:, None])
    one_hot_CxV = jax.nn.one_hot(targets_C, kernel_DxV.shape[1], dtype=jnp.float32)
    d_logits_CxV = (nll_cotangent_C[:, None] * (probs_CxV - one_hot_CxV)).astype(h_CxD.dtype)
    d_h_CxD = jnp.dot(d_logits_CxV, kernel_DxV.astype(h_CxD.dtype).T, preferred_element_type=jnp.float32)
    d_kernel_DxV = jnp.dot(h_CxD.T, d_logits_CxV, preferred_element_type=jnp.float32)
    return d_h_CxD.astype(h_CxD.dtype), d_kernel_DxV.astype(kernel_DxV.dtype), None


_chunk_scores.defvjp(_chunk_scores_fwd, _chunk_scores_bwd)


def chunked_scores(hidden_BxLxD: jax.Array, kernel_DxV: jax.Array, targets_BxL: jax.Array, num_predictable: int,
                   chunk_bytes: int = CHUNK_BYTES) -> TokenScores:
    """The scores of `hidden @ kernel` (the head of normed final hidden states, in the compute
    dtype) against `targets_BxL`, which must be predictable ids at every position (callers
    score id 0 where nothing is scored), computed chunk by chunk (see the module docstring).

    Equal to `scores_from_logits` of the whole logits up to float rounding, with the same
    gradient with respect to the hidden states and the kernel.
    """
    batch, length, d_model = hidden_BxLxD.shape
    num_positions = batch * length
    num_chunks, per_chunk = chunk_positions(num_positions, kernel_DxV.shape[1], chunk_bytes)
    h_TxD, targets_T = hidden_BxLxD.reshape(num_positions, d_model), targets_BxL.reshape(num_positions)
    if num_chunks == 1:
        nll_T, predicted_T, max_log_prob_T = _chunk_scores(h_TxD, kernel_DxV, targets_T, num_predictable)
    else:
        # Positions past the end (zeros, target 0) fill the last chunk and are dropped after.
        padding = num_chunks * per_chunk - num_positions
        h_NxCxD = jnp.pad(h_TxD, ((0, padding), (0, 0))).reshape(num_chunks, per_chunk, d_model)
        targets_NxC = jnp.pad(targets_T, (0, padding)).reshape(num_chunks, per_chunk)
        scored = jax.lax.map(lambda chunk: _chunk_scores(chunk[0], kernel_DxV, chunk[1], num_predictable),
                             (h_NxCxD, targets_NxC))
        nll_T, predicted_T, max_log_prob_T = (x.reshape(-1)[:num_positions] for x in scored)
    shape = (batch, length)
    return TokenScores(nll_BxL=nll_T.reshape(shape), predicted_BxL=predicted_T.reshape(shape),
                       max_log_prob_BxL=jax.lax.stop_gradient(max_log_prob_T.reshape(shape)))
