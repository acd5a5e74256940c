"""Tier-2 (research) metrics: corruption buckets, weight–difficulty statistics, and
per-bucket gradient norms. Computed inside the detailed variant of the jitted train step.

Buckets. A sequence's corruption level is its masking rate m = 1 − α(t). With edges
(0, 0.3, 0.7, 1): low is [0, 0.3), medium [0.3, 0.7), high [0.7, 1] (the last bucket
includes its upper edge).

Per-bucket gradients. L_b is the NELBO restricted to the sequences of bucket b and divided
by the same denominator as the full loss (the number of valid tokens of the whole batch),
so Σ_b L_b = L and Σ_b ∇L_b = ∇L. Each ∇L_b is a gradient of its own loss, never a share
of the total:
- With 'stratified' time sampling (the default) bucket membership is fixed by row index,
  and laid out so that every microbatch of the step holds the same buckets in the same
  rows (`tdlm_jax.diffusion.corruption.BucketPlan`). Each ∇L_b is then a separate
  `jax.grad` over that bucket's rows alone: per microbatch under gradient accumulation,
  summed over the microbatches; without accumulation split further into the bucket's even
  and odd rows for the gradient noise scale (`noise_scale_metrics`). The sub-batch passes
  together cost about one full pass, and the update uses their sum, which is ∇L: the
  detailed step applies the same update as an ordinary one (equal up to float summation
  order).
- With 'iid' or 'adaptive' time sampling membership is data (and so for a stratified
  batch too small to align), so every row's gradient is taken on its own, vmapped, and
  summed into its bucket's (`per_row_bucket_gradients`): the same FLOPs as one pass, at
  about 1.1× a bare step on base.py. The update again uses the sum of the three.
Neither path changes the estimator: the loss is the same unbiased NELBO estimate as in
the ordinary step.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tdlm_jax.diffusion.corruption import Corrupted, ForwardProcess
from tdlm_jax.diffusion.loss import num_valid_tokens
from tdlm_jax.metrics import catalogue as names
from tdlm_jax.metrics.catalogue import BUCKETS, bucket_name
from tdlm_jax.metrics.tier1 import correct_rows, safe_ratio
from tdlm_jax.model.head import TokenScores

# (params, batch) -> (per-row NELBO contributions float32[rows], their TokenScores [rows, L])
RowLossFn = Callable[[Any, Corrupted], tuple[jax.Array, jax.Array]]


def bucket_index(mask_rate_B: jax.Array, edges) -> jax.Array:
    """The bucket of each sequence: b such that edges[b] <= m < edges[b+1] (last one closed)."""
    interior = jnp.asarray(edges[1:-1], jnp.float32)
    return jnp.searchsorted(interior, mask_rate_B, side="right").astype(jnp.int32)


def row_buckets(process: ForwardProcess, batch: Corrupted) -> jax.Array:
    """Bucket of every row: by construction for stratified sampling, by masking rate otherwise."""
    if process.static_buckets:
        return jnp.asarray(process.plan.row_strata()[0])
    return bucket_index(batch.mask_rate_B, process.bucket_edges)


# Per-bucket gradients: (gradients by bucket, Σ |∇L_s|² over the noise scale's small batches s,
# per-row losses float32[rows], per-row `row_statistics`)
BucketGradients = tuple[list[Any], jax.Array, jax.Array, dict[str, jax.Array]]


# The most bytes of per-row gradients the data-membership path holds at once per device
# (metrics.row_gradient_mb; 0 takes these). On a CPU, 8 of base.py's rows (3.7 MB each) in one
# vmap, few enough for a chunk's rows to stay in cache: base.py without accumulation, iid, tier 2
# at 0.72–0.75× a bare step with this budget, 1.04–1.07× with 256 MB (all 32 rows in one vmap).
# On an accelerator that budget would take a GPT-2-small row (650 MB) one at a time, launching
# every kernel once per row: there 1/16 of the device's memory, at most 4 GiB (such rows four at a
# time in a batch of 32, a chunk's rows dividing the batch). Not yet measured on a GPU
# (docs/performance.md, "GPU": the suite times it against one row at a time).
CPU_ROW_GRADIENT_BYTES = 32 * 2**20
ACCELERATOR_ROW_GRADIENT_BYTES = 4 * 2**30
UNKNOWN_MEMORY_ROW_GRADIENT_BYTES = 2**30  # an accelerator that reports no memory limit
ACCELERATOR_MEMORY_SHARE = 16  # the budget's 1 / share of a device's memory


def row_gradient_budget(megabytes: int, device: Any) -> int:
    """metrics.row_gradient_mb in bytes: `megabytes` MiB, or for 0 the default of `device`'s
    platform (above)."""
    if megabytes:
        return megabytes * 2**20
    if device.platform == "cpu":
        return CPU_ROW_GRADIENT_BYTES
    limit = (device.memory_stats() or {}).get("bytes_limit", 0)
    share = limit // ACCELERATOR_MEMORY_SHARE if limit else UNKNOWN_MEMORY_ROW_GRADIENT_BYTES
    return min(ACCELERATOR_ROW_GRADIENT_BYTES, share)


def bucket_gradients(row_loss_fn: RowLossFn, params: Any, batch: Corrupted, process: ForwardProcess,
                     buckets_B: jax.Array, num_micro: int = 1,
                     row_gradient_bytes: int = CPU_ROW_GRADIENT_BYTES) -> BucketGradients:
    """∇θ L_b for every bucket of `batch` (the whole batch, or one of `num_micro`
    microbatches, whose rows are in `buckets_B`), each by gradient computations of its own
    bucket-restricted loss, and Σ_s |∇θ L_s|² over the gradient noise scale's small batches s
    (`noise_scale_metrics`): the batch's two halves (its even and its odd rows, counted
    within each device's block) when it is the whole batch, else the microbatch itself.

    Where every microbatch holds the same static layout (`ForwardProcess.aligned_buckets`),
    each (bucket, half) is its own `jax.grad` over its rows alone: passes over a third or a
    sixth of the rows that together cost about one pass over all of them. Otherwise
    `per_row_bucket_gradients`, holding at most `row_gradient_bytes` of per-row gradients.
    """
    halves = num_micro == 1
    if not process.aligned_buckets(num_micro):
        return per_row_bucket_gradients(row_loss_fn, params, batch, buckets_B, halves=halves, blocks=process.shards,
                                        row_gradient_bytes=row_gradient_bytes)
    plan, zeros = process.plan, jax.tree.map(jnp.zeros_like, params)
    stride = 2 if halves else 1
    by_bucket, by_part, pieces = [zeros] * len(BUCKETS), [zeros] * stride, []
    # Within each of the plan's blocks (shards) a row of the (micro)batch is one slot.
    for b, (start, stop) in enumerate(plan.slots):
        for part in range(stride):
            first = start + (part - start) % stride  # the bucket's first slot of this parity
            if first >= stop:
                continue
            sub_batch = batch.block_rows(plan.shards, first, stop, stride)
            grad, (rows, scores) = jax.grad(lambda p: summed(row_loss_fn(p, sub_batch)), has_aux=True)(params)
            by_bucket[b] = jax.tree.map(jnp.add, by_bucket[b], grad)
            by_part[part] = jax.tree.map(jnp.add, by_part[part], grad)
            pieces.append((np.arange(first, stop, stride), {"rows": rows, **row_statistics(scores, sub_batch)}))
    per_row = _in_block_order(pieces, plan.shards)
    return by_bucket, sum(squared_norm(g) for g in by_part), per_row.pop("rows"), per_row


def _in_block_order(pieces: list[tuple[np.ndarray, dict]], blocks: int) -> dict[str, jax.Array]:
    """Per-row values of sub-batches (`Corrupted.block_rows`), given with each one's positions
    within a block, back in the batch's row order; every block keeps its own rows."""
    order = np.argsort(np.concatenate([positions for positions, _ in pieces]))

    def merge(*xs):
        by_block = jnp.concatenate([x.reshape(blocks, -1) for x in xs], axis=1)
        return by_block[:, order].reshape(-1)

    return jax.tree.map(merge, *[values for _, values in pieces])


def rows_per_chunk(rows_per_block: int, row_bytes: int, budget: int) -> int:
    """How many rows of every block one chunk of `per_row_bucket_gradients` takes: the most
    that divides the block's rows and whose gradients (`row_bytes` each) fit the per-device
    `budget`, at least 1. Each device holds only its own block's rows of a chunk, so the
    number of blocks does not enter."""
    return max([c for c in range(1, rows_per_block + 1) if rows_per_block % c == 0 and c * row_bytes <= budget]
               or [1])


def per_row_bucket_gradients(row_loss_fn: RowLossFn, params: Any, batch: Corrupted, buckets_B: jax.Array,
                             halves: bool = False, blocks: int = 1,
                             row_gradient_bytes: int = CPU_ROW_GRADIENT_BYTES) -> BucketGradients:
    """`bucket_gradients` for rows whose buckets are data (`buckets_B`), not a static layout.

    Every row's gradient is taken on its own (a `jax.vmap` of per-row `jax.grad`s) and
    summed into its bucket's, and with `halves` into its half's (even or odd position in its
    block), by one contraction with the rows' one-hot groups: the same FLOPs as one pass
    over the batch, with only the weight gradients' GEMMs split by row. The rows go through
    in chunks of at most `row_gradient_bytes` of per-row gradients per device (`row_gradient_budget`;
    on a CPU, base.py: one chunk per microbatch of 4 rows, or 8 rows at a time without
    accumulation; GPT-2 small, a row at a time), each chunk
    taking the same positions of every one of the `blocks` (the batch's shards), so every
    device works on its own rows. Without `halves` the second value is |∇L|² of all
    these rows (a microbatch: the noise scale's small batch).

    Measured on base.py under iid sampling (`docs/performance.md`): 0.75–1.1× a bare step,
    where pulling one shared forward pass's VJP back per bucket mask took 2.0–2.5×. Each
    row runs through the model as a batch of one, which is why the model never keeps a
    batch dimension of its own (`Denoiser.residual_stream`): XLA:CPU's fusions run about
    10× slower on arrays with a dimension of size 1.
    """
    num_groups = len(BUCKETS) + (2 if halves else 0)
    rows = buckets_B.shape[0]
    blocks = blocks if rows % blocks == 0 else 1
    per_block = rows // blocks
    chunk = rows_per_chunk(per_block, 4 * sum(x.size for x in jax.tree.leaves(params)), row_gradient_bytes)
    index_B = jnp.arange(rows) % per_block  # the row's position within its block
    groups_B = [buckets_B == b for b in range(len(BUCKETS))] + ([index_B % 2 == h for h in (0, 1)] if halves else [])
    groups_GxB = jnp.stack(groups_B).astype(jnp.float32)

    def chunks(x):  # [rows, ...] -> [chunks, blocks · chunk, ...]: chunk i is positions i·c … of every block
        x = x.reshape(blocks, per_block // chunk, chunk, *x.shape[1:]).swapaxes(0, 1)
        return x.reshape(per_block // chunk, blocks * chunk, *x.shape[3:])

    def unchunk(x):  # the inverse of `chunks`
        x = x.reshape(per_block // chunk, blocks, chunk, *x.shape[2:]).swapaxes(0, 1)
        return x.reshape(rows, *x.shape[3:])

    def row_gradient(row: Corrupted):
        one = jax.tree.map(lambda x: x[None], row)
        grad, (loss, scores) = jax.grad(lambda p: summed(row_loss_fn(p, one)), has_aux=True)(params)
        return grad, {"rows": loss[0], **jax.tree.map(lambda x: x[0], row_statistics(scores, one))}

    def add_chunk(sums, chunk_xs):
        rows_chunk, groups_chunk = chunk_xs
        if blocks * chunk == 1:  # one row: no vmap, whose axis of size 1 would slow XLA:CPU's fusions
            grads, per_row = jax.tree.map(lambda x: x[None], row_gradient(jax.tree.map(lambda x: x[0], rows_chunk)))
        else:
            grads, per_row = jax.vmap(row_gradient)(rows_chunk)
        return jax.tree.map(lambda s, g: s + jnp.tensordot(groups_chunk, g, axes=1), sums, grads), per_row

    zeros = jax.tree.map(lambda x: jnp.zeros((num_groups, *x.shape), x.dtype), params)
    sums, per_row = jax.lax.scan(add_chunk, zeros, (jax.tree.map(chunks, batch), chunks(groups_GxB.T).swapaxes(1, 2)))
    group = lambda g: jax.tree.map(lambda x: x[g], sums)
    grads = [group(b) for b in range(len(BUCKETS))]
    if halves:
        small_sq = squared_norm(group(len(BUCKETS))) + squared_norm(group(len(BUCKETS) + 1))
    else:
        small_sq = squared_norm(jax.tree.map(lambda *gs: sum(gs), *grads))
    per_row = jax.tree.map(unchunk, per_row)
    return grads, small_sq, per_row.pop("rows"), per_row


def squared_norm(tree: Any) -> jax.Array:
    return sum(jnp.vdot(x, x) for x in jax.tree.leaves(tree)).astype(jnp.float32)


def summed(rows_and_aux: tuple[jax.Array, Any]) -> tuple[jax.Array, tuple[jax.Array, Any]]:
    """(Σ rows, (rows, aux)): a row-loss function's output in the form jax.grad(has_aux) takes."""
    rows, aux = rows_and_aux
    return rows.sum(), (rows, aux)


def difficulty_rows(scores: TokenScores, batch: Corrupted) -> dict[str, jax.Array]:
    """Per-row sums of the prediction difficulty 1 − max_v p(v) over masked valid tokens, and
    its per-row centred second moment Σ (d − d̄_row)²: what the weight–difficulty statistics
    need of the scores (see `tier1.correct_rows` for why the step reduces them to rows).

    Centring within the row keeps the variance exact when difficulties are nearly equal (an
    untrained model's are all ≈ 1 − 1/V), where E[d²] − E[d]² in float32 would cancel.
    """
    difficulty_BxL = 1.0 - jnp.exp(scores.max_log_prob_BxL)
    masked_BxL = batch.masked_BxL
    sum_B = jnp.where(masked_BxL, difficulty_BxL, 0.0).sum(axis=-1)
    mean_B = sum_B / jnp.maximum(masked_BxL.sum(axis=-1), 1)
    m2_B = jnp.where(masked_BxL, (difficulty_BxL - mean_B[:, None]) ** 2, 0.0).sum(axis=-1)
    return {"difficulty_sum_B": sum_B, "difficulty_m2_B": m2_B}


def row_statistics(scores: TokenScores, batch: Corrupted) -> dict[str, jax.Array]:
    """Everything `research_metrics` needs of the scores, as per-row sums."""
    return {"correct_B": correct_rows(scores, batch), **difficulty_rows(scores, batch)}


def research_metrics(rows: dict[str, jax.Array], batch: Corrupted, process: ForwardProcess,
                     row_losses_B: jax.Array, grads_by_bucket: list[Any]) -> dict[str, jax.Array]:
    """All tier-2 metrics of one global batch but the noise scale's; names as in the metrics guide.

    `rows` holds the per-row sums of `row_statistics`. Statistics over tokens or sequences
    weight each sequence by its unbiasing factor (`unbias_B`), so that they estimate their
    value under t ~ U[t_min, 1] whatever the time-sampling design (`tier1.tier1_metrics`).
    """
    buckets_B = row_buckets(process, batch)
    u_B = batch.unbias_B
    masked_B = batch.masked_BxL.sum(axis=-1).astype(jnp.float32)
    norms = [optax.tree.norm(g) for g in grads_by_bucket]
    total_grad = jax.tree.map(lambda *gs: sum(gs), *grads_by_bucket)
    per_token_B = per_token_losses(row_losses_B, batch)
    out = {}
    for b, bucket in enumerate(BUCKETS):
        in_bucket_B = buckets_B == b
        out[bucket_name(names.BUCKET_ACCURACY, bucket)] = safe_ratio(
            jnp.where(in_bucket_B, u_B * rows["correct_B"], 0.0).sum(), jnp.where(in_bucket_B, u_B * masked_B, 0).sum())
        out[bucket_name(names.BUCKET_COUNT, bucket)] = in_bucket_B.sum().astype(jnp.float32)
        out[bucket_name(names.BUCKET_LOSS, bucket)] = jnp.where(in_bucket_B, row_losses_B, 0.0).sum()
        out[bucket_name(names.BUCKET_LOSS_STD, bucket)] = weighted_std(per_token_B, u_B, in_bucket_B & has_valid(batch))
        out[bucket_name(names.BUCKET_GRADIENT_NORM, bucket)] = norms[b]
    out[names.GRADIENT_NORM_TOTAL] = optax.tree.norm(total_grad)
    low_is_empty = out[bucket_name(names.BUCKET_COUNT, BUCKETS[0])] == 0
    out[names.GRADIENT_RATIO] = jnp.where(
        low_is_empty, jnp.nan, safe_ratio(norms[-1], norms[0]))
    out[names.LOSS_ESTIMATOR_STDERR] = loss_estimator_stderr(row_losses_B, process, buckets_B)
    out.update(weight_difficulty_metrics(rows, batch))
    return out


def has_valid(batch: Corrupted) -> jax.Array:
    return batch.valid_BxL.any(axis=-1)


def per_token_losses(row_losses_B: jax.Array, batch: Corrupted) -> jax.Array:
    """Each sequence's weighted loss per valid token, w(t)·Σ CE / its valid tokens, without the
    design's unbiasing factor (0 for a row without valid tokens).

    `row_losses_B` are the rows' NELBO contributions u·w·Σ CE / (the batch's valid tokens)."""
    scale_B = num_valid_tokens(batch) / (batch.unbias_B * batch.valid_BxL.sum(axis=-1))
    return jnp.where(has_valid(batch) & (batch.unbias_B > 0), row_losses_B * scale_B, 0.0)


def weighted_std(x_B: jax.Array, weight_B: jax.Array, where_B: jax.Array) -> jax.Array:
    """The standard deviation of x over the rows `where_B`, each weighted by `weight_B` (the
    population under t ~ U[t_min, 1], as the other statistics); missing with fewer than 2 rows."""
    w_B = jnp.where(where_B, weight_B, 0.0)
    mean = safe_ratio((w_B * x_B).sum(), w_B.sum())
    var = safe_ratio((w_B * jnp.where(where_B, x_B - mean, 0.0) ** 2).sum(), w_B.sum())
    return jnp.where(where_B.sum() >= 2, jnp.sqrt(var), jnp.nan)


def loss_estimator_stderr(row_losses_B: jax.Array, process: ForwardProcess, buckets_B: jax.Array) -> jax.Array:
    """The standard error of train/loss = Σ_i r_i as an estimate of the NELBO, from the rows'
    contributions r_i themselves (the valid-token denominator taken as fixed).

    Stratified with static buckets, the buckets are the strata of the estimator's variance
    formula, Var = Σ_b n_b·S_b² (S_b² the sample variance of r within bucket b); the finer
    strata inside a bucket lower the true variance further, so this is an upper bound. Under
    iid or adaptive sampling (and for a bucket with fewer than 2 rows) the rows count as
    independent draws: Var = B·S². Missing for a batch of one row.
    """
    batch_size = row_losses_B.shape[0]

    def spread(in_group_B):  # n·S² of the rows in the group
        n = in_group_B.sum()
        mean = jnp.where(in_group_B, row_losses_B, 0.0).sum() / jnp.maximum(n, 1)
        m2 = jnp.where(in_group_B, (row_losses_B - mean) ** 2, 0.0).sum()
        return jnp.where(n >= 2, n * m2 / jnp.maximum(n - 1, 1), 0.0)

    everything = spread(jnp.ones((batch_size,), bool))
    if process.static_buckets and all(n >= 2 for n in process.plan.counts if n):
        everything = sum(spread(buckets_B == b) for b in range(len(BUCKETS)))
    return jnp.where(batch_size >= 2, jnp.sqrt(everything), jnp.nan)


def noise_scale_metrics(big_sq: jax.Array, small_sq_sum: jax.Array, *, num_small: int, batch_size: int
                        ) -> dict[str, jax.Array]:
    """The simple gradient noise scale B_simple = tr(Σ)/|G|² (McCandlish et al. 2018, app. A),
    estimated without bias from the squared gradient norms at two batch sizes.

    `big_sq` is |G_B|², the batch gradient's; `small_sq_sum` is Σ_s |g_s|² over `num_small`
    equal disjoint parts s of the batch (microbatches, or its two halves), each gradient
    taken with the whole batch's denominator, so n·g_s estimates the gradient from B/n rows.
    With b = B/n: E|G_b|² = |G|² + tr(Σ)/b, which the two sizes solve:
      |G|²  ≈ (n·|G_B|² − |G_b|²) / (n − 1),   tr(Σ) ≈ B·(|G_b|² − |G_B|²) / (n − 1),
    where |G_b|² = n·Σ_s |g_s|² is their mean squared norm. tr(Σ) is per sequence, so B_simple
    is in sequences. One step's ratio is noisy (|G|² can even come out negative: then it is
    missing); the ratio of the two components' means over steps is the steady estimate.
    """
    n = float(num_small)
    small_sq = n * small_sq_sum
    signal = (n * big_sq - small_sq) / (n - 1.0)
    trace = batch_size * (small_sq - big_sq) / (n - 1.0)
    return {names.GRADIENT_SIGNAL: signal, names.GRADIENT_NOISE_TRACE: trace,
            names.GRADIENT_NOISE_SCALE: jnp.where(signal > 0, trace / jnp.where(signal > 0, signal, 1.0), jnp.nan)}


def row_constant_pearson(x_B: jax.Array, count_B: jax.Array, y_sum_B: jax.Array, y_m2_B: jax.Array
                         ) -> jax.Array:
    """Pearson correlation over tokens of x, constant within each row, and a per-token y
    known through per-row statistics: row b has `count_B[b]` tokens, whose y values sum to
    `y_sum_B[b]` and have centred second moment `y_m2_B[b]` = Σ (y − ȳ_b)². NaN if undefined.
    With tokens weighted per row (the design's unbiasing factors), pass the weighted sums:
    counts, sums and second moments each times the row's weight.

    Every product is formed from exactly centred values (the pooled variance of y by Chan's
    parallel formula), so no large sums cancel in float32.
    """
    count_B = count_B.astype(jnp.float32)
    n = count_B.sum()
    dx_B = x_B - safe_ratio((x_B * count_B).sum(), n)
    mean_y = safe_ratio(y_sum_B.sum(), n)
    dy_sum_B = y_sum_B - count_B * mean_y  # Σ over row b of (y − ȳ)
    row_mean_y_B = jnp.where(count_B > 0, y_sum_B / jnp.where(count_B > 0, count_B, 1.0), 0.0)
    var_x = (count_B * dx_B ** 2).sum()
    var_y = y_m2_B.sum() + (count_B * (row_mean_y_B - mean_y) ** 2).sum()
    return safe_ratio((dx_B * dy_sum_B).sum(), jnp.sqrt(var_x * var_y))


def weight_difficulty_metrics(rows: dict[str, jax.Array], batch: Corrupted) -> dict[str, jax.Array]:
    """Statistics over the masked valid tokens of the batch, each token weighted by its
    sequence's unbiasing factor (so they estimate their value under t ~ U[t_min, 1]).

    A token's weight is its sequence's w(t); its difficulty is 1 − max_v p(v), the model's
    uncertainty at that position (summed per row in `rows`, see `difficulty_rows`).
    weight_std is the population standard deviation.
    """
    u_B = batch.unbias_B
    masked_B = u_B * batch.masked_BxL.sum(axis=-1).astype(jnp.float32)  # design-weighted token counts
    n = masked_B.sum()
    mean_weight = safe_ratio((batch.weight_B * masked_B).sum(), n)
    weight_var = safe_ratio((masked_B * (batch.weight_B - mean_weight) ** 2).sum(), n)
    return {
        names.WEIGHT_DIFFICULTY: row_constant_pearson(
            batch.weight_B, masked_B, u_B * rows["difficulty_sum_B"], u_B * rows["difficulty_m2_B"]),
        names.AVG_LOSS_WEIGHT: mean_weight,
        names.WEIGHT_STD: jnp.sqrt(weight_var),
        names.AVG_PREDICTION_DIFFICULTY: safe_ratio((u_B * rows["difficulty_sum_B"]).sum(), n),
    }
