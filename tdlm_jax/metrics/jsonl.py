"""The JSONL codec of a run's row files (metrics.jsonl, alerts.jsonl): one JSON object per line.

Every reader and writer of those files goes through here: the metric writer, the health
monitor, the run report, the sweep comparison and the resume of a run. No JAX import, so
the report reads a live run without loading JAX.

- A row is a dict with an int "step". `None` means missing and is written as `null`.
- JSON has no NaN/Infinity literals (Python's json module would write them anyway, and
  other readers reject them), so non-finite floats are written as the strings "NaN",
  "Infinity", "-Infinity", also inside nested dicts (an alert's values), and read back
  as floats.
- A run killed mid-write leaves a torn last line: readers skip unreadable lines and
  count them; `drop_rows_after` removes them.
- Appends open and close the file each time, so a killed run loses nothing written.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

# The files of a run's workdir read and written through here (the rest: tdlm_jax.training.rundir).
METRICS_FILE, ALERTS_FILE, SAMPLES_FILE = "metrics.jsonl", "alerts.jsonl", "samples.jsonl"
CONFIG_FILE, SUMMARY_FILE = "config.json", "summary.json"

_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def to_json_tree(value: Any) -> Any:
    """`value` (nested dicts and lists) with its non-finite floats as strings: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Mapping):
        return {k: to_json_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_tree(v) for v in value]
    return value


def from_json_tree(value: Any) -> Any:
    """The inverse of `to_json_tree`."""
    if isinstance(value, str):
        return _NON_FINITE.get(value, value)
    if isinstance(value, dict):
        return {k: from_json_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json_tree(v) for v in value]
    return value


def encode(row: Mapping[str, Any]) -> str:
    """One strict-JSON line (no newline) of a row."""
    return json.dumps(to_json_tree(row), allow_nan=False)


def append(path: str, row: Mapping[str, Any]) -> None:
    """Appends one row to `path` (created with its directory if needed)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    line = encode(row) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)


def _parse(line: str) -> dict[str, Any] | None:
    """The row of one line, or None if it is not a JSON object with an int step."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(row, dict) or not isinstance(row.get("step"), int) or isinstance(row["step"], bool):
        return None
    return from_json_tree(row)


def _parsed_lines(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """(line, its row or None if unreadable) for every non-blank line of `path`; bytes that
    are not UTF-8 (a binary file given by mistake) make their line unreadable, not the file."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                yield line, _parse(line)


def read_counted(path: str | os.PathLike) -> tuple[list[dict[str, Any]], int]:
    """(rows, number of unreadable lines); a missing file has no rows."""
    if not os.path.exists(path):
        return [], 0
    parsed = [row for _, row in _parsed_lines(path)]
    rows = [row for row in parsed if row is not None]
    return rows, len(parsed) - len(rows)


def read(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The readable rows of `path`, in file order."""
    return read_counted(path)[0]


def drop_rows_after(path: str, step: int, also: Callable[[dict[str, Any]], bool] | None = None) -> int:
    """Rewrites `path` without its rows past `step`, the rows `also` picks, and unreadable lines.

    A run resumed from the checkpoint at `step` logs the later steps again; without this they
    would appear twice. The rewrite is atomic (a temporary file, then a rename). Returns the
    number of lines dropped.
    """
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    for line, row in _parsed_lines(path):
        if row is not None and row["step"] <= step and not (also and also(row)):
            kept.append(line if line.endswith("\n") else line + "\n")
        else:
            dropped += 1
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)
    return dropped


def read_json(path: str) -> dict[str, Any] | None:
    """A JSON object from `path` (config.json, summary.json), or None if missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None
