"""The health rules: the metrics guide's warning signs as small checks over logged history.

A rule is a name, what its alert means (after the guide), and a pure function of
(the row just logged, the history of logged values, the thresholds, the step) that returns
a `Check`, or None when the row does not hold what the rule reads (or the history is too
short, or the step is still in warm-up). None leaves the alert's state unchanged: a rule
never fires, nor clears, on missing data. A NaN is data, not missing: range rules treat it
as out of range, since a non-finite norm or weight is never healthy.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import statistics
from collections.abc import Callable, Mapping

from tdlm_jax.metrics import catalogue as names
from tdlm_jax.metrics.catalogue import BUCKETS, bucket_name
from tdlm_jax.metrics.formatting import format_number as fmt  # the project's one number formatter
from tdlm_jax.metrics.health_thresholds import HealthThresholds

TRAIN_LOSS, GRAD_NORM, SKIPPED = names.TRAIN_LOSS, names.GRAD_NORM, names.SKIPPED_STEPS
MASK_ACCURACY, VAL_LOSS = names.MASK_ACCURACY, names.VAL_LOSS
# Derived by `History.record`: val/loss minus the latest train/loss logged at or before it,
# and sequence diversity relative to the hidden-state norm (see `derive`).
VAL_TRAIN_GAP = "derived/val_minus_train_loss"
RELATIVE_DIVERSITY = "derived/relative_sequence_diversity"
LOSS_STDERR_FRACTION = "derived/loss_stderr_fraction"
BUCKET_LOSSES = tuple(bucket_name(names.BUCKET_LOSS, b) for b in BUCKETS)
HIGH_ACCURACY, MEDIUM_ACCURACY = (bucket_name(names.BUCKET_ACCURACY, b) for b in ("high", "medium"))
GRADIENT_RATIO = names.GRADIENT_RATIO
HIGH_GRADIENT, LOW_GRADIENT = (bucket_name(names.BUCKET_GRADIENT_NORM, b) for b in ("high", "low"))
AVG_LOSS_WEIGHT, WEIGHT_DIFFICULTY = names.AVG_LOSS_WEIGHT, names.WEIGHT_DIFFICULTY
HIDDEN_STATE_NORM, ATTENTION_ENTROPY = names.HIDDEN_STATE_NORM, names.ATTENTION_ENTROPY
SEQUENCE_DIVERSITY = names.SEQUENCE_DIVERSITY

Point = tuple[int, float]


class History:
    """The last `maxlen` logged (step, value) points of every metric."""

    def __init__(self, maxlen: int) -> None:
        self._maxlen = max(int(maxlen), 2)  # 2: a cumulative counter is compared with its previous value
        self._series: dict[str, collections.deque[Point]] = {}

    def state_dict(self) -> dict[str, list[list[float]]]:
        """The kept points, {name: [[step, value], ...]}: what a checkpoint stores of the history."""
        return {name: [list(point) for point in series] for name, series in self._series.items()}

    def load_state_dict(self, state: Mapping[str, list[list[float]]]) -> None:
        self._series = {name: collections.deque(((int(s), float(v)) for s, v in points), maxlen=self._maxlen)
                        for name, points in state.items()}

    def record(self, step: int, row: Mapping[str, float]) -> dict[str, float]:
        """Appends a row's (present) values and its derived ones; returns the row with both."""
        for name, value in row.items():
            self._append(name, step, value)
        derived = self.derive(row)
        for name, value in derived.items():
            self._append(name, step, value)
        return {**row, **derived}

    def derive(self, row: Mapping[str, float]) -> dict[str, float]:
        """Series no single logged metric holds.

        - The val − train gap. Training rows come before the validation row of the same
          step, so it pairs val/loss with the training loss of the interval just ended.
        - The loss estimator's standard error / the step's loss (the sum of its bucket losses).
        - Sequence diversity / hidden-state norm. The final RMSNorm makes the model blind
          to the overall scale of the residual stream, so a diversity that only shrinks
          with that scale (as weight decay shrinks it) says nothing about positions.
        """
        derived = {}
        train = self._series.get(TRAIN_LOSS)
        if VAL_LOSS in row and train:
            derived[VAL_TRAIN_GAP] = row[VAL_LOSS] - train[-1][1]
        norm = row.get(HIDDEN_STATE_NORM)
        if SEQUENCE_DIVERSITY in row and norm is not None and norm > 0:
            derived[RELATIVE_DIVERSITY] = row[SEQUENCE_DIVERSITY] / norm
        stderr = row.get(names.LOSS_ESTIMATOR_STDERR)
        loss = sum(row[k] for k in BUCKET_LOSSES) if all(row.get(k) is not None for k in BUCKET_LOSSES) else None
        if stderr is not None and loss is not None and loss > 0:  # the bucket losses add up to the step's loss
            derived[LOSS_STDERR_FRACTION] = stderr / loss
        return derived

    def points(self, name: str, n: int, min_step: int = 0) -> list[Point] | None:
        """The last n points logged at `min_step` or later; None if there are fewer."""
        series = [p for p in self._series.get(name, ()) if p[0] >= min_step]
        return series[-n:] if len(series) >= n else None

    def values(self, name: str, n: int, min_step: int = 0) -> list[float] | None:
        points = self.points(name, n, min_step)
        return None if points is None else [value for _, value in points]

    def _append(self, name: str, step: int, value: float) -> None:
        self._series.setdefault(name, collections.deque(maxlen=self._maxlen)).append((step, value))


@dataclasses.dataclass(frozen=True)
class Check:
    """One evaluation of a rule: whether it fires, on which values, and why, in one line."""

    firing: bool
    values: dict[str, float]
    detail: str


Evaluate = Callable[[Mapping[str, float], History, HealthThresholds, int], "Check | None"]


@dataclasses.dataclass(frozen=True)
class Rule:
    """A named warning sign: `evaluate` returns a Check, or None when there is nothing to judge."""

    name: str
    meaning: str  # what the guide says the sign means
    evaluate: Evaluate


def _strictly_decreasing(values: list[float]) -> bool:
    return all(b < a for a, b in zip(values, values[1:]))


def _strictly_increasing(values: list[float]) -> bool:
    return all(b > a for a, b in zip(values, values[1:]))


def check_bucket_order(row: Mapping[str, float], history: History, th: HealthThresholds, step: int) -> Check | None:
    """High-corruption accuracy above medium by more than the margin."""
    high, medium = row.get(HIGH_ACCURACY), row.get(MEDIUM_ACCURACY)
    if high is None or medium is None or step < th.warmup_steps:
        return None
    return Check(high > medium + th.bucket_order_margin, {HIGH_ACCURACY: high, MEDIUM_ACCURACY: medium},
                 f"high-corruption accuracy {fmt(high)} vs medium {fmt(medium)} "
                 f"(fires above medium + {th.bucket_order_margin})")


def zero_accuracy_rule(bucket: str) -> Rule:
    """A bucket whose masked tokens are all predicted wrong while it holds sequences."""
    accuracy_key, count_key = bucket_name(names.BUCKET_ACCURACY, bucket), bucket_name(names.BUCKET_COUNT, bucket)

    def check(row: Mapping[str, float], history: History, th: HealthThresholds, step: int) -> Check | None:
        accuracy, count = row.get(accuracy_key), row.get(count_key)
        if accuracy is None or count is None or step < th.warmup_steps:
            return None
        return Check(count > 0 and accuracy == 0.0, {accuracy_key: accuracy, count_key: count},
                     f"{bucket}-corruption accuracy {fmt(accuracy)} over {fmt(count)} sequences")

    return Rule(f"zero_accuracy_{bucket}_corruption",
                "Training failure: a corruption level with 0% accuracy (guide: 'any corruption level "
                "showing 0% accuracy', 'zero values for corruption performance' = masking failure).",
                check)


def check_mask_accuracy_stagnation(row: Mapping[str, float], history: History, th: HealthThresholds,
                                   step: int) -> Check | None:
    """Below the floor and gaining less than the minimum over the last window of points."""
    if MASK_ACCURACY not in row or step < th.warmup_steps:
        return None
    window = history.values(MASK_ACCURACY, th.stagnation_window, min_step=th.warmup_steps)
    if window is None:
        return None
    gain = window[-1] - window[0]
    return Check(window[-1] < th.mask_accuracy_floor and gain < th.stagnation_min_improvement,
                 {MASK_ACCURACY: window[-1]},
                 f"mask accuracy {fmt(window[-1])} (floor {th.mask_accuracy_floor}), gain {fmt(gain)} over "
                 f"the last {th.stagnation_window} points (needs >= {th.stagnation_min_improvement})")


def range_rule(name: str, metric: str, low: str | None, high: str | None, meaning: str,
               median_window: str | None = None) -> Rule:
    """Fires while `metric` is outside [thresholds.<low>, thresholds.<high>] (None: unbounded).

    With `median_window`, the value judged is the median of the last thresholds.<median_window>
    logged points (as many as exist so far), so one noisy batch cannot raise the alert;
    a non-finite latest value still fires at once.
    """

    def check(row: Mapping[str, float], history: History, th: HealthThresholds, step: int) -> Check | None:
        value = row.get(metric)
        if value is None:
            return None
        judged, label = value, f"{metric}={fmt(value)}"
        if median_window is not None and math.isfinite(value):
            n = getattr(th, median_window)
            recent = next(history.values(metric, k) for k in range(n, 0, -1) if history.values(metric, k))
            judged = statistics.median(recent)
            label = f"median of the last {len(recent)} {metric}={fmt(judged)} (latest {fmt(value)})"
        lo = -math.inf if low is None else getattr(th, low)
        hi = math.inf if high is None else getattr(th, high)
        # Written as "not inside" so that NaN fires: a non-finite norm or weight is never healthy.
        return Check(not lo <= judged <= hi, {metric: value}, f"{label} (healthy range [{fmt(lo)}, {fmt(hi)}])")

    return Rule(name, meaning, check)


def decreasing_trend_rule(name: str, metric: str, meaning: str, shown: tuple[str, ...] = ()) -> Rule:
    """Strictly decreasing over the last window of points and dropping by more than the minimum.

    `shown`: further metrics of the row to report in the alert's values.
    """

    def check(row: Mapping[str, float], history: History, th: HealthThresholds, step: int) -> Check | None:
        if metric not in row or step < th.warmup_steps:
            return None
        window = history.values(metric, th.trend_window, min_step=th.warmup_steps)
        if window is None:
            return None
        drop = (window[0] - window[-1]) / window[0] if window[0] > 0 else 0.0
        values = {metric: window[-1], **{k: row[k] for k in shown if k in row}}
        return Check(_strictly_decreasing(window) and drop > th.trend_min_drop, values,
                     f"{metric} {fmt(window[0])} -> {fmt(window[-1])} over the last {th.trend_window} points "
                     f"(relative drop {fmt(drop)}; fires above {th.trend_min_drop} if strictly decreasing)")

    return Rule(name, meaning, check)


def check_overfitting(row: Mapping[str, float], history: History, th: HealthThresholds, step: int) -> Check | None:
    """val/loss rising at every one of the last window's evaluations while the gap widens."""
    if VAL_TRAIN_GAP not in row:
        return None
    val = history.points(VAL_LOSS, th.overfit_window)
    gap = history.points(VAL_TRAIN_GAP, th.overfit_window)
    if val is None or gap is None or [s for s, _ in val] != [s for s, _ in gap]:
        return None  # no training loss to pair with some of these evaluations
    val_values, gap_values = [v for _, v in val], [g for _, g in gap]
    return Check(_strictly_increasing(val_values) and _strictly_increasing(gap_values),
                 {VAL_LOSS: val_values[-1], VAL_TRAIN_GAP: gap_values[-1]},
                 f"val/loss {fmt(val_values[0])} -> {fmt(val_values[-1])}, val-train gap "
                 f"{fmt(gap_values[0])} -> {fmt(gap_values[-1])} over the last {th.overfit_window} evaluations")


def check_non_finite(row: Mapping[str, float], history: History, th: HealthThresholds, step: int) -> Check | None:
    """A NaN/inf loss or gradient norm, or an increase of the skipped-update counter.

    The first skipped_steps value seen is a baseline, not an increase: it is restored
    from the checkpoint on resume. A skip in the very first interval still fires, since
    the interval's mean loss then includes the non-finite step.
    """
    present = {k: row[k] for k in (TRAIN_LOSS, GRAD_NORM, SKIPPED) if k in row}
    if not present:
        return None
    problems = [f"{k}={row[k]}" for k in (TRAIN_LOSS, GRAD_NORM) if k in row and not math.isfinite(row[k])]
    skipped = history.values(SKIPPED, 2) if SKIPPED in row else None
    if skipped is not None and skipped[1] > skipped[0]:
        problems.append(f"{SKIPPED} {fmt(skipped[0])} -> {fmt(skipped[1])}")
    return Check(bool(problems), present, "; ".join(problems) or "loss and gradient finite, no skipped update")


def check_weight_difficulty_sign(row: Mapping[str, float], history: History, th: HealthThresholds,
                                 step: int) -> Check | None:
    """The correlation on the side of 0 opposite to the expected sign, beyond the margin."""
    corr = row.get(WEIGHT_DIFFICULTY)
    sign = th.expected_weight_difficulty_sign
    if corr is None or sign == "any" or step < th.warmup_steps:
        return None
    firing = corr > th.weight_difficulty_margin if sign == "negative" else corr < -th.weight_difficulty_margin
    return Check(firing, {WEIGHT_DIFFICULTY: corr},
                 f"weight-difficulty correlation {fmt(corr)} (expected {sign}, margin {th.weight_difficulty_margin})")


def default_rules() -> list[Rule]:
    """Every rule, in the order the guide lists the signs."""
    return [
        Rule("high_above_medium_accuracy",
             "Unnatural pattern (guide): high-corruption accuracy above medium; accuracy should degrade "
             "gradually with corruption, so the buckets, masking or weighting are likely mislabeled.",
             check_bucket_order),
        *[zero_accuracy_rule(bucket) for bucket in BUCKETS],
        Rule("mask_accuracy_stagnating",
             "Training collapse indicator (guide): mask accuracy, the fundamental diffusion metric, "
             "stagnating below 40% indicates training issues or model capacity problems.",
             check_mask_accuracy_stagnation),
        range_rule("gradient_ratio_extreme", GRADIENT_RATIO, "gradient_ratio_min", "gradient_ratio_max",
                   "Extreme gradient norm ratio (guide): severely imbalanced learning across corruption levels.",
                   median_window="gradient_window"),
        range_rule("high_corruption_gradient_vanishing", HIGH_GRADIENT, "high_gradient_norm_min", None,
                   "Vanishing high-corruption gradients (guide): the model is not learning from heavily "
                   "corrupted examples.", median_window="gradient_window"),
        range_rule("low_corruption_gradient_exploding", LOW_GRADIENT, None, "low_gradient_norm_max",
                   "Exploding low-corruption gradients (guide): the model is overfitting to easy infilling tasks.",
                   median_window="gradient_window"),
        range_rule("hidden_state_norm_out_of_range", HIDDEN_STATE_NORM, "hidden_state_norm_min",
                   "hidden_state_norm_max",
                   "Exploding or vanishing hidden state norms (guide): training instability."),
        decreasing_trend_rule("attention_entropy_decreasing", ATTENTION_ENTROPY,
                              "Steadily decreasing attention entropy (guide): attention pattern collapse."),
        decreasing_trend_rule("sequence_diversity_decreasing", RELATIVE_DIVERSITY,
                              "Decreasing sequence diversity (guide; judged relative to the hidden-state "
                              "norm): the model is losing positional sensitivity.",
                              shown=(SEQUENCE_DIVERSITY, HIDDEN_STATE_NORM)),
        Rule("overfitting",
             "Overfitting indicator (guide): a growing train/val gap, training improving while "
             "validation degrades.",
             check_overfitting),
        Rule("non_finite_training",
             "Numerical instability: a NaN/inf loss or gradient norm, or updates skipped for one "
             "(the step leaves the parameters unchanged).",
             check_non_finite),
        range_rule("loss_weight_extreme", AVG_LOSS_WEIGHT, "loss_weight_min", "loss_weight_max",
                   "Extreme loss weight values (guide): numerical instability in the time-dependent weighting."),
        range_rule("noisy_loss_estimate", LOSS_STDERR_FRACTION, None, "loss_stderr_fraction_max",
                   "The NELBO estimate of a batch is too noisy to train on well: its standard error "
                   "(research/loss_estimator_stderr) is a large fraction of the loss. A bigger batch, "
                   "diffusion.time_sampling='adaptive', or a lower-variance weighting reduces it.",
                   median_window="gradient_window"),
        Rule("weight_difficulty_sign",
             "The loss weights do not follow the objective (guide: weight-difficulty correlation validates "
             "the Austin et al. weighting). ELBO weights shrink as masking grows, so a healthy run is "
             "negative; a positive sign means weights grow with difficulty, e.g. an inverted schedule.",
             check_weight_difficulty_sign),
    ]
