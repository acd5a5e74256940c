"""Round trips through every metric-writer backend."""

import json
import math
import os

import numpy as np
import pytest

from tdlm_jax.metrics import jsonl, run_writer, writers
from tdlm_jax.metrics.formatting import format_number


def test_tensorboard_scalars_round_trip(tmp_path):
    logdir = str(tmp_path)
    with writers.TensorBoardWriter(logdir) as writer:
        writer.write_scalars(10, {"train/loss": 3.25, "metrics/acc": None})
        writer.write_scalars(20, {"train/loss": np.float32(2.5), "metrics/acc": 0.5})
        writer.write_texts(20, {"samples/0": "hello\nworld"})
        writer.write_hparams({"model": {"d": 64}, "lr": 3e-4})

    scalars = writers.read_scalars(logdir)
    assert scalars["train/loss"] == [(10, 3.25), (20, 2.5)]
    # A missing value is skipped, never written as 0.
    assert scalars["metrics/acc"] == [(20, 0.5)]
    assert set(scalars) == {"train/loss", "metrics/acc"}


def test_tensorboard_values_are_float32_precision(tmp_path):
    with writers.TensorBoardWriter(str(tmp_path)) as writer:
        writer.write_scalars(1, {"x": 0.1, "nan": math.nan})
    scalars = writers.read_scalars(str(tmp_path))
    assert scalars["x"][0][1] == pytest.approx(0.1, rel=1e-6)
    assert math.isnan(scalars["nan"][0][1])


def test_read_scalars_stops_at_torn_record(tmp_path):
    with writers.TensorBoardWriter(str(tmp_path)) as writer:
        writer.write_scalars(1, {"x": 1.0})
        writer.write_scalars(2, {"x": 2.0})
    (path,) = [p for p in tmp_path.iterdir() if p.name.startswith("events.out")]
    data = path.read_bytes()
    path.write_bytes(data[:-3])  # a run killed in the middle of its last write
    assert writers.read_scalars(str(tmp_path)) == {"x": [(1, 1.0)]}


def test_jsonl_rows_and_non_finite_values(tmp_path):
    path = str(tmp_path / "sub" / "metrics.jsonl")
    with writers.JsonlWriter(path) as writer:
        writer.write_scalars(100, {"train/loss": 3.1, "eval/acc": None, "tokens": 123456})
        writer.write_texts(100, {"samples/0": "ignored"})
        writer.write_hparams({"lr": 1.0})
        writer.write_scalars(200, {"train/loss": math.nan, "g": math.inf, "h": -math.inf})

    # Every line is strict JSON (no bare NaN / Infinity literals).
    with open(path, encoding="utf-8") as f:
        raw = [json.loads(line, parse_constant=pytest.fail) for line in f]
    assert raw[0] == {"step": 100, "train/loss": 3.1, "eval/acc": None, "tokens": 123456}
    assert raw[1] == {"step": 200, "train/loss": "NaN", "g": "Infinity", "h": "-Infinity"}

    rows = jsonl.read(path)
    assert len(rows) == 2
    assert rows[0] == raw[0]
    assert math.isnan(rows[1]["train/loss"])
    assert rows[1]["g"] == math.inf and rows[1]["h"] == -math.inf


def test_jsonl_appends_across_writers(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    writers.JsonlWriter(path).write_scalars(1, {"x": 1.0})
    writers.JsonlWriter(path).write_scalars(2, {"x": 2.0})
    assert [row["step"] for row in jsonl.read(path)] == [1, 2]


def test_jsonl_rejects_step_metric(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        writers.JsonlWriter(str(tmp_path / "m.jsonl")).write_scalars(1, {"step": 1.0})


@pytest.mark.parametrize(
    "value, expected",
    [(None, "n/a"), (0.41234, "0.4123"), (0.0, "0.0000"), (7, "7"), (3e-4, "3.0000e-04"),
     (12345.0, "12345"), (2.5e7 + 0.5, "2.5000e+07"), (math.nan, "nan")],
)
def test_format_number(value, expected):
    assert format_number(value) == expected


def test_as_scalar_accepts_arrays_and_rejects_vectors():
    import jax.numpy as jnp

    assert writers.as_scalar(jnp.float32(1.5)) == 1.5
    assert writers.as_scalar(np.int64(3)) == 3 and isinstance(writers.as_scalar(np.int64(3)), int)
    with pytest.raises(ValueError, match="exactly one element"):
        writers.as_scalar(np.zeros(2))


def test_multi_writer_fans_out(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    with writers.MultiWriter([writers.TensorBoardWriter(str(tmp_path)), writers.JsonlWriter(path)]) as w:
        w.write_scalars(5, {"x": 1.5})
        w.flush()
    assert writers.read_scalars(str(tmp_path)) == {"x": [(5, 1.5)]}
    assert jsonl.read(path) == [{"step": 5, "x": 1.5}]


def test_default_writer_primary(tmp_path):
    workdir = str(tmp_path / "run")
    with run_writer.create_default_writer(workdir, is_primary=True) as writer:
        writer.write_scalars(3, {"train/loss": 2.0, "metrics/acc": None})
    assert writers.read_scalars(workdir) == {"train/loss": [(3, 2.0)]}
    assert jsonl.read(os.path.join(workdir, "metrics.jsonl")) == [
        {"step": 3, "train/loss": 2.0, "metrics/acc": None}
    ]


def test_default_writer_non_primary_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    with run_writer.create_default_writer(str(workdir), is_primary=False) as writer:
        writer.write_scalars(3, {"train/loss": 2.0})
        writer.write_texts(3, {"t": "x"})
        writer.write_hparams({"a": 1})
        writer.flush()
    assert not workdir.exists()


@pytest.mark.parametrize("process_index, writes", [(0, True), (1, False)])
def test_default_writer_uses_process_index(tmp_path, monkeypatch, process_index, writes):
    monkeypatch.setattr(run_writer.jax, "process_index", lambda: process_index)
    workdir = tmp_path / "run"
    with run_writer.create_default_writer(str(workdir)) as writer:
        writer.write_scalars(3, {"train/loss": 2.0})
    assert (workdir / "metrics.jsonl").exists() == writes
    assert (jsonl.read(workdir / "metrics.jsonl") == [{"step": 3, "train/loss": 2.0}]) if writes else not workdir.exists()
