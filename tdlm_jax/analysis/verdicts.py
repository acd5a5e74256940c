"""Verdicts on the two core components of a masked diffusion run, from its metric history.

Each check is a small pure function of a history, `{metric: [(step, value), ...]}` sorted
by step (a value of `None` means missing), and returns a `Check`. The component verdicts
combine them: any warning makes the component a warning, no data at all makes it "not
enough data yet". Thresholds follow the "Healthy Training Indicators" and "Warning Signs"
of the metrics guide (shared/spec/metrics-guide.md); where the guide gives no number, the
one used here is written into the reason, so that a reader can judge it.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Mapping, Sequence

from tdlm_jax.metrics import catalogue as names
from tdlm_jax.metrics.catalogue import BUCKETS, bucket_name

HEALTHY = "healthy"
WARNING = "warning"
NO_DATA = "not enough data yet"

Points = list[tuple[int, float]]
History = Mapping[str, Sequence[tuple[int, float | None]]]


@dataclasses.dataclass(frozen=True)
class Check:
    """One indicator: what was checked, its status and the reason, in words."""

    name: str
    status: str
    reason: str


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The verdict on one core component: the combined status and the checks behind it."""

    component: str
    status: str
    checks: tuple[Check, ...]

    @property
    def headline(self) -> str:
        """'healthy', 'not enough data yet', or 'warning: <the warning reasons>'."""
        if self.status == WARNING:
            return "warning: " + "; ".join(c.reason for c in self.checks if c.status == WARNING)
        return self.status


def points(history: History, name: str) -> Points:
    """The non-missing (step, value) points of one metric; NaN/inf are kept."""
    return [(int(s), float(v)) for s, v in history.get(name, ()) if v is not None]


def _first_non_finite(pts: Points) -> int | None:
    return next((s for s, v in pts if not math.isfinite(v)), None)


def usable_points(history: History, name: str, needed: int) -> Points | Check:
    """The metric's points, or the Check to report instead: too few logs, or a non-finite one."""
    pts = points(history, name)
    if len(pts) < needed:
        return Check(name, NO_DATA, "not logged yet" if not pts else f"{len(pts)} of the {needed} logs needed")
    bad = _first_non_finite(pts)
    if bad is not None:
        return Check(name, WARNING, f"non-finite {name} at step {bad}")
    return pts


def window_change(pts: Points) -> float:
    """Mean of the last third of the values minus the mean of the first third.

    Thirds rather than first/last point, because single logs are noisy.
    """
    k = max(1, len(pts) // 3)
    first = [v for _, v in pts[:k]]
    last = [v for _, v in pts[-k:]]
    return sum(last) / k - sum(first) / k


def recent_slope(pts: Points, per_steps: int = 100) -> float:
    """Least-squares slope over the last third (at least 3 points), per `per_steps` steps."""
    recent = pts[-max(3, len(pts) // 3):]
    xs = [s for s, _ in recent]
    ys = [v for _, v in recent]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return 0.0
    return per_steps * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


# --- Forward process (data → noise) -----------------------------------------------------


def _latest_bucket_values(history: History, template: str) -> tuple[int, dict[str, float]] | None:
    """The last step at which all three buckets have a value of the `{bucket}` template."""
    per_bucket = {b: dict(points(history, bucket_name(template, b))) for b in BUCKETS}
    common = set.intersection(*(set(v) for v in per_bucket.values()))
    if not common:
        return None
    step = max(common)
    return step, {b: per_bucket[b][step] for b in BUCKETS}


def check_bucket_accuracy_order(history: History, tolerance: float = 0.02) -> Check:
    """Accuracy should fall as corruption rises (low ≥ medium ≥ high), and never be 0."""
    name = "accuracy by corruption bucket"
    latest = _latest_bucket_values(history, names.BUCKET_ACCURACY)
    if latest is None:
        return Check(name, NO_DATA, "no research log with all three bucket accuracies yet")
    step, acc = latest
    shown = ", ".join(f"{b} {_pct(acc[b])}" for b in BUCKETS)
    if not all(math.isfinite(v) for v in acc.values()):
        return Check(name, WARNING, f"non-finite bucket accuracy at step {step} ({shown})")
    zero = [b for b in BUCKETS if acc[b] == 0.0]
    if zero:
        return Check(name, WARNING, f"{'/'.join(zero)} bucket accuracy is 0 at step {step}: "
                                    "masking or training failure")
    # A tolerance, because each bucket holds only a handful of sequences per batch.
    inverted = [f"{hi} {_pct(acc[hi])} > {lo} {_pct(acc[lo])}"
                for lo, hi in (("low", "medium"), ("medium", "high")) if acc[hi] > acc[lo] + tolerance]
    if inverted:
        return Check(name, WARNING, f"unnatural ordering at step {step}: {'; '.join(inverted)} "
                                    f"(more context should not hurt; tolerance {_pct(tolerance)})")
    return Check(name, HEALTHY, f"falls with corruption at step {step}: {shown}")


def check_bucket_counts(history: History) -> Check:
    """Every bucket should receive sequences, or its accuracy is never measured."""
    name = "sequences per corruption bucket"
    counts = {b: points(history, bucket_name(names.BUCKET_COUNT, b)) for b in BUCKETS}
    if not any(counts.values()):
        return Check(name, NO_DATA, "no research logs yet")
    never = [b for b in BUCKETS if all(v == 0 for _, v in counts[b])]
    if never:
        return Check(name, WARNING, f"the {'/'.join(never)} bucket was empty at every research log: "
                                    "the time sampling never reaches it")
    latest = ", ".join(f"{b} {counts[b][-1][1]:g}" for b in BUCKETS if counts[b])
    return Check(name, HEALTHY, f"every bucket receives sequences (latest: {latest})")


def check_valid_ratio(history: History, minimum: float = 0.9) -> Check:
    """metrics/valid_ratio should stay close to 1.0; low values mean masks land on padding."""
    name = names.VALID_RATIO
    pts = usable_points(history, name, 1)
    if isinstance(pts, Check):
        return pts
    step, low = min(pts, key=lambda p: p[1])
    if low < minimum:
        return Check(name, WARNING, f"valid_ratio fell to {low:.3f} at step {step} "
                                    f"(below {minimum}: padding issues)")
    return Check(name, HEALTHY, f"valid_ratio ≥ {low:.4f} over {len(pts)} logs (close to 1.0)")


def check_masked_tokens_vary(history: History) -> Check:
    """metrics/total_masked_tokens should vary with the sampled t, not be constant."""
    name = names.TOTAL_MASKED_TOKENS
    pts = usable_points(history, name, 3)
    if isinstance(pts, Check):
        return pts
    values = [v for _, v in pts]
    if max(values) == min(values):
        return Check(name, WARNING, f"constant at {values[0]:g} over {len(pts)} logs: "
                                    "masking does not follow the per-sequence t")
    return Check(name, HEALTHY, f"varies between {min(values):.1f} and {max(values):.1f} "
                                f"over {len(pts)} logs (each an interval mean)")


def forward_process_verdict(history: History) -> Verdict:
    """Forward process (data → noise): corruption buckets, valid_ratio, masked tokens."""
    return combine("Forward process (data → noise)", [
        check_bucket_accuracy_order(history),
        check_bucket_counts(history),
        check_valid_ratio(history),
        check_masked_tokens_vary(history),
    ])


# --- Reverse process (noise → data) -----------------------------------------------------


def check_mask_accuracy_trend(history: History, name: str = names.MASK_ACCURACY,
                              floor: float = 0.4, stall_per_100: float = 0.001) -> Check:
    """Mask accuracy should increase; stagnating below 40% is the guide's collapse sign.

    "Stagnating" here: the recent slope is under `stall_per_100` (0.1 point) per 100 steps.
    """
    pts = usable_points(history, name, 3)
    if isinstance(pts, Check):
        return pts
    latest, change, slope = pts[-1][1], window_change(pts), recent_slope(pts)
    if change <= 0:
        return Check(name, WARNING, f"not increasing: {_pct(latest)} at step {pts[-1][0]}, "
                                    f"{change * 100:+.1f} points from the first to the last third of logs")
    if latest < floor and slope < stall_per_100:
        return Check(name, WARNING, f"stagnating below {_pct(floor)}: {_pct(latest)}, "
                                    f"{slope * 100:+.2f} points per 100 steps recently")
    target = "at or above the 60% target" if latest >= 0.6 else "below the guide's 60% target"
    return Check(name, HEALTHY, f"increasing: {_pct(latest)} at step {pts[-1][0]} "
                                f"({change * 100:+.1f} points since the start, "
                                f"{slope * 100:+.2f} per 100 steps recently), {target}")


def check_train_loss_trend(history: History, spike: float = 0.25) -> Check:
    """train/loss should decrease smoothly: lower at the end, no jump above `spike` (25%)."""
    name = names.TRAIN_LOSS
    pts = usable_points(history, name, 3)
    if isinstance(pts, Check):
        return pts
    change = window_change(pts)
    if change >= 0:
        return Check(name, WARNING, f"not decreasing: {change:+.3f} nats from the first to the "
                                    f"last third of logs (latest {pts[-1][1]:.3f})")
    jumps = [(s1, v0, v1) for (_, v0), (s1, v1) in zip(pts, pts[1:]) if v0 > 0 and v1 > v0 * (1 + spike)]
    if jumps:
        s1, v0, v1 = jumps[0]
        return Check(name, WARNING, f"spike at step {s1}: {v0:.3f} → {v1:.3f} "
                                    f"(+{100 * (v1 / v0 - 1):.0f}%, over {100 * spike:.0f}%)")
    return Check(name, HEALTHY, f"decreasing: {pts[0][1]:.3f} → {pts[-1][1]:.3f} over {len(pts)} logs, "
                                f"no jump over {100 * spike:.0f}%")


def check_val_tracks_train(history: History, loss_weighting: str = "elbo",
                           max_gap: float = 0.15, max_rise: float = 0.02) -> Check:
    """val/loss should track train/loss: no large gap, no rise while train/loss falls.

    With a weighting other than 'elbo', train/loss is not the bound that val/loss
    estimates, so the gap is not checked, only the rise.
    """
    name = f"{names.VAL_LOSS} vs {names.TRAIN_LOSS}"
    val, train_pts = points(history, names.VAL_LOSS), points(history, names.TRAIN_LOSS)
    train = {s: x for s, x in train_pts if math.isfinite(x)}  # a NaN is the loss check's finding
    if len(val) < 2:
        return Check(name, NO_DATA, f"{len(val)} of the 2 evaluations needed")
    bad = _first_non_finite(val)
    if bad is not None:
        return Check(name, WARNING, f"non-finite val/loss at step {bad}")
    best_step, best = min(val, key=lambda p: p[1])
    latest_step, latest = val[-1]
    train_falling = len(train_pts) >= 2 and window_change(train_pts) < 0
    if latest > best * (1 + max_rise) and train_falling:
        return Check(name, WARNING, f"overfitting: val/loss rose from {best:.3f} (step {best_step}) "
                                    f"to {latest:.3f} while train/loss kept falling")
    common = [s for s, _ in val if s in train]
    if loss_weighting != "elbo":
        return Check(name, HEALTHY, f"val/loss {latest:.3f} is not rising; the gap is not compared, "
                                    f"because train/loss uses '{loss_weighting}' weights")
    if not common:
        return Check(name, HEALTHY, f"val/loss {latest:.3f} is not rising (no train log at the same step)")
    step = common[-1]
    gap = dict(val)[step] - train[step]
    if train[step] > 0 and gap > max_gap * train[step]:
        return Check(name, WARNING, f"large gap at step {step}: val {dict(val)[step]:.3f} vs train "
                                    f"{train[step]:.3f} (+{100 * gap / train[step]:.0f}%, over "
                                    f"{100 * max_gap:.0f}%): overfitting")
    return Check(name, HEALTHY, f"tracks train at step {step}: val {dict(val)[step]:.3f} vs train "
                                f"{train[step]:.3f} (gap {gap:+.3f}); best val {best:.3f} at step {best_step}")


def check_gradient_balance(history: History, window: int = 3) -> Check:
    """Per-bucket gradient norms: ratio high/low in 0.2–2.0, none vanishing or exploding.

    Judged on the median of the last `window` research logs, like the health monitor: one
    batch's bucket gradient is noisy (an exact ELBO weight reaches 1/t_min), so a single
    log's ratio can leave the range on a healthy run.
    """
    name = "gradient balance across buckets"
    per_bucket = {b: dict(points(history, bucket_name(names.BUCKET_GRADIENT_NORM, b))) for b in BUCKETS}
    steps = sorted(set.intersection(*(set(v) for v in per_bucket.values())))[-window:]
    if not steps:
        return Check(name, NO_DATA, "no research log with all three bucket gradient norms yet")
    norms = {b: statistics.median(per_bucket[b][s] for s in steps) for b in BUCKETS}
    logged_ratios = dict(points(history, names.GRADIENT_RATIO))
    ratios = [logged_ratios[s] for s in steps if s in logged_ratios and logged_ratios[s] is not None]
    if ratios:
        ratio = statistics.median(ratios)
    else:  # no logged ratio: derive it from the norms
        ratio = norms["high"] / norms["low"] if norms["low"] > 0 else None
    shown = ", ".join(f"{b} {norms[b]:.3g}" for b in BUCKETS)
    where = f"median of the {len(steps)} research logs up to step {steps[-1]}"
    problems = []
    if not all(math.isfinite(v) for v in norms.values()):
        problems.append("non-finite bucket gradient norm")
    if norms["high"] < 0.01:
        problems.append(f"vanishing high-corruption gradient ({norms['high']:.3g} < 0.01)")
    if norms["low"] > 5.0:
        problems.append(f"exploding low-corruption gradient ({norms['low']:.3g} > 5)")
    if ratio is None:
        problems.append("ratio high/low undefined (empty low bucket or zero gradient)")
    elif not 0.1 <= ratio <= 10.0:
        problems.append(f"extreme ratio high/low {ratio:.3g} (outside 0.1–10)")
    elif not 0.2 <= ratio <= 2.0:
        problems.append(f"ratio high/low {ratio:.3g} outside the balanced 0.2–2.0 range")
    if problems:
        return Check(name, WARNING, f"{where}: {'; '.join(problems)} ({shown})")
    return Check(name, HEALTHY, f"ratio high/low {ratio:.3g} within 0.2–2.0, {where} ({shown})")


def reverse_process_verdict(history: History, loss_weighting: str = "elbo") -> Verdict:
    """Reverse process (noise → data): mask accuracy, loss trends, gradient balance."""
    return combine("Reverse process (noise → data)", [
        check_mask_accuracy_trend(history),
        check_train_loss_trend(history),
        check_val_tracks_train(history, loss_weighting),
        check_gradient_balance(history),
    ])


def combine(component: str, checks: Sequence[Check]) -> Verdict:
    """Any warning → warning; only missing data → not enough data yet; otherwise healthy."""
    statuses = {c.status for c in checks}
    if WARNING in statuses:
        status = WARNING
    elif statuses <= {NO_DATA}:
        status = NO_DATA
    else:
        status = HEALTHY
    return Verdict(component, status, tuple(checks))
