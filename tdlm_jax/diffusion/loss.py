"""The reverse-process objective: the NELBO of masked diffusion.

NELBO estimate = Σ_{sequences} w(t)·Σ_{masked valid tokens} CE / (number of valid tokens),

in nats per token. With the exact weight w(t) = −α′/(1 − α) and t ~ U[t_min, 1], a
predictor that is uniform over the V predictable tokens scores exactly log V for the linear
schedule, since E_t[w(t)·(1 − α(t))] = 1 there. The denominator counts valid tokens of the
whole (global) batch, so the loss is a pooled average, never a mean of per-device means.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from tdlm_jax.diffusion.corruption import Corrupted
from tdlm_jax.model.head import TokenScores


def scoring_targets(batch: Corrupted) -> jax.Array:
    """The ids the model is scored against: the clean token at masked valid positions, id 0
    elsewhere. Unscored positions may hold [PAD], whose logit is −inf; scoring a predictable
    id there keeps every intermediate finite, so no inf·0 can turn into a NaN gradient."""
    return jnp.where(batch.masked_BxL, batch.tokens_BxL, 0)


def batch_scores(model: Callable, batch: Corrupted) -> TokenScores:
    """The denoiser's scores (`Denoiser.scores`: −log p, argmax, max log-prob) of `batch`
    against `scoring_targets`, computed without holding the whole logits."""
    return model.scores(batch.noisy_BxL, batch.valid_BxL, batch.t_B, scoring_targets(batch))


def weighted_token_losses(nll_BxL: jax.Array, batch: Corrupted) -> jax.Array:
    """w(t)·CE at masked valid positions and 0 elsewhere: the summands of the NELBO, from
    −log p(token) against `scoring_targets(batch)` (`TokenScores.nll_BxL`)."""
    return jnp.where(batch.masked_BxL, (batch.weight_B * batch.unbias_B)[:, None] * nll_BxL, 0.0)


def num_valid_tokens(batch: Corrupted) -> jax.Array:
    """The NELBO's denominator; at least 1 so that an all-padding batch gives 0, not NaN."""
    return jnp.maximum(batch.valid_BxL.sum(), 1).astype(jnp.float32)


def correct_predictions(predicted_BxL: jax.Array, batch: Corrupted) -> jax.Array:
    """True where the argmax prediction (`TokenScores.predicted_BxL`) equals the target at a
    masked valid position."""
    return (predicted_BxL == batch.tokens_BxL) & batch.masked_BxL
