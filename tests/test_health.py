"""The health monitor: every rule fires on a bad history and stays quiet on a good one,
alerts are reported once per start and clear, and the healthy base run raises nothing."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import runpy
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from tdlm_jax.errors import ConfigError
from tdlm_jax.metrics import health, health_thresholds, jsonl, writers

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEALTHY_RUN = ROOT / "tests" / "data" / "healthy_base_run.jsonl"  # 1000 steps of configs/base.py
HEALTHY_RUN_ALL_TIERS = ROOT / "tests" / "data" / "healthy_base_run_all_tiers.jsonl"

Row = tuple[int, dict[str, Any]]


class RecordingWriter(writers.NullWriter):
    """Remembers every text written; ignores everything else."""

    def __init__(self) -> None:
        self.texts: list[tuple[int, dict[str, str]]] = []

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        self.texts.append((step, dict(texts)))


def replay(rows: Sequence[Row], thresholds: health_thresholds.HealthThresholds | None = None,
           alerts_path: str | None = None) -> tuple[health.HealthMonitor, list[health.Alert]]:
    monitor = health.HealthMonitor(thresholds or health_thresholds.HealthThresholds(), None, alerts_path)
    alerts = [alert for step, row in rows for alert in monitor.observe(step, row)]
    return monitor, alerts


def started(rows: Sequence[Row], thresholds: health_thresholds.HealthThresholds | None = None) -> set[str]:
    return {a.rule for a in replay(rows, thresholds)[1] if a.event == "start"}


def series(metric: str, values: Sequence[float | None], first: int = 1000, every: int = 100) -> list[Row]:
    return [(first + i * every, {metric: v}) for i, v in enumerate(values)]


def research(**values: float | None) -> list[Row]:
    return [(1000, {f"research/{k}": v for k, v in values.items()})]


def tier3(diversity: Sequence[float], norms: Sequence[float] | None) -> list[Row]:
    rows = series("advanced/sequence_diversity", diversity, every=2000)
    for (_, row), norm in zip(rows, norms or [None] * len(rows)):
        row["advanced/hidden_state_norm"] = norm
    return rows


def train_val(train: Sequence[float], val: Sequence[float]) -> list[Row]:
    rows = []
    for i, (t, v) in enumerate(zip(train, val)):
        rows += [(100 * (i + 1), {"train/loss": t}), (100 * (i + 1), {"val/loss": v})]
    return rows


# rule -> (bad history, good histories): each bad history starts the rule's alert, no good one does.
CASES: dict[str, tuple[list[Row], list[list[Row]]]] = {
    "high_above_medium_accuracy": (
        research(high_corruption_accuracy=0.40, medium_corruption_accuracy=0.30),
        [research(high_corruption_accuracy=0.19, medium_corruption_accuracy=0.34),
         research(high_corruption_accuracy=0.33, medium_corruption_accuracy=0.31),  # within the margin
         [(100, {"research/high_corruption_accuracy": 0.4, "research/medium_corruption_accuracy": 0.3})]],
    ),
    "zero_accuracy_low_corruption": (
        research(low_corruption_accuracy=0.0, low_corruption_count=9.0),
        [research(low_corruption_accuracy=0.45, low_corruption_count=9.0),
         research(low_corruption_accuracy=0.0, low_corruption_count=0.0)],
    ),
    "zero_accuracy_medium_corruption": (
        research(medium_corruption_accuracy=0.0, medium_corruption_count=11.0),
        [research(medium_corruption_accuracy=0.3, medium_corruption_count=11.0),
         research(medium_corruption_accuracy=0.0, medium_corruption_count=0.0)],
    ),
    "zero_accuracy_high_corruption": (
        research(high_corruption_accuracy=0.0, high_corruption_count=10.0),
        [research(high_corruption_accuracy=0.2, high_corruption_count=10.0)],
    ),
    "mask_accuracy_stagnating": (
        series("metrics/mask_accuracy", [0.20, 0.201, 0.199, 0.202, 0.201], first=500),
        [series("metrics/mask_accuracy", [0.266, 0.275, 0.282, 0.287, 0.292, 0.295], first=500),
         series("metrics/mask_accuracy", [0.65, 0.65, 0.65, 0.65, 0.65], first=500),  # above the floor
         series("metrics/mask_accuracy", [0.15, 0.15, 0.15, 0.15, 0.15], first=0)],  # warm-up
    ),
    "gradient_ratio_extreme": (
        research(gradient_norm_ratio_high_to_low=0.05),
        [research(gradient_norm_ratio_high_to_low=0.36), research(gradient_norm_ratio_high_to_low=9.0)],
    ),
    "high_corruption_gradient_vanishing": (
        research(gradient_norm_high_corruption=0.005),
        [research(gradient_norm_high_corruption=0.21)],
    ),
    "low_corruption_gradient_exploding": (
        research(gradient_norm_low_corruption=7.0),
        [research(gradient_norm_low_corruption=0.58)],
    ),
    "hidden_state_norm_out_of_range": (
        series("advanced/hidden_state_norm", [15.0, 5000.0]),
        [series("advanced/hidden_state_norm", [11.3, 14.0, 20.0])],
    ),
    "attention_entropy_decreasing": (
        series("advanced/attention_entropy", [3.0, 2.7, 2.4, 2.1, 1.8], every=2000),
        [series("advanced/attention_entropy", [3.0, 2.98, 2.96, 2.95, 2.94], every=2000),  # small drop
         series("advanced/attention_entropy", [3.0, 2.4, 2.5, 2.0, 1.8], every=2000),  # not monotone
         series("advanced/attention_entropy", [4.8, 4.0, 3.3, 2.7, 2.2], first=0, every=100)],  # warm-up
    ),
    "sequence_diversity_decreasing": (
        tier3([2.8, 2.5, 2.2, 1.9, 1.6], norms=[45.0] * 5),
        [tier3([2.9, 3.0, 2.95, 3.1, 3.2], norms=[45.0] * 5),
         # Falling only with the residual stream's scale, which the final RMSNorm removes.
         tier3([2.86, 2.5, 2.2, 1.9, 1.6], norms=[49.4, 43.2, 38.0, 33.2, 28.0]),
         tier3([2.8, 2.5, 2.2, 1.9, 1.6], norms=None)],  # no norm logged: nothing to judge
    ),
    "overfitting": (
        train_val([2.0, 1.9, 1.8, 1.7], [2.1, 2.15, 2.2, 2.3]),
        [train_val([2.0, 1.9, 1.8, 1.7], [2.1, 2.0, 1.95, 1.9]),
         train_val([2.0, 2.1, 2.2, 2.3], [2.1, 2.15, 2.2, 2.25])],  # rising, but the gap is not widening
    ),
    "non_finite_training": (
        [(100, {"train/loss": 2.0, "train/grad_norm": 1.0}), (200, {"train/loss": math.nan})],
        [[(100, {"train/loss": 2.0, "train/grad_norm": 1.0, "train/skipped_steps": 0.0}),
          (200, {"train/loss": 1.9, "train/grad_norm": 0.8, "train/skipped_steps": 0.0})],
         [(5000, {"train/loss": 1.9, "train/skipped_steps": 3.0})]],  # resumed: the count is a baseline
    ),
    "loss_weight_extreme": (
        research(avg_loss_weight=50.0),
        [research(avg_loss_weight=1.99), research(avg_loss_weight=3.0)],
    ),
    # The stderr over the step's loss, the sum of the bucket losses (a healthy base.py run: 0.04–0.08).
    "noisy_loss_estimate": (
        research(loss_estimator_stderr=0.9, low_corruption_loss=0.5, medium_corruption_loss=1.0,
                 high_corruption_loss=1.0),
        [research(loss_estimator_stderr=0.19, low_corruption_loss=0.5, medium_corruption_loss=1.0,
                  high_corruption_loss=0.8),
         research(loss_estimator_stderr=0.9)],  # no bucket losses: no loss to compare with
    ),
    "weight_difficulty_sign": (
        research(weight_difficulty_correlation=0.3),
        [research(weight_difficulty_correlation=-0.30), research(weight_difficulty_correlation=0.05)],
    ),
}


def test_every_rule_has_a_case():
    assert set(CASES) == set(health.HealthMonitor(
        health_thresholds.HealthThresholds(), None, None).counts())


@pytest.mark.parametrize("rule", sorted(CASES))
def test_rule_fires_on_bad_history_only(rule):
    bad, goods = CASES[rule]
    assert rule in started(bad)
    for good in goods:
        assert started(good) == set(), good


@pytest.mark.parametrize("rows, rule", [
    (research(gradient_norm_ratio_high_to_low=0.01), "gradient_ratio_extreme"),
    (research(gradient_norm_ratio_high_to_low=20.0), "gradient_ratio_extreme"),
    (research(gradient_norm_high_corruption=math.nan), "high_corruption_gradient_vanishing"),
    (series("advanced/hidden_state_norm", [0.01]), "hidden_state_norm_out_of_range"),
    (series("advanced/hidden_state_norm", [math.inf]), "hidden_state_norm_out_of_range"),
    (research(avg_loss_weight=0.1), "loss_weight_extreme"),
    ([(100, {"train/grad_norm": math.inf})], "non_finite_training"),
    ([(100, {"train/skipped_steps": 0.0}), (200, {"train/skipped_steps": 2.0})], "non_finite_training"),
])
def test_more_bad_values_fire(rows, rule):
    assert started(rows) == {rule}


def test_expected_sign_is_configurable():
    positive = dataclasses.replace(health_thresholds.HealthThresholds(), expected_weight_difficulty_sign="positive")
    assert started(research(weight_difficulty_correlation=-0.3), positive) == {"weight_difficulty_sign"}
    assert started(research(weight_difficulty_correlation=0.3), positive) == set()
    either = dataclasses.replace(health_thresholds.HealthThresholds(), expected_weight_difficulty_sign="any")
    assert started(research(weight_difficulty_correlation=0.9), either) == set()


def bad_then_good(alerts_path: str | None = None, writer: writers.MetricWriter | None = None):
    monitor = health.HealthMonitor(health_thresholds.HealthThresholds(), writer, alerts_path)
    alerts = []
    for step in range(100, 1100, 100):  # 10 bad rows
        alerts += monitor.observe(step, {"train/loss": math.nan, "train/grad_norm": 1.0})
        alerts += monitor.observe(step, {"val/loss": 2.0})  # holds no train metric: changes nothing
    active = monitor.active()
    for step in range(1100, 1400, 100):
        alerts += monitor.observe(step, {"train/loss": 2.0, "train/grad_norm": 1.0})
    return monitor, alerts, active


def test_alert_is_reported_once_on_start_and_once_on_clear(tmp_path):
    path = tmp_path / "alerts.jsonl"
    monitor, alerts, active = bad_then_good(str(path))
    assert [(a.step, a.rule, a.event) for a in alerts] == [
        (100, "non_finite_training", "start"), (1100, "non_finite_training", "clear")]
    assert active == ["non_finite_training"] and monitor.active() == []
    assert monitor.counts()["non_finite_training"] == 1
    assert monitor.summary_scalars()["alerts/total"] == 1
    assert monitor.summary_scalars()["alerts/starts/non_finite_training"] == 1

    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line, parse_constant=pytest.fail) for line in f]  # strict JSON: no bare NaN
    assert [r["event"] for r in rows] == ["start", "clear"]
    for row in rows:
        assert set(row) == {"step", "rule", "event", "values", "message", "meaning"}
        assert row["rule"] == "non_finite_training" and row["meaning"] and row["message"]
    assert rows[0]["step"] == 100 and rows[0]["values"] == {"train/loss": "NaN", "train/grad_norm": 1.0}
    assert rows[1]["values"] == {"train/loss": 2.0, "train/grad_norm": 1.0}


def test_alerts_go_to_the_writer_as_texts():
    writer = RecordingWriter()
    _, alerts, _ = bad_then_good(writer=writer)
    assert writer.texts == [(a.step, {"alerts/non_finite_training": a.message}) for a in alerts]
    assert "started" in alerts[0].message and "cleared" in alerts[1].message


def test_alerts_are_logged_as_warnings(monkeypatch):
    lines = []
    monkeypatch.setattr(health.logging, "warning", lambda msg, *args: lines.append(msg % args if args else msg))
    bad_then_good()
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    assert "non_finite_training" in lines[0] and "meaning" in lines[0]


def test_missing_values_never_fire():
    keys = [k for rule_rows, _ in CASES.values() for _, row in rule_rows for k in row]
    monitor = health.HealthMonitor(health_thresholds.HealthThresholds(), None, None)
    for step in range(0, 20000, 100):
        assert monitor.observe(step, dict.fromkeys(keys)) == []
    # Half a comparison is no comparison: an empty medium bucket leaves the order rule quiet.
    assert started(research(high_corruption_accuracy=0.5, medium_corruption_accuracy=None)) == set()


def test_missing_values_do_not_clear_an_alert():
    monitor = health.HealthMonitor(health_thresholds.HealthThresholds(), None, None)
    assert monitor.observe(1000, {"research/gradient_norm_ratio_high_to_low": 50.0})
    assert monitor.observe(1500, {"research/gradient_norm_ratio_high_to_low": None}) == []
    assert monitor.active() == ["gradient_ratio_extreme"]


def test_healthy_base_run_raises_no_alert():
    rows = [(row.pop("step"), row) for row in jsonl.read(str(HEALTHY_RUN))]
    assert len(rows) == 22 and rows[-1][0] == 1000
    monitor, alerts = replay(rows)
    assert alerts == [] and monitor.active() == []


def test_healthy_run_with_every_tier_raises_no_alert():
    """base.py with tier 2 every 100 and tier 3 every 200 steps, 1200 steps. Its step-1100
    research row has a one-batch low-bucket gradient spike (ratio 0.073): the median window
    must absorb it, while a single-point reading would have fired."""
    rows = [(row.pop("step"), row) for row in jsonl.read(str(HEALTHY_RUN_ALL_TIERS))]
    assert any("advanced/attention_entropy" in row for _, row in rows)
    monitor, alerts = replay(rows)
    assert alerts == [] and monitor.active() == []
    single_batch = dataclasses.replace(health_thresholds.HealthThresholds(), gradient_window=1)
    assert started(rows, single_batch) == {"gradient_ratio_extreme"}


def test_guide_literal_thresholds_would_fire_on_the_healthy_run():
    """Why the defaults deviate from the guide: its literal reading flags a healthy run."""
    rows = [(row.pop("step"), row) for row in jsonl.read(str(HEALTHY_RUN))]
    literal = dataclasses.replace(health_thresholds.HealthThresholds(), expected_weight_difficulty_sign="positive",
                                  weight_difficulty_margin=0.0, warmup_steps=0,
                                  stagnation_min_improvement=1.0)  # "below 40%" alone
    assert started(rows, literal) == {"weight_difficulty_sign", "mask_accuracy_stagnating"}


def load_base_config():
    return runpy.run_path(str(ROOT / "configs" / "base.py"))["get_config"]()


def test_base_config_mirrors_the_defaults():
    section = load_base_config().health
    assert set(section.keys()) == {f.name for f in dataclasses.fields(health_thresholds.HealthThresholds)}
    assert health_thresholds.thresholds_from_config(section) == health_thresholds.HealthThresholds()
    assert health_thresholds.thresholds_from_config(None) == health_thresholds.HealthThresholds()


@pytest.mark.parametrize("key, value, expected", [
    ("gradient_ratio_min", -1, "config error: health.gradient_ratio_min=-1: must be positive"),
    ("gradient_ratio_max", 0.05, "health.gradient_ratio_max=0.05: must be greater than health.gradient_ratio_min"),
    ("hidden_state_norm_min", math.nan, "health.hidden_state_norm_min=nan: must be positive"),
    ("trend_window", 1, "health.trend_window=1: must be an integer >= 2"),
    ("stagnation_window", 2.5, "health.stagnation_window=2.5: must be an integer >= 2"),
    ("warmup_steps", True, "health.warmup_steps=True"),
    ("trend_min_drop", 1.5, "health.trend_min_drop=1.5: must be in [0, 1)"),
    ("mask_accuracy_floor", "0.4", "health.mask_accuracy_floor='0.4'"),
    ("expected_weight_difficulty_sign", "up", "must be one of negative, positive, any"),
    ("gradient_ratio_minimum", 0.1, "health.gradient_ratio_minimum is not a health threshold"),
])
def test_thresholds_from_config_rejects_bad_values(key, value, expected):
    section = load_base_config().health.to_dict()  # a dict: ConfigDict would refuse type changes
    section[key] = value
    with pytest.raises(ConfigError) as info:
        health_thresholds.thresholds_from_config(section)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_integer_values_become_float_thresholds():
    thresholds = health_thresholds.thresholds_from_config({"gradient_ratio_max": 20})
    assert thresholds.gradient_ratio_max == 20.0 and isinstance(thresholds.gradient_ratio_max, float)
