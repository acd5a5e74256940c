"""The reverse-process objective: the NELBO of masked diffusion.

NELBO estimate = Σ_{sequences} w(t)·Σ_{masked valid tokens} CE / (number of valid tokens),

in nats per token. With the exact weight w(t) = −α′/(1 − α) and t ~ U[t_min, 1], a
predictor that is uniform over the V predictable tokens scores exactly log V for the linear
schedule, since E_t[w(t)·(1 − α(t))] = 1 there. The denominator counts valid tokens of the
whole (global) batch, so the loss is a pooled average, never a mean of per-device means.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tdlm_jax.diffusion.corruption import Corrupted


def token_cross_entropy(logits_BxLxV: jax.Array, tokens_BxL: jax.Array) -> jax.Array:
    """−log p(token) at every position, in float32 whatever the compute dtype."""
    log_probs = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(log_probs, tokens_BxL[..., None], axis=-1)[..., 0]


def weighted_token_losses(logits_BxLxV: jax.Array, batch: Corrupted) -> jax.Array:
    """w(t)·CE at masked valid positions and 0 elsewhere: the summands of the NELBO."""
    # Unscored positions may hold [PAD], whose logit is −inf; scoring id 0 there instead
    # keeps every intermediate finite, so no inf·0 can turn into a NaN gradient.
    targets_BxL = jnp.where(batch.masked_BxL, batch.tokens_BxL, 0)
    ce_BxL = token_cross_entropy(logits_BxLxV, targets_BxL)
    return jnp.where(batch.masked_BxL, (batch.weight_B * batch.unbias_B)[:, None] * ce_BxL, 0.0)


def num_valid_tokens(batch: Corrupted) -> jax.Array:
    """The NELBO's denominator; at least 1 so that an all-padding batch gives 0, not NaN."""
    return jnp.maximum(batch.valid_BxL.sum(), 1).astype(jnp.float32)


def correct_predictions(logits_BxLxV: jax.Array, batch: Corrupted) -> jax.Array:
    """True where the argmax prediction equals the target at a masked valid position."""
    return (jnp.argmax(logits_BxLxV, axis=-1) == batch.tokens_BxL) & batch.masked_BxL
