"""Training-health monitor: the metrics guide's warning signs, checked on the host.

The train loop hands every row of scalars it writes to `HealthMonitor.observe`. Each rule
reads a few metrics and is evaluated only on rows that hold them, so a validation row
never clears a training alert. A rule never fires on missing data (`None`): with nothing
to judge, its state stays as it was. An alert is reported once when it starts and once
when it clears: an absl warning, a text summary `alerts/<rule>` to the writer, and a row
of `alerts.jsonl`.

Defaults follow the guide except where it contradicts a healthy run of `configs/base.py`
(see `HealthThresholds`): a rule that fires on healthy training is a bug in the rule.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from absl import logging

from tdlm_jax.errors import ConfigError
from tdlm_jax.metrics import health_rules
from tdlm_jax.metrics.health_rules import History, Rule
from tdlm_jax.metrics.writers import MetricWriter, as_scalar

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


@dataclasses.dataclass(frozen=True)
class Alert:
    """The start or the clearing of one rule's alert."""

    step: int
    rule: str
    event: str  # "start" or "clear"
    values: dict[str, float]
    message: str
    meaning: str

    def to_json(self) -> str:
        """One strict-JSON line; NaN/±inf as "NaN"/"Infinity"/"-Infinity", as in metrics.jsonl."""
        row = dataclasses.asdict(self)
        row["values"] = {k: _json_number(v) for k, v in self.values.items()}
        return json.dumps(row, allow_nan=False)


def _json_number(value: float) -> float | str:
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _present(scalars: Mapping[str, Any]) -> dict[str, float]:
    """The row's values as floats, without the missing (None) ones."""
    out = {}
    for name, value in scalars.items():
        value = as_scalar(value)
        if value is not None:
            out[name] = float(value)
    return out


class HealthMonitor:
    """Evaluates the health rules on every logged row; reports alert starts and clears.

    Pass `alerts_path=None` (e.g. on non-primary processes) to write no alerts file. The
    monitor is not checkpointed: after a resume an alert still active is reported again.
    """

    def __init__(self, thresholds: HealthThresholds, writer: MetricWriter | None,
                 alerts_path: str | None, rules: Sequence[Rule] | None = None) -> None:
        self._thresholds = thresholds
        self._writer = writer
        self._alerts_path = alerts_path
        self._rules = list(health_rules.default_rules() if rules is None else rules)
        depth = max(thresholds.stagnation_window, thresholds.trend_window, thresholds.overfit_window,
                    thresholds.gradient_window)
        self._history = History(maxlen=depth)
        self._active: set[str] = set()
        self._counts = {rule.name: 0 for rule in self._rules}

    def observe(self, step: int, scalars: Mapping[str, Any]) -> list[Alert]:
        """Records one logged row and returns the alerts it started or cleared."""
        step = int(step)
        row = self._history.record(step, _present(scalars))
        alerts = []
        for rule in self._rules:
            check = rule.evaluate(row, self._history, self._thresholds, step)
            if check is None or check.firing == (rule.name in self._active):
                continue  # nothing to judge, or no change: an alert is reported only on edges
            event = "start" if check.firing else "clear"
            verb = "started" if check.firing else "cleared"
            alert = Alert(step=step, rule=rule.name, event=event, values=dict(check.values),
                          message=f"health alert {rule.name} {verb} at step {step}: {check.detail}",
                          meaning=rule.meaning)
            if check.firing:
                self._active.add(rule.name)
                self._counts[rule.name] += 1
            else:
                self._active.discard(rule.name)
            self._report(alert)
            alerts.append(alert)
        return alerts

    def counts(self) -> dict[str, int]:
        """How many times each rule's alert started (0 for rules that never fired)."""
        return dict(self._counts)

    def active(self) -> list[str]:
        """The rules whose alert is active now, sorted."""
        return sorted(self._active)

    def summary_scalars(self) -> dict[str, int]:
        """For summary.json: `alerts/total` and `alerts/starts/<rule>`.

        Not `alerts/<rule>`: that tag already holds the rule's text summaries, and
        TensorBoard keeps one plugin per tag.
        """
        counts = {f"alerts/starts/{name}": n for name, n in self._counts.items()}
        return {"alerts/total": sum(self._counts.values()), **counts}

    def _report(self, alert: Alert) -> None:
        line = alert.message if alert.event == "clear" else f"{alert.message} (meaning: {alert.meaning})"
        logging.warning(line)
        if self._writer is not None:
            self._writer.write_texts(alert.step, {f"alerts/{alert.rule}": alert.message})
        if self._alerts_path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(self._alerts_path)), exist_ok=True)
            # Append and close per alert, like metrics.jsonl: a killed run loses nothing.
            with open(self._alerts_path, "a", encoding="utf-8") as f:
                f.write(alert.to_json() + "\n")
