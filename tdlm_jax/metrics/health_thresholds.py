"""The thresholds of the health rules (`config.health`), checked when they are read.

Defaults follow the metrics guide except where it contradicts a healthy run of
`configs/base.py` (see `HealthThresholds`): a rule that fires on healthy training is a bug
in the rule.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

from tdlm_jax.errors import ConfigError

WEIGHT_DIFFICULTY_SIGNS = ("negative", "positive", "any")


@dataclasses.dataclass(frozen=True)
class HealthThresholds:
    """Every threshold of the health rules; `configs/base.py` mirrors these defaults.

    Deviations from the guide, measured on the healthy 1000-step base run:
    - mask accuracy: the guide's 40% floor alone would fire all run long (0.15 at step 100,
      0.29 at step 1000, still rising), so the rule also needs stagnation.
    - weight–difficulty correlation: ELBO weights w(t) shrink as masking grows, i.e. they
      are largest on the easiest tokens, so a correct run is negative (−0.30 at step 500,
      −0.29 at step 1000); the guide's "negative = collapse" would fire on it. The rule
      flags the sign opposite to `expected_weight_difficulty_sign`.
    - avg loss weight: the guide's healthy 1–3 is what the objective gives (1.99, 1.89
      measured; 2 in theory for the linear schedule) but the polynomial schedule sits at
      exactly k + 1 = 3, so only clearly extreme values outside [0.5, 10] fire.
    - hidden-state norm: the guide's 1–10 would fire all run long. The metric is the L2
      norm of the d_model-wide pre-norm residual stream: 12.6 at initialization (≈ √128),
      49.4 at step 500, 42.4 at step 1000 (base checkpoints, validation batches), so only
      vanishing (< 0.1) or exploding (> 1000) values fire.
    - sequence diversity is judged relative to the hidden-state norm: the raw value fell
      2.86 → 2.68 from step 500 to 1000 only because the norm fell 49.4 → 42.4 (the
      ratio rose 0.058 → 0.063), and the final RMSNorm hides that scale from the model.
    - trends (attention entropy, diversity) ignore points before `warmup_steps`: attention
      entropy falls 4.50 → 1.23 in the first 500 steps of healthy learning, then holds
      (1.27 at step 1000).
    """

    # Rules on learning progress (accuracies, trends, correlation) ignore earlier points:
    # before this step accuracies are near chance and every trend is "learning".
    warmup_steps: int = 500
    # High-corruption accuracy may exceed medium by this much (sampling noise) before firing.
    bucket_order_margin: float = 0.05
    mask_accuracy_floor: float = 0.4
    stagnation_window: int = 5  # logged mask-accuracy points
    stagnation_min_improvement: float = 0.005  # absolute gain over the window
    # The gradient rules judge the median of this many research logs: one batch's bucket
    # gradient is noisy, since an exact ELBO weight reaches 1/t_min (a healthy base run showed
    # a single low-bucket spike to 2.2, ratio 0.07, between ratios of 0.37 and 0.20).
    gradient_window: int = 3
    gradient_ratio_min: float = 0.1
    gradient_ratio_max: float = 10.0
    high_gradient_norm_min: float = 0.01
    low_gradient_norm_max: float = 5.0
    hidden_state_norm_min: float = 0.1
    hidden_state_norm_max: float = 1000.0
    trend_window: int = 5  # logged tier-3 points that must be strictly decreasing
    trend_min_drop: float = 0.25  # and fall by more than this fraction in total
    overfit_window: int = 4  # validation points of rising val/loss and a widening gap
    loss_weight_min: float = 0.5
    loss_weight_max: float = 10.0
    # research/loss_estimator_stderr over the step's loss (median of gradient_window logs): a
    # healthy base.py run (batch 32, exact ELBO weight) logged 0.037–0.083.
    loss_stderr_fraction_max: float = 0.25
    expected_weight_difficulty_sign: str = "negative"
    # The correlation may lie this far on the unexpected side of 0 before firing.
    weight_difficulty_margin: float = 0.1

    def __post_init__(self) -> None:
        for name, ok, allowed in _CHECKS:
            value = getattr(self, name)
            if not ok(value):
                raise ConfigError(f"config error: health.{name}={value!r}: {allowed}")
        for low, high in _ORDERED:
            if not getattr(self, low) < getattr(self, high):
                raise ConfigError(f"config error: health.{high}={getattr(self, high)!r}: "
                                  f"must be greater than health.{low} ({getattr(self, low)!r})")
        # Ints are fine in a config file for float thresholds; store floats all the same.
        for field in dataclasses.fields(self):
            if isinstance(field.default, float):
                object.__setattr__(self, field.name, float(getattr(self, field.name)))


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _window(value: Any) -> bool:
    return _is_int(value) and value >= 2


def _positive(value: Any) -> bool:
    return _is_finite(value) and value > 0


def _fraction(value: Any) -> bool:
    return _is_finite(value) and 0 <= value < 1


def _non_negative(value: Any) -> bool:
    return _is_finite(value) and value >= 0


# (field, predicate, what is allowed): checked in this order, the first failure is reported.
_CHECKS: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("warmup_steps", lambda v: _is_int(v) and v >= 0, "must be an integer >= 0"),
    ("bucket_order_margin", _non_negative, "must be a number >= 0"),
    ("mask_accuracy_floor", lambda v: _is_finite(v) and 0 <= v <= 1, "must be in [0, 1]"),
    ("stagnation_window", _window, "must be an integer >= 2"),
    ("stagnation_min_improvement", _non_negative, "must be a number >= 0"),
    ("gradient_window", lambda v: _is_int(v) and v >= 1, "must be an integer >= 1"),
    ("gradient_ratio_min", _positive, "must be positive"),
    ("gradient_ratio_max", _positive, "must be positive"),
    ("high_gradient_norm_min", _positive, "must be positive"),
    ("low_gradient_norm_max", _positive, "must be positive"),
    ("hidden_state_norm_min", _positive, "must be positive"),
    ("hidden_state_norm_max", _positive, "must be positive"),
    ("trend_window", _window, "must be an integer >= 2"),
    ("loss_stderr_fraction_max", _positive, "must be a positive number"),
    ("trend_min_drop", _fraction, "must be in [0, 1)"),
    ("overfit_window", _window, "must be an integer >= 2"),
    ("loss_weight_min", _positive, "must be positive"),
    ("loss_weight_max", _positive, "must be positive"),
    ("expected_weight_difficulty_sign", lambda v: v in WEIGHT_DIFFICULTY_SIGNS,
     f"must be one of {', '.join(WEIGHT_DIFFICULTY_SIGNS)}"),
    ("weight_difficulty_margin", _fraction, "must be in [0, 1)"),
)
_ORDERED = (("gradient_ratio_min", "gradient_ratio_max"),
            ("hidden_state_norm_min", "hidden_state_norm_max"),
            ("loss_weight_min", "loss_weight_max"))


def thresholds_from_config(health_config: Mapping[str, Any] | None) -> HealthThresholds:
    """The thresholds of a `config.health` section; absent keys keep their defaults.

    Raises ConfigError naming the key for an unknown key or an invalid value, so a typo
    stops the run at start-up instead of silently leaving a default in place.
    """
    if health_config is None:
        return HealthThresholds()
    known = [field.name for field in dataclasses.fields(HealthThresholds)]
    values = {key: health_config[key] for key in health_config.keys()}
    for key in values:
        if key not in known:
            raise ConfigError(f"config error: health.{key} is not a health threshold: "
                              f"use one of {', '.join(known)} (see configs/base.py)")
    return HealthThresholds(**values)
