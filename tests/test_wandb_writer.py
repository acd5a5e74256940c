"""The optional Weights & Biases writer, in offline mode only (no network is ever used).

The offline run is read back from the records of its `run-<id>.wandb` protobuf log: an
offline run writes no `files/config.yaml` or `files/wandb-summary.json` (syncing does).
"""

import glob
import json
import math
import os
import struct
import sys
import zlib
from typing import Any

import pytest

from tdlm_jax.errors import ConfigError
from tdlm_jax.metrics import jsonl, run_writer, writers

wandb = pytest.importorskip("wandb")

from tdlm_jax.metrics import wandb_writer  # noqa: E402  (after the importorskip)


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path, monkeypatch):
    """Keeps wandb offline, quiet, and out of $HOME and of the git repo."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # leave pytest's stdout capture alone
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")  # no git subprocesses on the repo
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")
    monkeypatch.setenv("WANDB__DISABLE_STATS", "true")  # no system-metrics sampler
    monkeypatch.setenv("WANDB__DISABLE_META", "true")
    for name in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    yield
    wandb.teardown()  # stops the wandb-core process the test started


# The .wandb file is a LevelDB-style log: a 7-byte file header (":W&B", magic, version),
# then 32 KiB blocks of records, each with a 7-byte header (crc32, length, type);
# a record that does not fit in a block is split into FIRST/MIDDLE/LAST chunks.
_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _read_wandb_log(path: str) -> list[Any]:
    """Returns the `Record` protos of an offline run's `.wandb` file."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    ident, magic, version = struct.unpack("<4sHB", data[:_HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), "unknown .wandb file format"
    records, chunks, pos = [], [], _HEADER
    while pos + _HEADER <= len(data):
        space_left = _BLOCK - pos % _BLOCK
        if space_left < _HEADER:  # the block's tail is zero padding
            pos += space_left
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if length == 0 and kind == 0:  # zero padding at the end of the file
            break
        payload = data[pos + _HEADER:pos + _HEADER + length]
        if len(payload) < length:  # a record still being written
            break
        assert zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == checksum
        pos += _HEADER + length
        chunks.append(payload)
        if kind in (_FULL, _LAST):
            records.append(wandb_internal_pb2.Record.FromString(b"".join(chunks)))
            chunks = []
    return records


def _set_path(row: dict[str, Any], item: Any) -> None:
    """Sets a history/summary/config item; a logged dict (e.g. an Html file) is split by
    wandb into one item per leaf, under `nested_key` paths."""
    path = [item.key] if item.key else list(item.nested_key)
    for key in path[:-1]:
        row = row.setdefault(key, {})
    row[path[-1]] = json.loads(item.value_json)


def _records(run_dir: str, record_type: str) -> list[Any]:
    """The records of one type (`history`, `config`, `run`, ...) of the offline run."""
    (log_path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    return [getattr(r, record_type) for r in _read_wandb_log(log_path)
            if r.WhichOneof("record_type") == record_type]


def _history(run_dir: str) -> list[dict[str, Any]]:
    """The logged history rows of the offline run in `run_dir`, with `_step`."""
    rows = []
    for history in _records(run_dir, "history"):
        row: dict[str, Any] = {}
        for item in history.item:
            _set_path(row, item)
        rows.append(row)
    return rows


def _config(run_dir: str) -> dict[str, Any]:
    """The run config: the one sent at init, updated by later config records.

    Offline runs write no `files/config.yaml` (only syncing does), hence the records.
    """
    config: dict[str, Any] = {}
    (run,) = _records(run_dir, "run")
    for config_record in [run.config, *_records(run_dir, "config")]:
        for item in config_record.update:
            _set_path(config, item)
    return config


def _run_dirs(directory: str) -> list[str]:
    """The offline run directories under `directory`, oldest first.

    `run.finish()` returns before wandb-core has written the run's log to disk (seen
    with wandb 0.31: sometimes only the 7-byte file header is there), so this first
    shuts wandb-core down, which waits for it; the next `wandb.init` starts a new one.
    """
    wandb.teardown()
    return sorted(glob.glob(os.path.join(directory, "wandb", "offline-run-*")))


def _run_dir(directory: str) -> str:
    (run_dir,) = _run_dirs(directory)
    return run_dir


def _make_writer(directory: str, **kwargs: Any) -> wandb_writer.WandbWriter:
    return wandb_writer.WandbWriter(
        project="tdlm-test", entity=None, run_name="run", directory=directory,
        config=kwargs.pop("config", {"model": {"d_model": 64}, "seed": 0}), **kwargs)


def test_offline_round_trip(tmp_path):
    directory = str(tmp_path / "workdir")
    writer = _make_writer(directory)
    writer.write_scalars(1, {"train/loss": 4.0, "metrics/acc": None})
    writer.write_scalars(2, {"train/loss": 3.0, "train/tokens": 4096})
    writer.write_scalars(2, {"val/loss": 3.5})  # a second row at the same step
    writer.write_texts(2, {"samples/0": "a <b>\nc"})
    writer.write_scalars(3, {"train/loss": math.nan, "metrics/acc": None, "g": math.inf})
    writer.write_hparams({"training": {"learning_rate": 2e-3}})
    writer.close()
    writer.close()  # closing twice is harmless

    run_dir = _run_dir(directory)
    rows = _history(run_dir)
    by_step = {row["_step"]: row for row in rows}
    assert sorted(by_step) == [1, 2, 3]
    assert by_step[1]["train/loss"] == 4.0
    # A missing value is skipped, never logged as 0.
    assert not any("metrics/acc" in row for row in rows)
    # Both rows of step 2 landed, in one history row.
    assert by_step[2]["train/loss"] == 3.0
    assert by_step[2]["val/loss"] == 3.5
    assert by_step[2]["train/tokens"] == 4096
    assert by_step[2]["samples/0"]["_type"] == "html-file"
    # Non-finite floats are logged (wandb's JSON spells them NaN / Infinity).
    assert math.isnan(by_step[3]["train/loss"]) and by_step[3]["g"] == math.inf

    (html_path,) = glob.glob(os.path.join(run_dir, "files", "media", "html", "samples", "*.html"))
    with open(html_path, encoding="utf-8") as f:
        assert f.read() == "<pre>a &lt;b&gt;\nc</pre>"

    # Offline runs have no files/wandb-summary.json either: the summary is in records.
    summary: dict[str, Any] = {}
    for summary_record in _records(run_dir, "summary"):
        for item in summary_record.update:
            _set_path(summary, item)
    assert summary["val/loss"] == 3.5 and summary["_step"] == 3

    config = _config(run_dir)
    assert config["model"] == {"d_model": 64}
    assert config["seed"] == 0
    assert config["training"] == {"learning_rate": 2e-3}

def test_run_id_persists_in_directory(tmp_path):
    directory = str(tmp_path / "workdir")
    first = wandb_writer.load_or_create_run_id(directory, "abc123")
    assert first == "abc123"
    assert wandb_writer.load_or_create_run_id(directory, "other") == "abc123"
    with open(os.path.join(directory, wandb_writer.RUN_ID_FILENAME), encoding="utf-8") as f:
        assert f.read().strip() == "abc123"


def test_writer_uses_persisted_run_id(tmp_path):
    directory = str(tmp_path / "workdir")
    os.makedirs(directory)
    with open(os.path.join(directory, wandb_writer.RUN_ID_FILENAME), "w", encoding="utf-8") as f:
        f.write("resumeme42\n")
    with _make_writer(directory) as writer:
        writer.write_scalars(1, {"x": 1.0})
    assert _run_dir(directory).endswith("-resumeme42")


def test_same_workdir_continues_the_same_run(tmp_path):
    directory = str(tmp_path / "workdir")
    with _make_writer(directory) as writer:
        writer.write_scalars(1, {"x": 1.0})
    with _make_writer(directory) as writer:  # a resumed training run
        writer.write_scalars(2, {"x": 2.0})
    # Offline, each start gets its own directory; `wandb sync` sends both to one run.
    first, second = _run_dirs(directory)
    (first_run,), (second_run,) = _records(first, "run"), _records(second, "run")
    assert first_run.run_id == second_run.run_id
    assert second_run.resume
    assert [row["x"] for row in _history(first) + _history(second)] == [1.0, 2.0]


def test_step_before_committed_step_is_dropped(tmp_path):
    directory = str(tmp_path / "workdir")
    with _make_writer(directory) as writer:
        writer.write_scalars(5, {"x": 5.0})
        writer.flush()
        writer.write_scalars(5, {"y": 1.0})  # after a flush, step 5 is over for wandb
        writer.write_scalars(6, {"x": 6.0})
        writer.write_scalars(4, {"y": 2.0})  # a step going backwards is dropped, not raised
    rows = _history(_run_dir(directory))
    assert [(row["_step"], row.get("x"), row.get("y")) for row in rows] == [(5, 5.0, None), (6, 6.0, None)]


def test_missing_wandb_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(ConfigError) as info:
        _make_writer(str(tmp_path / "workdir"))
    assert str(info.value) == (
        "logging.wandb_project is set but wandb is not installed: pip install -e '.[wandb]' "
        "or set --config.logging.wandb_project=''"
    )


def test_failed_init_is_a_config_error(tmp_path, monkeypatch):
    def init(**kwargs: Any) -> None:
        raise wandb.errors.UsageError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb, "init", init)
    with pytest.raises(ConfigError, match=r"could not start the wandb run \(api_key not configured"):
        _make_writer(str(tmp_path / "workdir"))


def test_default_writer_without_wandb_project(tmp_path):
    workdir = tmp_path / "run"
    with run_writer.create_default_writer(str(workdir), is_primary=True, config={"a": 1}) as writer:
        writer.write_scalars(1, {"x": 1.0})
    assert not (workdir / "wandb").exists()
    assert not (workdir / wandb_writer.RUN_ID_FILENAME).exists()


def test_default_writer_with_wandb_project(tmp_path):
    workdir = str(tmp_path / "my_run")
    writer = run_writer.create_default_writer(
        workdir, is_primary=True, wandb_project="tdlm-test", config={"seed": 7})
    with writer:
        writer.write_hparams({"seed": 7, "extra": "x"})
        writer.write_scalars(1, {"train/loss": 2.0, "metrics/acc": None})
    assert jsonl.read(os.path.join(workdir, "metrics.jsonl")) == [
        {"step": 1, "train/loss": 2.0, "metrics/acc": None}
    ]
    run_dir = _run_dir(workdir)
    assert [row["train/loss"] for row in _history(run_dir)] == [2.0]
    config = _config(run_dir)
    assert config["seed"] == 7 and config["extra"] == "x"
    (run,) = _records(run_dir, "run")
    assert (run.display_name, run.project, run.entity) == ("my_run", "tdlm-test", "")

def test_default_writer_non_primary_skips_wandb(tmp_path):
    workdir = tmp_path / "run"
    writer = run_writer.create_default_writer(str(workdir), is_primary=False, wandb_project="tdlm-test")
    assert isinstance(writer, writers.NullWriter)
    writer.close()
    assert not workdir.exists()
