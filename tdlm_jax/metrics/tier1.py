"""Tier-1 (essential) metrics, computed inside the jitted step over the global batch.

Every ratio is pooled over the global batch (total correct / total masked), never a mean
of per-device means. A ratio with an empty denominator is NaN on the device and is
written as missing (the catalogue's `missing`, `tdlm_jax.metrics.catalogue`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tdlm_jax.diffusion.corruption import Corrupted
from tdlm_jax.diffusion.loss import correct_predictions
from tdlm_jax.metrics import catalogue as names
from tdlm_jax.model.head import TokenScores


def safe_ratio(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """numerator / denominator, or NaN ("missing") when the denominator is 0."""
    denominator = jnp.asarray(denominator, jnp.float32)
    return jnp.where(denominator > 0, numerator / jnp.where(denominator > 0, denominator, 1.0), jnp.nan)


def correct_rows(scores: TokenScores, batch: Corrupted) -> jax.Array:
    """float32[B]: each row's correct argmax predictions at masked valid positions.

    The train step reduces its scores to per-row sums like this one right after each forward
    pass, so that under gradient accumulation a microbatch's per-position values can be
    dropped; the pooled metrics are then computed once over the global batch's rows.
    """
    return correct_predictions(scores.predicted_BxL, batch).sum(axis=-1).astype(jnp.float32)


def tier1_metrics(correct_B: jax.Array, batch: Corrupted) -> dict[str, jax.Array]:
    """metrics/mask_accuracy, metrics/total_masked_tokens and metrics/valid_ratio.

    - mask_accuracy: correct argmax predictions / masked valid tokens (`correct_B` is
      `correct_rows` of the batch's scores).
    - total_masked_tokens: masked valid tokens in the global batch (a count, as drawn).
    - valid_ratio: of all positions whose mask was drawn, the share that are real tokens
      (not padding). 1.0 on packed data; low values mean the batch is mostly padding.

    The two ratios estimate their value under t ~ U[t_min, 1] whatever the time-sampling
    design: each sequence's counts are weighted by its unbiasing factor (`unbias_B`: the
    stratification factor, or p(t)/q(t) under adaptive sampling; 1 under iid sampling), as
    the loss is. Otherwise a stratified batch, whose buckets are not sampled in exact
    proportion, would describe its own design.
    """
    num_masked = batch.masked_BxL.sum().astype(jnp.float32)
    masked_B = batch.masked_BxL.sum(axis=-1).astype(jnp.float32)
    u_B = batch.unbias_B
    return {
        names.MASK_ACCURACY: safe_ratio((u_B * correct_B).sum(), (u_B * masked_B).sum()),
        names.TOTAL_MASKED_TOKENS: num_masked,
        names.VALID_RATIO: safe_ratio((u_B * masked_B).sum(), (u_B * batch.drawn_BxL.sum(axis=-1)).sum()),
    }
