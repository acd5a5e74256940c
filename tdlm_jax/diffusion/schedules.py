"""Noise schedules α(t) of the absorbing-state (masking) forward process.

α(t) is the probability that a token is still clean at time t ∈ [0, 1]; a token is
masked with probability 1 − α(t). Every schedule here has α(0) = 1 and α(1) = 0 (up to
the log-linear schedule's ε, as in MDLM), is strictly decreasing, and has an inverse,
which the bucket-aligned time sampler needs to map masking-rate edges to times.

The exact continuous-time ELBO weight is w(t) = −α′(t) / (1 − α(t)) (MDLM eq. 10, MD4
eq. 5); for the linear schedule it is 1/t, LLaDA's weight.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

SCHEDULES = ("linear", "cosine", "polynomial", "loglinear")

# MDLM's log-linear noise: σ(t) = −log(1 − (1 − ε) t), so α(t) = 1 − (1 − ε) t and a
# token keeps a probability ε of being clean at t = 1.
LOGLINEAR_EPS = 1e-3


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A masking schedule. `name` is one of SCHEDULES; `power` is used by 'polynomial'."""

    name: str = "linear"
    power: float = 2.0

    def __post_init__(self):
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.name!r}; allowed: {', '.join(SCHEDULES)}")

    def alpha(self, t):
        """Probability that a token is clean at time t."""
        if self.name == "linear":
            return 1.0 - t
        if self.name == "cosine":
            return jnp.cos(0.5 * math.pi * t)
        if self.name == "polynomial":
            return 1.0 - t**self.power
        return 1.0 - (1.0 - LOGLINEAR_EPS) * t

    def dalpha(self, t):
        """dα/dt, in closed form so the weights are exact rather than finite differences."""
        if self.name == "linear":
            return -jnp.ones_like(t)
        if self.name == "cosine":
            return -0.5 * math.pi * jnp.sin(0.5 * math.pi * t)
        if self.name == "polynomial":
            return -self.power * t ** (self.power - 1.0)
        return -(1.0 - LOGLINEAR_EPS) * jnp.ones_like(t)

    def elbo_weight(self, t):
        """w(t) = −α′(t) / (1 − α(t)), the exact ELBO weight of a masked token at time t."""
        return -self.dalpha(t) / (1.0 - self.alpha(t))

    def time_at_mask_rate(self, m: float) -> float:
        """The time t at which the masking rate 1 − α(t) equals m (host-side, Python floats).

        Rates above the schedule's largest rate map past t = 1, which callers clip.
        """
        if self.name == "linear":
            return m
        if self.name == "cosine":
            return 2.0 / math.pi * math.acos(min(max(1.0 - m, -1.0), 1.0))
        if self.name == "polynomial":
            return m ** (1.0 / self.power)
        return m / (1.0 - LOGLINEAR_EPS)


def loss_weight(schedule: Schedule, t, weighting: str, clip_max: float):
    """Per-sequence loss weight for the chosen objective.

    'elbo' is the exact NELBO weight. 'uniform' (w = 1) and 'clipped' (min(w, clip_max))
    are ablations: with them the loss is no longer a bound on the likelihood, which is why
    evaluation always uses the exact weight.
    """
    w = schedule.elbo_weight(t)
    if weighting == "elbo":
        return w
    if weighting == "uniform":
        return jnp.ones_like(w)
    if weighting == "clipped":
        return jnp.minimum(w, clip_max)
    raise ValueError(f"unknown loss weighting {weighting!r}; allowed: elbo, uniform, clipped")
