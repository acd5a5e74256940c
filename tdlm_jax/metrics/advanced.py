"""Tier-3 (advanced) metrics: statistics of the denoiser's final hidden states and of its
attention distributions. Computed every `training.attention_analysis_steps` by a separate
jitted forward pass (`tdlm_jax.training.step.analysis_step`), never inside the train step.

The pass analyses `training.analysis_rows` rows of the step's batch (`analysed_rows`:
evenly spaced, at most 8 by default), corrupted exactly as the step corrupted them, so its
memory is bounded whatever the batch; every metric below is over those rows.

Padding is masked out everywhere: only valid positions count, as positions, as queries and
as keys, so whatever the model computes at padding cannot move a metric. A metric with
nothing to average over (no valid position in the batch) is missing (NaN), never 0.

- `advanced/attention_entropy_proxy`: the variance of the final hidden states across
  positions (per sequence and feature, the population variance over the sequence's valid
  positions), averaged over features, then over sequences with at least one valid
  position. A cheap proxy: when attention is near uniform, positions mix into nearly the
  same vector and this variance collapses towards 0.
- `advanced/sequence_diversity`: the same with the standard deviation instead of the
  variance (the square root is taken per feature, before averaging).
- `advanced/hidden_state_norm`: the mean L2 norm of the final hidden state, pooled over all
  valid positions of the batch.
- `advanced/attention_entropy`: the mean entropy (nats) of the attention distributions,
  pooled over layers, heads and valid query positions of all sequences;
  H = −Σ_k p_k log p_k over valid keys k, with 0·log 0 = 0.
- `advanced/attention_entropy/layer_{i}`: the same for layer i alone (0-based). Every layer
  has the same number of valid queries, so the overall mean is the mean of these.

"Final hidden states" are the residual stream after the last block, before the final
RMSNorm (see `Denoiser.__call__`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tdlm_jax.metrics import catalogue as names
from tdlm_jax.metrics.tier1 import safe_ratio


def per_sequence_variance(hidden_BxLxD: jax.Array, valid_BxL: jax.Array) -> jax.Array:
    """Population variance over each sequence's valid positions, per feature: float32[B, D].

    NaN for a sequence without valid positions.
    """
    hidden_BxLxD = hidden_BxLxD.astype(jnp.float32)
    valid_BxLx1 = valid_BxL[:, :, None]
    count_Bx1 = valid_BxL.sum(axis=-1, keepdims=True)
    # `where` before any arithmetic, so that garbage (even inf/NaN) at padding never leaks in.
    mean_BxD = safe_ratio(jnp.where(valid_BxLx1, hidden_BxLxD, 0.0).sum(axis=1), count_Bx1)
    centered_BxLxD = jnp.where(valid_BxLx1, hidden_BxLxD - mean_BxD[:, None, :], 0.0)
    return safe_ratio((centered_BxLxD ** 2).sum(axis=1), count_Bx1)


def mean_over_sequences(value_B: jax.Array, valid_BxL: jax.Array) -> jax.Array:
    """The mean of a per-sequence value over sequences with at least one valid position."""
    has_valid_B = valid_BxL.any(axis=-1)
    return safe_ratio(jnp.where(has_valid_B, value_B, 0.0).sum(), has_valid_B.sum())


def attention_entropy_proxy(hidden_BxLxD: jax.Array, valid_BxL: jax.Array) -> jax.Array:
    """Hidden-state variance across valid positions, averaged over features and sequences."""
    return mean_over_sequences(per_sequence_variance(hidden_BxLxD, valid_BxL).mean(axis=-1), valid_BxL)


def sequence_diversity(hidden_BxLxD: jax.Array, valid_BxL: jax.Array) -> jax.Array:
    """Hidden-state standard deviation across valid positions, averaged over features and sequences."""
    std_BxD = jnp.sqrt(per_sequence_variance(hidden_BxLxD, valid_BxL))
    return mean_over_sequences(std_BxD.mean(axis=-1), valid_BxL)


def hidden_state_norm(hidden_BxLxD: jax.Array, valid_BxL: jax.Array) -> jax.Array:
    """Mean L2 norm over the feature axis, pooled over all valid positions of the batch."""
    hidden_BxLxD = jnp.where(valid_BxL[:, :, None], hidden_BxLxD.astype(jnp.float32), 0.0)
    norm_BxL = jnp.sqrt((hidden_BxLxD ** 2).sum(axis=-1))
    return safe_ratio(norm_BxL.sum(), valid_BxL.sum())


def attention_entropies(probs_BxNxLxL: jax.Array, valid_BxL: jax.Array) -> jax.Array:
    """Entropy (nats) of each attention row of one layer over the valid keys: float32[B, N, L].

    Padding keys are left out of the sum; they hold probability 0 in the model anyway.
    """
    probs_BxNxLxL = probs_BxNxLxL.astype(jnp.float32)
    counted = valid_BxL[:, None, None, :] & (probs_BxNxLxL > 0)
    # log of 1 where p is not counted: keeps 0·log 0 (and garbage) from producing NaN.
    p_log_p = probs_BxNxLxL * jnp.log(jnp.where(counted, probs_BxNxLxL, 1.0))
    return -jnp.where(counted, p_log_p, 0.0).sum(axis=-1)


def layer_attention_entropy(probs_BxNxLxL: jax.Array, valid_BxL: jax.Array) -> jax.Array:
    """Mean attention entropy of one layer over its heads and valid queries: a float32 scalar.

    What the analysis pass keeps of each layer's probabilities (`Denoiser.residual_stream`'s
    `attention_summary`), so it never holds more than one layer's [B, heads, L, L].
    """
    entropy_BxNxL = attention_entropies(probs_BxNxLxL, valid_BxL)
    total = jnp.where(valid_BxL[:, None, :], entropy_BxNxL, 0.0).sum()
    return safe_ratio(total, probs_BxNxLxL.shape[1] * valid_BxL.sum())


def attention_entropy_by_layer(probs_KxBxNxLxL: jax.Array, valid_BxL: jax.Array) -> jax.Array:
    """`layer_attention_entropy` of every layer of stacked probabilities: float32[K]."""
    return jax.vmap(layer_attention_entropy, in_axes=(0, None))(probs_KxBxNxLxL, valid_BxL)


def analysed_rows(batch_size: int, max_rows: int) -> np.ndarray:
    """The rows of a batch the analysis pass takes: `max_rows` of them (all if fewer),
    evenly spaced, so that under stratified time sampling (row i in stratum i) they span
    the corruption levels, and its memory does not grow with the batch."""
    count = min(batch_size, max_rows)
    return (np.arange(count) * batch_size) // count


def advanced_metrics(hidden_BxLxD: jax.Array, entropy_by_layer_K: jax.Array, valid_BxL: jax.Array
                     ) -> dict[str, jax.Array]:
    """All tier-3 metrics of one batch as float32 scalars; names as in the metrics guide.

    `entropy_by_layer_K` is `layer_attention_entropy` of each layer's probabilities.
    """
    out = {
        names.ATTENTION_ENTROPY_PROXY: attention_entropy_proxy(hidden_BxLxD, valid_BxL),
        names.HIDDEN_STATE_NORM: hidden_state_norm(hidden_BxLxD, valid_BxL),
        names.SEQUENCE_DIVERSITY: sequence_diversity(hidden_BxLxD, valid_BxL),
        # Each layer has the same valid queries and heads, so the pooled mean is the mean of layers.
        names.ATTENTION_ENTROPY: entropy_by_layer_K.mean(),
    }
    for layer in range(entropy_by_layer_K.shape[0]):
        out[names.LAYER_ATTENTION_ENTROPY.format(layer=layer)] = entropy_by_layer_K[layer]
    return {name: value.astype(jnp.float32) for name, value in out.items()}
