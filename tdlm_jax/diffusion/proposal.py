"""Variance-aware time sampling (`diffusion.time_sampling='adaptive'`): importance sampling
of t with a learned proposal q, reweighted by p/q so the NELBO estimate stays unbiased.

The NELBO is E_{t~p}[ℓ(t)] with p = U[t_min, 1] and ℓ the weighted loss of a sequence
corrupted at t. Drawing t from q instead and weighting each sequence by p(t)/q(t) keeps the
estimate unbiased for any q with q > 0 wherever p is, and its variance is smallest for
q ∝ p·√E[ℓ² | t] (the classic result that improved-diffusion's loss-second-moment sampler
uses for images). The exact ELBO weight w(t) = −α′/(1 − α) makes ℓ large and noisy at small
t, so the optimal q puts more draws there and weights each of them down.

q is piecewise constant over `adaptive_bins` equal-width bins of [t_min, 1]. Each bin keeps an
exponential moving average of E[ℓ² | bin] over the sequences that fell in it, ℓ being the
sequence's weighted loss per valid token, decaying by `adaptive_decay` per sequence (so a
bin's window is about 1/(1 − decay) sequences however often it is drawn); an average of n
sequences is divided by 1 − decay^n (Adam's bias correction). Then q_k ∝ √m_k (p is uniform
over the bins), mixed with a uniform floor, q ← (1 − floor)·q + floor/K, so no bin starves.
q stays uniform for the first `adaptive_warmup_steps` steps and until every bin has seen
`MIN_SAMPLES` sequences: ℓ² is heavy-tailed at small t (few masked tokens times a weight of
1/t, often none at all), and a bin judged on its first one or two sequences, often 0, would
drop to the floor and be starved of the samples that would correct it. The averages live in the train state
(`TrainState.time_proposal`), so they are checkpointed and a resumed run draws exactly the
times an uninterrupted one would; they are data, never a shape, so updating them recompiles
nothing.

Times are drawn stratified under q: row i of B gets the i-th of B equal-probability strata of
q, through q's inverse CDF, so the design keeps stratification's low variance. Its unbiasing
factor is p(t)/q(t) = 1/(K·q_k) for t in bin k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


MIN_SAMPLES = 10  # sequences every bin must have seen before q leaves uniform


@struct.dataclass
class Proposal:
    """The running statistics q is built from: float32[K] averages and int32[K] sample counts."""

    second_moment_K: jax.Array  # EMA of E[ℓ² | bin k] (before bias correction)
    samples_K: jax.Array  # how many sequences each bin's average has seen


def initial_proposal(num_bins: int) -> Proposal:
    return Proposal(second_moment_K=jnp.zeros((num_bins,), jnp.float32), samples_K=jnp.zeros((num_bins,), jnp.int32))


def probabilities(proposal: Proposal, step: jax.Array, *, decay: float, floor: float, warmup_steps: int
                  ) -> jax.Array:
    """q over the bins (float32[K], summing to 1) for a step: uniform during the warm-up,
    else ∝ √(bias-corrected E[ℓ² | bin]) mixed with the floor."""
    num_bins = proposal.second_moment_K.shape[0]
    uniform = jnp.full((num_bins,), 1.0 / num_bins, jnp.float32)
    ready = (step >= warmup_steps) & jnp.all(proposal.samples_K >= MIN_SAMPLES)
    correction = 1.0 - jnp.power(jnp.float32(decay), proposal.samples_K.astype(jnp.float32))
    moment = proposal.second_moment_K / jnp.where(correction > 0, correction, 1.0)
    root = jnp.sqrt(jnp.maximum(moment, 0.0))
    optimal = jnp.where(root.sum() > 0, root / jnp.where(root.sum() > 0, root.sum(), 1.0), uniform)
    mixed = (1.0 - floor) * optimal + floor * uniform
    return jnp.where(ready, mixed, uniform).astype(jnp.float32)


def bin_of(t_B: jax.Array, t_min: float, num_bins: int) -> jax.Array:
    """The bin of each time: k with t_min + k·Δ <= t < t_min + (k + 1)·Δ (the last closed)."""
    position = (t_B - t_min) / (1.0 - t_min) * num_bins
    return jnp.clip(jnp.floor(position), 0, num_bins - 1).astype(jnp.int32)


def sample_times(q_K: jax.Array, t_min: float, u_B: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(t_B, unbias_B): row i at the point of q's CDF (i + u_i)/B, and p(t)/q(t) = 1/(K·q_k)."""
    batch_size, num_bins = u_B.shape[0], q_K.shape[0]
    level_B = (jnp.arange(batch_size, dtype=jnp.float32) + u_B) / batch_size
    cdf_K = jnp.cumsum(q_K)
    bin_B = jnp.clip(jnp.searchsorted(cdf_K, level_B, side="right"), 0, num_bins - 1)
    below_B = jnp.where(bin_B > 0, cdf_K[jnp.maximum(bin_B - 1, 0)], 0.0)
    within_B = jnp.clip((level_B - below_B) / q_K[bin_B], 0.0, 1.0)
    t_B = t_min + (1.0 - t_min) * (bin_B + within_B) / num_bins
    return t_B.astype(jnp.float32), (1.0 / (num_bins * q_K[bin_B])).astype(jnp.float32)


def updated(proposal: Proposal, t_B: jax.Array, loss_B: jax.Array, counted_B: jax.Array, *, t_min: float,
            decay: float) -> Proposal:
    """The averages after one step: a bin that drew c counted sequences moves its E[ℓ²]
    towards the mean of their ℓ² by 1 − decay^c, as c updates of one sequence each would on
    average (`loss_B`: each sequence's weighted loss per valid token)."""
    num_bins = proposal.second_moment_K.shape[0]
    one_hot_BxK = jax.nn.one_hot(bin_of(t_B, t_min, num_bins), num_bins, dtype=jnp.float32) * counted_B[:, None]
    count_K = one_hot_BxK.sum(axis=0)
    mean_square_K = (one_hot_BxK * (loss_B ** 2)[:, None]).sum(axis=0) / jnp.maximum(count_K, 1.0)
    kept_K = jnp.power(jnp.float32(decay), count_K)
    return Proposal(second_moment_K=kept_K * proposal.second_moment_K + (1.0 - kept_K) * mean_square_K,
                    samples_K=proposal.samples_K + count_K.astype(jnp.int32))
