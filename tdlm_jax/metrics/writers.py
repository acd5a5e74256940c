"""Metric writers: the clu `MetricWriter` interface over TensorBoard and JSONL (the console's
writer is `tdlm_jax.metrics.console`).

clu itself needs TensorFlow, so this module re-implements its small interface on top of
tensorboardX. A scalar value of `None` means "missing" (e.g. the accuracy of an empty
bucket) and is never shown as 0: TensorBoard skips it, JSONL writes `null`, the console
prints `n/a`.

Hyperparameters live in `<workdir>/config.json` (written by the trainer); here they only
go to TensorBoard, as a text summary, and to the console. metrics.jsonl rows are encoded by
`tdlm_jax.metrics.jsonl`; the run's set of writers is built by `tdlm_jax.metrics.run_writer`.
"""

import abc
import glob
import os
import struct
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from tensorboardX import summary as tb_summary
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import RecordWriter, masked_crc32c

from tdlm_jax.metrics import catalogue, jsonl

Scalar = int | float | None


class MetricWriter(abc.ABC):
    """Writes scalars, texts and hyperparameters (same methods as clu's MetricWriter)."""

    @abc.abstractmethod
    def write_scalars(self, step: int, scalars: Mapping[str, float | None]) -> None:
        """Writes scalar values at `step`; a `None` value means "missing"."""

    @abc.abstractmethod
    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        """Writes text values (e.g. generated samples) at `step`."""

    @abc.abstractmethod
    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Writes hyperparameters, possibly nested mappings."""

    def write_histograms(self, step: int, histograms: Mapping[str, Sequence[float]]) -> None:
        """Writes distributions given as the weights of consecutive unit-width buckets
        [0, 1), [1, 2), … (e.g. the adaptive time proposal's q over its bins); writers
        without a histogram view ignore them (the values are also logged as scalars)."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Makes everything written so far durable."""

    @abc.abstractmethod
    def close(self) -> None:
        """Flushes and releases resources; the writer must not be used afterwards."""

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def as_scalar(value: Any) -> Scalar:
    """Converts a Python, numpy or 0-d jax value to a Python int/float (None stays None).

    Ints stay ints so that counters (tokens seen, steps) are not shown as 1.2e+09.
    """
    if value is None:
        return None
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"scalar metric must have exactly one element, got shape {array.shape}")
    item = array.reshape(()).item()
    if isinstance(item, bool):
        return int(item)
    if isinstance(item, int):
        return item
    return float(item)


def flatten_hparams(hparams: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flattens nested mappings to `{"a.b": value}`, keeping the insertion order."""
    flat: dict[str, Any] = {}
    for key, value in hparams.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_hparams(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


class TensorBoardWriter(MetricWriter):
    """Writes a TensorBoard event file in `logdir`, with tensorboardX's summary protos.

    Events are written synchronously, not through tensorboardX's `SummaryWriter`, whose
    background thread holds queued events that a kill loses: here `flush` makes every event
    written so far durable, which a checkpoint's commit relies on. Writes happen on logging
    steps only, so this costs nothing measurable.
    """

    def __init__(self, logdir: str) -> None:
        os.makedirs(logdir, exist_ok=True)
        self._events = EventsWriter(os.path.join(logdir, "events"))

    def _write(self, step: int, summary: Any) -> None:
        self._events.write_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def write_scalars(self, step: int, scalars: Mapping[str, float | None]) -> None:
        for key, value in scalars.items():
            value = as_scalar(value)
            if value is not None:  # a missing value must not become a point on a curve
                self._write(step, tb_summary.scalar(key, float(value)))

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        for key, text in texts.items():
            self._write(step, tb_summary.text(key, text))

    def write_histograms(self, step: int, histograms: Mapping[str, Sequence[float]]) -> None:
        for key, weights in histograms.items():
            weights = [float(w) for w in weights]
            centres = [k + 0.5 for k in range(len(weights))]
            self._write(step, tb_summary.histogram_raw(
                key, min=0.0, max=float(len(weights)), num=sum(weights),
                sum=sum(w * c for w, c in zip(weights, centres)), sum_squares=sum(w * c * c for w, c in zip(weights, centres)),
                bucket_limits=[float(k + 1) for k in range(len(weights))], bucket_counts=weights))

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        # add_hparams writes into a new timestamped sub-directory and only accepts flat
        # str/bool/number values, so a markdown table in a text summary is more robust.
        rows = [f"| `{k}` | `{v!r}` |" for k, v in flatten_hparams(hparams).items()]
        table = "\n".join(["| name | value |", "| --- | --- |", *rows])
        self._write(0, tb_summary.text(catalogue.HPARAMS_TEXT, table))

    def flush(self) -> None:
        self._events.flush()

    def close(self) -> None:
        self._events.close()


def _read_records(path: str) -> Iterator[bytes]:
    """Yields the payloads of a TFRecord file: u64 length, u32 crc, data, u32 crc.

    Stops at the first torn or corrupt record, which is what a killed writer leaves.
    """
    with open(path, "rb") as f:
        while True:
            header = f.read(12)
            if len(header) < 12:
                return
            length_bytes, (header_crc,) = header[:8], struct.unpack("<I", header[8:])
            if masked_crc32c(length_bytes) != header_crc:
                return
            (length,) = struct.unpack("<Q", length_bytes)
            data = f.read(length)
            footer = f.read(4)
            if len(data) < length or len(footer) < 4:
                return
            if masked_crc32c(data) != struct.unpack("<I", footer)[0]:
                return
            yield data


def _event_files(logdir: str) -> list[str]:
    return sorted(p for p in glob.glob(os.path.join(logdir, "events.out.tfevents.*")) if not p.endswith(".tmp"))


def drop_events_after(logdir: str, step: int) -> int:
    """Rewrites the event files directly in `logdir` without their events past `step` (and
    deletes those left with none): what a run resumed from the checkpoint at `step` logs again.
    Each file is rewritten through a temporary file and a rename. Returns the events dropped."""
    dropped = 0
    for path in _event_files(logdir):
        events = [event_pb2.Event.FromString(record) for record in _read_records(path)]
        # Summaries at step 0 (the hparams text) go too: every start writes them again.
        kept = [e for e in events if not e.HasField("summary") or 0 < e.step <= step]
        dropped += len(events) - len(kept)
        if len(kept) == len(events):
            continue
        if all(not e.HasField("summary") for e in kept):  # nothing but the file's own header
            os.remove(path)
            continue
        tmp = path + ".tmp"
        writer = RecordWriter(tmp)
        for event in kept:
            writer.write(event.SerializeToString())
        writer.close()
        os.replace(tmp, path)
    return dropped


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """Reads the scalars of all event files directly in `logdir`: {tag: [(step, value)]}.

    Files are read in name order (their names start with the creation time), so a
    resumed run's points follow the earlier run's. Values are float32-precision, as
    TensorBoard stores them.
    """
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in _event_files(logdir):
        for record in _read_records(path):
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                if value.WhichOneof("value") == "simple_value":
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


class JsonlWriter(MetricWriter):
    """Appends one JSON object per `write_scalars` call to `path`.

    Rows look like `{"step": 100, "train/loss": 3.1, "eval/acc": null}`, in the encoding
    of `tdlm_jax.metrics.jsonl` (which reads them back). Texts and hparams are not written
    here (config.json holds the hparams).
    """

    def __init__(self, path: str) -> None:
        self._path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write_scalars(self, step: int, scalars: Mapping[str, float | None]) -> None:
        if "step" in scalars:
            raise ValueError("'step' is reserved in metrics.jsonl rows; rename that metric")
        # Appended and closed on every call, so that a killed run loses nothing; writes only
        # happen on logging steps, so this costs nothing measurable.
        jsonl.append(self._path, {"step": int(step), **{k: as_scalar(v) for k, v in scalars.items()}})

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        del step, texts  # metrics.jsonl holds scalars only.

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        del hparams  # config.json holds the hparams.

    def flush(self) -> None:
        pass  # every write is already flushed.

    def close(self) -> None:
        pass


def shown(name: str, value: Scalar) -> Scalar:
    """A catalogued count (tokens, sequences, ...) that is whole, as an int: 10, not 10.0000."""
    metric = catalogue.lookup(name)
    if metric is not None and metric.is_count and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


class MultiWriter(MetricWriter):
    """Fans every call out to several writers, in order."""

    def __init__(self, writers: Sequence[MetricWriter]) -> None:
        self._writers = list(writers)

    def write_scalars(self, step: int, scalars: Mapping[str, float | None]) -> None:
        for writer in self._writers:
            writer.write_scalars(step, scalars)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        for writer in self._writers:
            writer.write_texts(step, texts)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        for writer in self._writers:
            writer.write_hparams(hparams)

    def write_histograms(self, step: int, histograms: Mapping[str, Sequence[float]]) -> None:
        for writer in self._writers:
            writer.write_histograms(step, histograms)

    def flush(self) -> None:
        for writer in self._writers:
            writer.flush()

    def close(self) -> None:
        for writer in self._writers:
            writer.close()


class NullWriter(MetricWriter):
    """Writes nothing: the writer of non-primary processes."""

    def write_scalars(self, step: int, scalars: Mapping[str, float | None]) -> None:
        pass

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        pass

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
