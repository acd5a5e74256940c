"""The console: what a person watching a run reads. Every metric still goes to metrics.jsonl,
TensorBoard and wandb; the console shows the few a person watches, in short lines.

On a terminal, a tqdm progress bar (step/total, %, steps/s, ETA, and the latest loss, mask
accuracy and validation loss) with the lines below printed above it. Elsewhere (a cluster
log, CI, a pipe) there is no bar, and each logging step's line carries the same fields:

    step 300/1200 25% | loss 2.9130 | mask_acc 0.4120 | grad_norm 0.8300 | val 2.5180 | 3.10 step/s | ETA 4m50s | 12.7k tok/s
    research step 500 (buckets low/med/high) | loss 0.4120/1.9230/3.8710 | mask_acc 0.8530/0.5210/0.2140 | ...
    eval step 300 | val/loss 2.5180 | perplexity 12.4036 | mask_acc 0.4520
    samples at step 300:
      [0] ROMEO:
          To thim so myed worl,

and the run's summary as a small table. Alerts are logged by the health monitor itself.
Lines go through absl logging when there is no bar (timestamps in cluster logs), and through
`tqdm.write` above the bar on a terminal.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any, TextIO

from absl import logging
from tqdm import tqdm

from tdlm_jax.metrics import catalogue as names
from tdlm_jax.metrics.formatting import duration, format_number, thousands
from tdlm_jax.metrics.writers import MetricWriter, Scalar, as_scalar, shown

_SHORT = {names.TRAIN_LOSS: "loss", names.MASK_ACCURACY: "mask_acc", names.GRAD_NORM: "grad_norm",
          names.VAL_PERPLEXITY: "perplexity", names.VAL_MASK_ACCURACY: "mask_acc",
          names.ATTENTION_ENTROPY: "attention_entropy", names.HIDDEN_STATE_NORM: "hidden_state_norm",
          names.SEQUENCE_DIVERSITY: "sequence_diversity"}
_RESEARCH_GROUPS = (("loss", names.BUCKET_LOSS), ("mask_acc", names.BUCKET_ACCURACY),
                    ("grad_norm", names.BUCKET_GRADIENT_NORM))
_SUMMARY_ROWS = ((names.TOTAL_STEPS, "steps"), (names.FINAL_LOSS, "final train loss"),
                 (names.BEST_VAL_LOSS, "best val loss"), (names.TRAINING_TIME_HOURS, "training time"),
                 (names.ALERTS_TOTAL, "health alerts"))
_GENERIC_ITEMS = 8  # a row of another kind shows this many values, then how many more
_SAMPLE_INDENT = "      "


def research_line(step: int, row: Mapping[str, Scalar]) -> str:
    """Tier 2: each quantity over the low / medium / high corruption buckets."""
    parts = [f"research step {step} (buckets low/med/high)"]
    for label, pattern in _RESEARCH_GROUPS:
        keys = [pattern.format(bucket=b) for b in names.BUCKETS]
        if any(k in row for k in keys):
            parts.append(f"{label} " + "/".join(format_number(row.get(k)) for k in keys))
    if names.GRADIENT_RATIO in row:
        parts.append(f"grad_norm high/low {format_number(row[names.GRADIENT_RATIO])}")
    if names.WEIGHT_DIFFICULTY in row:
        parts.append(f"weight~difficulty r {format_number(row[names.WEIGHT_DIFFICULTY])}")
    if names.LOSS_ESTIMATOR_STDERR in row:
        parts.append(f"loss stderr {format_number(row[names.LOSS_ESTIMATOR_STDERR])}")
    if names.GRADIENT_NOISE_SCALE in row:
        parts.append(f"noise scale {format_number(row[names.GRADIENT_NOISE_SCALE])} seq")
    return " | ".join(parts)


def eval_line(step: int, row: Mapping[str, Scalar]) -> str:
    parts = [f"eval step {step}", f"val/loss {format_number(row.get(names.VAL_LOSS))}"]
    parts += [f"{_SHORT[k]} {format_number(row[k])}"
              for k in (names.VAL_PERPLEXITY, names.VAL_MASK_ACCURACY) if k in row]
    return " | ".join(parts)


def advanced_line(step: int, row: Mapping[str, Scalar]) -> str:
    keys = [k for k in (names.ATTENTION_ENTROPY, names.HIDDEN_STATE_NORM, names.SEQUENCE_DIVERSITY) if k in row]
    return " | ".join([f"advanced step {step}", *(f"{_SHORT[k]} {format_number(row[k])}" for k in keys)])


def generic_line(step: int, row: Mapping[str, Scalar]) -> str:
    items = [f"{k} {format_number(shown(k, as_scalar(v)))}" for k, v in list(row.items())[:_GENERIC_ITEMS]]
    more = len(row) - _GENERIC_ITEMS
    return " | ".join([f"step {step}", *items] + ([f"(+{more} more in metrics.jsonl)"] if more > 0 else []))


def summary_table(row: Mapping[str, Scalar]) -> str:
    """The run's summary, one figure per line (all of it is in summary.json)."""
    lines = ["run summary (all of it in summary.json):"]
    for key, label in _SUMMARY_ROWS:
        if key not in row:
            continue
        value = as_scalar(row[key])
        if key == names.TRAINING_TIME_HOURS and value is not None:
            text = duration(value * 3600)
        else:
            text = format_number(shown(key, value))
        lines.append(f"  {label:<18}{text}")
    return "\n".join(lines)


def sample_block(step: int, texts: Mapping[str, str]) -> str:
    """Samples as indented text, not escaped one-line reprs."""
    lines = [f"samples at step {step}:"]
    for key, text in texts.items():
        index = key.rsplit("/", 1)[-1]
        body = text.splitlines() or [""]
        lines.append(f"  [{index}] {body[0]}")
        lines += [_SAMPLE_INDENT + line for line in body[1:]]
    return "\n".join(lines)


class Console(MetricWriter):
    """Progress and short lines for a run from `start_step` to `num_steps`.

    `advance(step)` is called by the loop after every step (host only, never a device sync);
    rows and texts arrive as for any other writer.
    """

    def __init__(self, num_steps: int, start_step: int = 0, *, stream: TextIO | None = None,
                 terminal: bool | None = None):
        self.num_steps, self._stream = num_steps, stream or sys.stderr
        self._terminal = self._stream.isatty() if terminal is None else terminal
        self._bar: tqdm | None = None
        self._step, self._start_step = start_step, start_step
        self._mark = (start_step, time.perf_counter())  # (step, time) at the last train line
        self._latest: dict[str, str] = {}

    # ----------------------------------------------------------- progress

    def advance(self, step: int) -> None:
        self._step = step
        if self._terminal:
            if self._bar is None:
                self._bar = tqdm(total=self.num_steps, initial=self._start_step, unit="step", file=self._stream,
                                 dynamic_ncols=True, mininterval=0.5, smoothing=0.05)
            self._bar.update(step - self._bar.n)

    @contextlib.contextmanager
    def compiling(self, what: str) -> Iterator[None]:
        """"compiling <what>…" before a first call, and its time after (a cache hit is quick).
        That time is left out of the steps/s and ETA of the next train line."""
        self.print(f"compiling {what}…")
        tic = time.perf_counter()
        yield
        seconds = time.perf_counter() - tic
        self._mark = (self._mark[0], self._mark[1] + seconds)
        self.print(f"{what} ready in {seconds:.1f} s")

    def print(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self._stream)
        else:  # one record: a block keeps its indentation under the log prefix
            logging.info(text)

    def _progress(self, step: int) -> tuple[str, list[str]]:
        """("step/total %", [steps/s, ETA]) over the steps since the last train line."""
        (last_step, last_time), now = self._mark, time.perf_counter()
        self._mark = (step, now)
        where, speed = f"step {step}", []
        if self.num_steps > 0:
            where += f"/{self.num_steps} {100 * step // self.num_steps}%"
        if step > last_step and now > last_time:
            rate = (step - last_step) / (now - last_time)
            speed.append(f"{rate:.2f} step/s" if rate < 10 else f"{rate:.0f} step/s")
            if 0 < self.num_steps and step < self.num_steps:
                speed.append(f"ETA {duration((self.num_steps - step) / rate)}")
        return where, speed

    def _show_in_bar(self, **fields: str) -> None:
        self._latest.update(fields)
        if self._bar is not None:
            self._bar.set_postfix_str(" ".join(f"{k} {v}" for k, v in self._latest.items()), refresh=False)

    # ----------------------------------------------------------- rows

    def train_line(self, step: int, row: Mapping[str, Scalar]) -> str:
        where, speed = self._progress(step)
        values = [f"{_SHORT[k]} {format_number(as_scalar(row[k]))}"
                  for k in (names.TRAIN_LOSS, names.MASK_ACCURACY, names.GRAD_NORM) if k in row]
        if "val" in self._latest:
            values.append(f"val {self._latest['val']}")
        tokens = as_scalar(row.get(names.TOKENS_PER_SECOND))
        if tokens is not None:
            speed.append(f"{thousands(tokens)} tok/s")
        return " | ".join([where, *values, *speed])

    def write_scalars(self, step: int, scalars: Mapping[str, float | None]) -> None:
        row = {k: as_scalar(v) for k, v in scalars.items()}
        if names.TRAIN_LOSS in row:
            self.print(self.train_line(step, row))
            self._show_in_bar(loss=format_number(row[names.TRAIN_LOSS]),
                              **({"acc": format_number(row[names.MASK_ACCURACY])} if names.MASK_ACCURACY in row else {}),
                              **({"tok/s": thousands(row[names.TOKENS_PER_SECOND])}
                                 if row.get(names.TOKENS_PER_SECOND) is not None else {}))
        elif names.VAL_LOSS in row:
            self._show_in_bar(val=format_number(row[names.VAL_LOSS]))
            self.print(eval_line(step, row))
        elif any(k.startswith("research/") for k in row):
            self.print(research_line(step, row))
        elif any(k.startswith("advanced/") for k in row):
            self.print(advanced_line(step, row))
        elif names.TOTAL_STEPS in row:
            self.print(summary_table(row))
        else:
            self.print(generic_line(step, row))

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        samples = {k: v for k, v in texts.items() if k.startswith("samples/")}  # alerts are logged already
        if samples:
            self.print(sample_block(step, samples))

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        self.print(config_line(hparams))

    def flush(self) -> None:
        if self._bar is not None:
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def config_line(config: Mapping[str, Any]) -> str:
    """The settings a person checks first; config.json (and TensorBoard's `hparams`) has all."""
    model, data, training = (config.get(k, {}) for k in ("model", "data", "training"))
    parts = [f"{model.get('kind', 'diffusion')} model {model.get('num_layers')}×{model.get('d_model')} "
             f"({model.get('num_heads')} heads)",
             f"data {data.get('source')} ({data.get('tokenizer')}, seq_len {data.get('seq_len')})",
             f"batch {training.get('batch_size')} × {training.get('num_steps')} steps, lr {training.get('learning_rate')}"]
    return "config: " + " | ".join(parts) + " (all settings in config.json)"
