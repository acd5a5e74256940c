"""Tier-2 (research) metrics: corruption buckets, weight–difficulty statistics, and
per-bucket gradient norms. Computed inside the detailed variant of the jitted train step.

Buckets. A sequence's corruption level is its masking rate m = 1 − α(t). With edges
(0, 0.3, 0.7, 1): low is [0, 0.3), medium [0.3, 0.7), high [0.7, 1] (the last bucket
includes its upper edge).

Per-bucket gradients. L_b is the NELBO restricted to the sequences of bucket b and divided
by the same denominator as the full loss (the number of valid tokens of the whole batch),
so Σ_b L_b = L and Σ_b ∇L_b = ∇L. Each ∇L_b is a gradient of its own loss, never a share
of the total:
- With 'stratified' time sampling (the default) bucket membership is fixed by row index
  (`tdlm_jax.diffusion.corruption`), so each ∇L_b is a separate `jax.grad` over that
  bucket's rows alone. The three sub-batch passes together cost about one full pass, and
  the update uses their sum, which is ∇L: the detailed step costs little more than an
  ordinary one and applies the same update (equal up to float summation order).
- With 'iid' time sampling membership is random, so one forward pass is shared and its
  VJP is pulled back three times, once per bucket-masked cotangent (1 forward + 3
  backward passes). The update again uses the sum of the three.
Neither path changes the estimator: the loss is the same unbiased NELBO estimate as in
the ordinary step.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from tdlm_jax.diffusion.corruption import Corrupted, ForwardProcess
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
        return jnp.concatenate([jnp.full((stop - start,), b, jnp.int32)
                                for b, (start, stop) in enumerate(process.plan.rows)])
    return bucket_index(batch.mask_rate_B, process.bucket_edges)


def bucket_gradients(row_loss_fn: RowLossFn, params: Any, batch: Corrupted, process: ForwardProcess
                     ) -> tuple[list[Any], jax.Array, jax.Array]:
    """∇θ L_b for every bucket, by separate gradient computations of bucket-restricted losses.

    Returns (gradients by bucket, per-row losses float32[B], TokenScores [B, L]).
    """
    if not process.static_buckets:
        return masked_bucket_gradients(row_loss_fn, params, batch, row_buckets(process, batch))
    grads, row_losses, scores = [], [], []
    for start, stop in process.plan.rows:
        if stop == start:  # a bucket with no rows has a zero gradient
            grads.append(jax.tree.map(jnp.zeros_like, params))
            continue
        sub_batch = batch.rows(start, stop)
        bucket_loss = lambda p: summed(row_loss_fn(p, sub_batch))
        grad_b, (rows_b, scores_b) = jax.grad(bucket_loss, has_aux=True)(params)
        grads.append(grad_b)
        row_losses.append(rows_b)
        scores.append(scores_b)
    return grads, jnp.concatenate(row_losses), jax.tree.map(lambda *rows: jnp.concatenate(rows), *scores)


def masked_bucket_gradients(row_loss_fn: RowLossFn, params: Any, batch: Corrupted, buckets_B: jax.Array
                            ) -> tuple[list[Any], jax.Array, jax.Array]:
    """`bucket_gradients` for rows whose buckets are data (`buckets_B`), not a static layout:
    one forward pass, and its VJP pulled back once per bucket-masked cotangent."""
    rows_B, pullback, scores = jax.vjp(lambda p: row_loss_fn(p, batch), params, has_aux=True)
    grads = [pullback((buckets_B == b).astype(rows_B.dtype))[0] for b in range(len(BUCKETS))]
    return grads, rows_B, scores


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
    """All tier-2 metrics of one global batch; names as in the metrics guide.

    `rows` holds the per-row sums of `row_statistics`.
    """
    buckets_B = row_buckets(process, batch)
    masked_B = batch.masked_BxL.sum(axis=-1)
    norms = [optax.tree.norm(g) for g in grads_by_bucket]
    total_grad = jax.tree.map(lambda *gs: sum(gs), *grads_by_bucket)
    out = {}
    for b, bucket in enumerate(BUCKETS):
        in_bucket_B = buckets_B == b
        out[bucket_name(names.BUCKET_ACCURACY, bucket)] = safe_ratio(
            jnp.where(in_bucket_B, rows["correct_B"], 0.0).sum(), jnp.where(in_bucket_B, masked_B, 0).sum())
        out[bucket_name(names.BUCKET_COUNT, bucket)] = in_bucket_B.sum().astype(jnp.float32)
        out[bucket_name(names.BUCKET_LOSS, bucket)] = jnp.where(in_bucket_B, row_losses_B, 0.0).sum()
        out[bucket_name(names.BUCKET_GRADIENT_NORM, bucket)] = norms[b]
    out[names.GRADIENT_NORM_TOTAL] = optax.tree.norm(total_grad)
    low_is_empty = out[bucket_name(names.BUCKET_COUNT, BUCKETS[0])] == 0
    out[names.GRADIENT_RATIO] = jnp.where(
        low_is_empty, jnp.nan, safe_ratio(norms[-1], norms[0]))
    out.update(weight_difficulty_metrics(rows, batch))
    return out


def row_constant_pearson(x_B: jax.Array, count_B: jax.Array, y_sum_B: jax.Array, y_m2_B: jax.Array
                         ) -> jax.Array:
    """Pearson correlation over tokens of x, constant within each row, and a per-token y
    known through per-row statistics: row b has `count_B[b]` tokens, whose y values sum to
    `y_sum_B[b]` and have centred second moment `y_m2_B[b]` = Σ (y − ȳ_b)². NaN if undefined.

    Every product is formed from exactly centred values (the pooled variance of y by Chan's
    parallel formula), so no large sums cancel in float32.
    """
    count_B = count_B.astype(jnp.float32)
    n = count_B.sum()
    dx_B = x_B - safe_ratio((x_B * count_B).sum(), n)
    mean_y = safe_ratio(y_sum_B.sum(), n)
    dy_sum_B = y_sum_B - count_B * mean_y  # Σ over row b of (y − ȳ)
    row_mean_y_B = y_sum_B / jnp.maximum(count_B, 1.0)
    var_x = (count_B * dx_B ** 2).sum()
    var_y = y_m2_B.sum() + (count_B * (row_mean_y_B - mean_y) ** 2).sum()
    return safe_ratio((dx_B * dy_sum_B).sum(), jnp.sqrt(var_x * var_y))


def weight_difficulty_metrics(rows: dict[str, jax.Array], batch: Corrupted) -> dict[str, jax.Array]:
    """Statistics over the masked valid tokens of the batch.

    A token's weight is its sequence's w(t); its difficulty is 1 − max_v p(v), the model's
    uncertainty at that position (summed per row in `rows`, see `difficulty_rows`).
    weight_std is the population standard deviation.
    """
    masked_B = batch.masked_BxL.sum(axis=-1).astype(jnp.float32)
    n = masked_B.sum()
    mean_weight = safe_ratio((batch.weight_B * masked_B).sum(), n)
    weight_var = safe_ratio((masked_B * (batch.weight_B - mean_weight) ** 2).sum(), n)
    return {
        names.WEIGHT_DIFFICULTY: row_constant_pearson(
            batch.weight_B, masked_B, rows["difficulty_sum_B"], rows["difficulty_m2_B"]),
        names.AVG_LOSS_WEIGHT: mean_weight,
        names.WEIGHT_STD: jnp.sqrt(weight_var),
        names.AVG_PREDICTION_DIFFICULTY: safe_ratio(rows["difficulty_sum_B"].sum(), n),
    }
