"""The metric rows of a run that are not yet written, and where they go.

Tier-1 values are added on the device into the open logging interval (a running (sum,
count) pytree, `tdlm_jax.metrics.aggregation`), so nothing is copied to the host between
logging steps. A logging step closes the interval into a pending row; tier-2 and tier-3
values are pending rows too. `flush` fetches the pending rows, which the loop calls right
after dispatching the next step so the fetch overlaps its compute (as in MaxText), and hands
each row to the writers and then to the health monitor, whose history is part of what the
log holds. Throughput leaves out the seconds the loop reports as `exclude`d (compilation,
evaluation, analysis, checkpointing).
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp

from tdlm_jax.metrics import aggregation, jsonl
from tdlm_jax.metrics import catalogue as names
from tdlm_jax.metrics.health import HealthMonitor
from tdlm_jax.metrics.writers import MetricWriter


class MetricLog:
    """Pending rows, the open interval, the health monitor, and the run's running figures."""

    def __init__(self, writer: MetricWriter, monitor: HealthMonitor, interval_names: tuple[str, ...],
                 tokens_per_step: int, start_step: int, best_val_loss: float = math.inf,
                 samples_path: str | None = None):
        self.writer, self.monitor, self.tokens_per_step = writer, monitor, tokens_per_step
        self.samples_path = samples_path  # samples.jsonl on process 0, None elsewhere
        self.interval_names = interval_names
        self.interval = aggregation.empty_interval(interval_names)
        aggregation.accumulate(self.interval, {k: jnp.zeros(()) for k in interval_names})  # compile now
        self.pending: list[tuple[int, Any, bool]] = []  # (step, device values, is an interval)
        self.last_step, self.last_time = start_step, time.perf_counter()
        self.excluded_seconds = 0.0
        self.last_train_loss: float | None = None
        self.best_val_loss = best_val_loss
        self.consecutive_skips = 0  # as of the last fetched interval

    def add_step(self, metrics: dict[str, jax.Array]) -> None:
        """Adds one step's tier-1 values to the open interval, on the device."""
        self.interval = aggregation.accumulate(self.interval, {k: metrics[k] for k in self.interval_names})

    def close_interval(self, step: int) -> None:
        """The open interval becomes the pending tier-1 row of `step`; a new one opens."""
        self.pending.append((step, self.interval, True))
        self.interval = aggregation.empty_interval(self.interval_names)

    def defer(self, step: int, device_values: dict[str, jax.Array]) -> None:
        """A row of device scalars (tier 2 or 3), written at the next `flush`."""
        self.pending.append((step, device_values, False))

    def write(self, step: int, row: dict[str, float | None]) -> None:
        """Writes a host row now, and passes it through the health monitor."""
        self.writer.write_scalars(step, row)
        self.monitor.observe(step, row)
        val_loss = row.get(names.VAL_LOSS)
        if val_loss is not None:
            self.best_val_loss = min(self.best_val_loss, val_loss)

    def write_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        """Eval samples (each with its index, text and how it was drawn): as text to the writers,
        and as rows of samples.jsonl."""
        self.writer.write_texts(step, {names.SAMPLE_TEXT.format(index=s["index"]): s["text"] for s in samples})
        if self.samples_path is not None:
            for sample in samples:
                jsonl.append(self.samples_path, {"step": step, **sample})

    def flush(self) -> None:
        """Fetches and writes every pending row, in the order they were added."""
        for step, device_values, is_interval in self.pending:
            fetched = jax.device_get(device_values)
            if is_interval:
                row = aggregation.interval_means(fetched)
                row[names.TOKENS_PER_SECOND] = self._throughput(step)
                self.last_train_loss = row[names.TRAIN_LOSS]
                self.consecutive_skips = int(row[names.CONSECUTIVE_SKIPPED_STEPS])
            else:
                row = aggregation.to_host_scalars(fetched)
            self.write(step, row)
            proposal = names.time_proposal(row)
            if proposal:
                self.writer.write_histograms(step, {names.TIME_PROPOSAL: proposal})
        self.pending.clear()

    def exclude(self, seconds: float) -> None:
        self.excluded_seconds += seconds

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the log (call after `flush`): the open interval's sums, the
        running figures and the health monitor's state, so a resumed run logs what an
        uninterrupted one does. Fetching the interval syncs with the device: commits are rare."""
        fetched = jax.device_get(self.interval)
        interval = {name: [float(total), float(count)] for name, (total, count) in fetched.items()}
        return {"interval": interval, "last_train_loss": self.last_train_loss,
                "best_val_loss": self.best_val_loss if math.isfinite(self.best_val_loss) else None,
                "consecutive_skips": self.consecutive_skips, "monitor": self.monitor.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["interval"]
        if set(saved) == set(self.interval_names):  # else a changed objective: start a fresh interval
            self.interval = {name: tuple(jnp.asarray(x, jnp.float32) for x in saved[name])
                             for name in self.interval_names}
        self.last_train_loss = state["last_train_loss"]
        best = state["best_val_loss"]
        self.best_val_loss = math.inf if best is None else best
        self.consecutive_skips = int(state["consecutive_skips"])
        self.monitor.load_state_dict(state["monitor"])

    def _throughput(self, step: int) -> float | None:
        now = time.perf_counter()
        seconds = now - self.last_time - self.excluded_seconds
        steps = step - self.last_step
        self.last_step, self.last_time, self.excluded_seconds = step, now, 0.0
        return steps * self.tokens_per_step / seconds if seconds > 0 and steps > 0 else None

