"""The forward process: per-sequence times, their loss weights, and token masking.

Time sampling. Each sequence of the global batch gets its own t ∈ [t_min, 1].
- 'iid': t ~ U[t_min, 1] independently.
- 'stratified' (default): a stratified sample whose strata are aligned to the corruption
  buckets of the research metrics (masking-rate edges, e.g. 0, 0.3, 0.7, 1). Bucket b
  covers the time interval [τ_b, τ_{b+1}) with probability p_b under U[t_min, 1]; it gets a
  fixed number n_b ≈ p_b·B of rows, and its interval is split into n_b equal strata with
  one uniform draw in each. Every row is reweighted by p_b·B / n_b (1 when p_b·B is an
  integer), so the estimate of E_t[·] under U[t_min, 1] stays exactly unbiased. Because
  bucket membership is then fixed by row index, the research step can take each bucket's
  gradient on its own rows; see `tdlm_jax.metrics.research`. The rows are laid out so that
  every microbatch of the train step, on every device, holds the same buckets (`BucketPlan`),
  which rounds each n_b to a multiple of microbatches × shards. A batch with fewer rows than
  buckets of positive probability (B = 1 or 2) cannot give each bucket a row, and a bucket
  without rows would never be sampled (a biased loss), so such a batch is stratified over
  the whole of [t_min, 1] instead (B equal strata, unbias 1) and its buckets are taken from
  the masking rate, as under 'iid'.
- 'adaptive': stratified under a learned proposal q(t) that minimises the estimator's
  variance, each row weighted by p(t)/q(t) (`tdlm_jax.diffusion.proposal`); buckets are
  taken from the masking rate.

Masking. Every position draws a mask with probability 1 − α(t) (LLaDA's variable
masking); only valid (non-padding) positions are replaced by [MASK] and scored. Drawing at
padding too is what makes `metrics/valid_ratio` a measurement: the share of the drawn
masks that land on real tokens, which falls when batches carry a lot of padding.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from tdlm_jax.diffusion import proposal
from tdlm_jax.diffusion.schedules import Schedule, loss_weight

TIME_SAMPLING = ("stratified", "iid", "adaptive")
LOSS_WEIGHTINGS = ("elbo", "uniform", "clipped")


@dataclasses.dataclass(frozen=True)
class BucketPlan:
    """Static per-bucket layout of the global batch for bucket-aligned stratified sampling.

    The batch is `shards` equal blocks of rows (each device's share of it), and every block
    is a run of slots of `slot_rows` consecutive rows. A bucket owns the same range of slots
    in every block. With `slot_rows` = k microbatches, microbatch j (rows j, j + k, …; see
    `tdlm_jax.training.step.microbatches`) takes one row of every slot: every microbatch on
    every device then holds the same static bucket layout, which is what lets the research
    step take each bucket's gradient on its own rows in every microbatch.

    Attributes:
      slots: (start, stop) slot range of each bucket within every block.
      slot_rows: rows per slot (the microbatches the layout is aligned to; 1: a row per slot).
      shards: blocks of the batch (its data shards).
      t_bounds: (lo, hi) time interval of each bucket, clipped to [t_min, 1].
      unbias: p_b·B / n_b for each bucket (0 for a bucket with no rows).
    """

    slots: tuple[tuple[int, int], ...]
    slot_rows: int
    shards: int
    t_bounds: tuple[tuple[float, float], ...]
    unbias: tuple[float, ...]

    @property
    def counts(self) -> tuple[int, ...]:
        """Rows of each bucket in the whole batch."""
        return tuple(self.shards * self.slot_rows * (stop - start) for start, stop in self.slots)

    def row_strata(self) -> tuple[np.ndarray, np.ndarray]:
        """(bucket of every row, its stratum: the row's rank among its bucket's rows), int [B]."""
        slot_buckets = np.concatenate([np.full(stop - start, b) for b, (start, stop) in enumerate(self.slots)])
        bucket_B = np.tile(np.repeat(slot_buckets, self.slot_rows), self.shards).astype(np.int32)
        stratum_B = np.zeros_like(bucket_B)
        for b in range(len(self.slots)):
            stratum_B[bucket_B == b] = np.arange((bucket_B == b).sum())
        return bucket_B, stratum_B


def proportional_counts(probs: list[float], total: int) -> list[int]:
    """`total` units shared in proportion to `probs` by largest remainder, every share of
    positive probability getting at least one when there are enough units, so that no
    bucket's metrics vanish by rounding."""
    ideal = [p * total for p in probs]
    counts = [math.floor(x) for x in ideal]
    by_remainder = sorted(range(len(ideal)), key=lambda b: counts[b] - ideal[b])
    for b in by_remainder[: total - sum(counts)]:
        counts[b] += 1
    for b in range(len(counts)):
        if probs[b] > 0 and counts[b] == 0 and max(counts) > 1:
            counts[b] += 1
            counts[counts.index(max(counts))] -= 1
    return counts


def plan_buckets(schedule: Schedule, t_min: float, mask_rate_edges, batch_size: int, microbatches: int = 1,
                 shards: int = 1) -> BucketPlan:
    """Allocates the rows of a global batch to corruption buckets, in proportion to their
    probabilities, in slots aligned to `microbatches` and `shards` (see `BucketPlan`).

    Aligning costs precision of the allocation, not bias: with k microbatches over D shards
    each bucket's row count is a multiple of k·D (base.py's 32 rows in 8 microbatches: 8,
    16, 8 rows where 9.6, 12.8, 9.6 are proportional), and the unbiasing factors p_b·B/n_b
    absorb the rounding. A batch with fewer slots than buckets of positive probability is
    allocated row by row instead (one slot per row, one block): its bucket layout is then
    static for the whole batch but differs between microbatches.
    """
    times = [min(max(schedule.time_at_mask_rate(m), t_min), 1.0) for m in mask_rate_edges]
    t_bounds = tuple(zip(times[:-1], times[1:]))
    probs = [(hi - lo) / (1.0 - t_min) for lo, hi in t_bounds]
    group = microbatches * shards
    num_slots = batch_size // group if batch_size % group == 0 else 0
    if num_slots < sum(p > 0 for p in probs):
        microbatches, shards, num_slots = 1, 1, batch_size
    slot_counts = proportional_counts(probs, num_slots)
    starts = [sum(slot_counts[:b]) for b in range(len(slot_counts))]
    slots = tuple((s, s + n) for s, n in zip(starts, slot_counts))
    rows_per_slot = batch_size // num_slots
    unbias = tuple(p * batch_size / (n * rows_per_slot) if n else 0.0 for p, n in zip(probs, slot_counts))
    return BucketPlan(slots=slots, slot_rows=microbatches, shards=shards, t_bounds=t_bounds, unbias=unbias)


@dataclasses.dataclass(frozen=True)
class ForwardProcess:
    """Everything static about the forward process; hashable, so jit can close over it."""

    schedule: Schedule
    t_min: float
    time_sampling: str
    loss_weighting: str
    weight_clip_max: float
    mask_id: int
    bucket_edges: tuple[float, ...]  # masking-rate edges of the corruption buckets
    batch_size: int  # the global batch this process is planned for
    # 'adaptive' time sampling (tdlm_jax.diffusion.proposal):
    adaptive_bins: int = 32
    adaptive_floor: float = 0.1
    adaptive_decay: float = 0.99
    adaptive_warmup_steps: int = 100
    # The layout the stratified plan aligns its buckets to (`BucketPlan`): the train step's
    # microbatches (training.grad_accum_steps) and the batch's data shards (its devices).
    microbatches: int = 1
    shards: int = 1

    @property
    def adaptive(self) -> bool:
        return self.time_sampling == "adaptive"

    @property
    def plan(self) -> BucketPlan:
        return plan_buckets(self.schedule, self.t_min, self.bucket_edges, self.batch_size, self.microbatches,
                            self.shards)

    @property
    def static_buckets(self) -> bool:
        """Whether bucket membership is fixed by row index (see the module docstring): the
        bucket-aligned strata need a row in every bucket of positive probability."""
        plan = self.plan
        return self.time_sampling == "stratified" and all(
            n > 0 for n, (lo, hi) in zip(plan.counts, plan.t_bounds) if hi > lo)

    def aligned_buckets(self, num_micro: int) -> bool:
        """Whether each of `num_micro` microbatches holds the same static bucket layout: one
        row of every slot of the plan (the whole batch, for one microbatch)."""
        return self.static_buckets and self.plan.slot_rows == num_micro

    def sample_times(self, rng: jax.Array, q_K: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Returns per-sequence times t_B and their unbiasing factors, both float32[B]; under
        'adaptive' sampling `q_K` is the proposal over its bins (None: uniform)."""
        u_B = jax.random.uniform(rng, (self.batch_size,), jnp.float32)
        if self.adaptive:
            if q_K is None:
                q_K = jnp.full((self.adaptive_bins,), 1.0 / self.adaptive_bins, jnp.float32)
            return proposal.sample_times(q_K, self.t_min, u_B)
        if self.time_sampling == "iid":
            return self.t_min + (1.0 - self.t_min) * u_B, jnp.ones_like(u_B)
        if not self.static_buckets:  # too few rows for the buckets: B strata over the whole interval
            strata_B = (jnp.arange(self.batch_size, dtype=jnp.float32) + u_B) / self.batch_size
            return self.t_min + (1.0 - self.t_min) * strata_B, jnp.ones_like(u_B)
        plan = self.plan
        bucket_B, stratum_B = plan.row_strata()
        lo_B, hi_B = (np.asarray(plan.t_bounds)[bucket_B, i] for i in (0, 1))
        count_B = np.asarray(plan.counts)[bucket_B]
        as_array = lambda xs: jnp.asarray(xs, jnp.float32)
        t_B = as_array(lo_B) + as_array(hi_B - lo_B) * (as_array(stratum_B) + u_B) / as_array(count_B)
        unbias = np.asarray(plan.unbias)[bucket_B]
        return t_B, as_array(unbias)

    def proposal_probabilities(self, state: proposal.Proposal, step: jax.Array) -> jax.Array:
        """The adaptive proposal q over its bins for `step`, from the train state's statistics."""
        return proposal.probabilities(state, step, decay=self.adaptive_decay, floor=self.adaptive_floor,
                                      warmup_steps=self.adaptive_warmup_steps)

    def updated_proposal(self, state: proposal.Proposal, t_B: jax.Array, loss_B: jax.Array, counted_B: jax.Array
                         ) -> proposal.Proposal:
        """The proposal's statistics after a step whose sequences had these times and losses."""
        return proposal.updated(state, t_B, loss_B, counted_B, t_min=self.t_min, decay=self.adaptive_decay)

    def weight(self, t_B: jax.Array) -> jax.Array:
        """The objective's loss weight w(t) of each sequence."""
        return loss_weight(self.schedule, t_B, self.loss_weighting, self.weight_clip_max)

    def for_evaluation(self, batch_size: int) -> "ForwardProcess":
        """The same process with exact ELBO weights, planned for the evaluation batch size.

        Validation is always the exact NELBO, whatever weighting an ablation trains with, and
        its fixed stratified design (an adaptive proposal is the training run's, not a
        property of the parameters).
        """
        sampling = "stratified" if self.adaptive else self.time_sampling
        return dataclasses.replace(self, loss_weighting="elbo", batch_size=batch_size, time_sampling=sampling,
                                   microbatches=1, shards=1)


@struct.dataclass
class Corrupted:
    """A batch after the forward process. Shapes: B sequences of length L.

    The NELBO estimate is Σ weight·unbias·CE over masked tokens divided by the number of
    valid tokens: `weight_B` is the objective's w(t), `unbias_B` the stratification factor.
    """

    tokens_BxL: jax.Array  # clean targets
    noisy_BxL: jax.Array  # model input: clean tokens with [MASK] at masked positions
    valid_BxL: jax.Array  # real (non-padding) tokens
    masked_BxL: jax.Array  # masked valid tokens: the positions that are scored
    drawn_BxL: jax.Array  # every position whose mask was drawn, padding included
    t_B: jax.Array
    mask_rate_B: jax.Array  # 1 − α(t): the sequence's corruption level
    weight_B: jax.Array
    unbias_B: jax.Array

    def block_rows(self, blocks: int, start: int, stop: int, step: int = 1) -> "Corrupted":
        """The sub-batch of the rows at positions start, start + step, … before stop within
        each of `blocks` equal blocks of rows (the batch's shards: each keeps its own rows)."""
        def take(x):
            return x.reshape(blocks, -1, *x.shape[1:])[:, start:stop:step].reshape(-1, *x.shape[1:])
        return jax.tree.map(take, self)


def corrupt(process: ForwardProcess, rng: jax.Array, tokens_BxL: jax.Array, valid_BxL: jax.Array,
            q_K: jax.Array | None = None) -> Corrupted:
    """Applies the forward process to a clean batch (`q_K`: the adaptive proposal, if any)."""
    if tokens_BxL.shape[0] != process.batch_size:
        raise ValueError(f"forward process planned for {process.batch_size} rows, batch has {tokens_BxL.shape[0]}")
    time_rng, mask_rng = jax.random.split(rng)
    t_B, unbias_B = process.sample_times(time_rng, q_K)
    uniforms_BxL = jax.random.uniform(mask_rng, tokens_BxL.shape)
    return corrupt_at_times(process, tokens_BxL, valid_BxL, t_B, uniforms_BxL, unbias_B)


def corrupt_at_times(process: ForwardProcess, tokens_BxL: jax.Array, valid_BxL: jax.Array, t_B: jax.Array,
                     uniforms_BxL: jax.Array, unbias_B: jax.Array | None = None) -> Corrupted:
    """Applies the forward process at given times, with given U[0, 1) draws for the masks.

    `corrupt` is this function with sampled times; evaluation calls it directly with its own
    time grid and per-sequence random streams. A position's mask is drawn where its uniform
    falls below the masking rate 1 − α(t) of its sequence.
    """
    mask_rate_B = 1.0 - process.schedule.alpha(t_B)
    drawn_BxL = uniforms_BxL < mask_rate_B[:, None]
    masked_BxL = drawn_BxL & valid_BxL
    if unbias_B is None:
        unbias_B = jnp.ones_like(t_B)
    return Corrupted(
        tokens_BxL=tokens_BxL,
        noisy_BxL=jnp.where(masked_BxL, process.mask_id, tokens_BxL),
        valid_BxL=valid_BxL,
        masked_BxL=masked_BxL,
        drawn_BxL=drawn_BxL,
        t_B=t_B,
        mask_rate_B=mask_rate_B,
        weight_B=process.weight(t_B),
        unbias_B=unbias_B,
    )
