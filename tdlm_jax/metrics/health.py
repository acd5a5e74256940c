"""Training-health monitor: the metrics guide's warning signs, checked on the host.

The train loop hands every row of scalars it writes to `HealthMonitor.observe`. Each rule
reads a few metrics and is evaluated only on rows that hold them, so a validation row
never clears a training alert. A rule never fires on missing data (`None`): with nothing
to judge, its state stays as it was. An alert is reported once when it starts and once
when it clears: an absl warning, a text summary `alerts/{rule}` to the writer, and a row
of `alerts.jsonl`.

The thresholds live in `tdlm_jax.metrics.health_thresholds`, the rules in
`tdlm_jax.metrics.health_rules`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging

from tdlm_jax.metrics import catalogue, health_rules, jsonl
from tdlm_jax.metrics.health_rules import History, Rule
from tdlm_jax.metrics.health_thresholds import HealthThresholds
from tdlm_jax.metrics.writers import MetricWriter, as_scalar


@dataclasses.dataclass(frozen=True)
class Alert:
    """The start or the clearing of one rule's alert."""

    step: int
    rule: str
    event: str  # "start" or "clear"
    values: dict[str, float]
    message: str
    meaning: str


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
    monitor's state (history, active alerts, counts) is checkpointed with the run
    (`state_dict`), so a resumed run raises exactly the alerts an uninterrupted one does.
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

    def state_dict(self) -> dict[str, Any]:
        return {"history": self._history.state_dict(), "active": sorted(self._active), "counts": dict(self._counts)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._history.load_state_dict(state["history"])
        self._active = set(state["active"]) & set(self._counts)
        self._counts.update({name: int(n) for name, n in state["counts"].items() if name in self._counts})

    def summary_scalars(self) -> dict[str, int]:
        """For summary.json: `alerts/total` and `alerts/starts/<rule>`.

        Not `alerts/<rule>`: that tag already holds the rule's text summaries, and
        TensorBoard keeps one plugin per tag.
        """
        counts = {catalogue.ALERT_STARTS.format(rule=name): n for name, n in self._counts.items()}
        return {catalogue.ALERTS_TOTAL: sum(self._counts.values()), **counts}

    def _report(self, alert: Alert) -> None:
        line = alert.message if alert.event == "clear" else f"{alert.message} (meaning: {alert.meaning})"
        logging.warning(line)
        if self._writer is not None:
            self._writer.write_texts(alert.step, {catalogue.ALERT_TEXT.format(rule=alert.rule): alert.message})
        if self._alerts_path is not None:
            # Appended and closed per alert, like metrics.jsonl: a killed run loses nothing.
            jsonl.append(self._alerts_path, dataclasses.asdict(alert))
