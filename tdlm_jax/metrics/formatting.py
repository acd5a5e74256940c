"""The number formatters of the console, alerts, the run report, the sweep comparison and
the evaluation table, so a value reads the same wherever it is shown."""

from __future__ import annotations

import math
from typing import Any


def format_number(value: Any, missing: str = "n/a") -> str:
    """A compact number: `missing` for None, ints as ints, 4 decimals (1 from 100 up, so
    10477.1 rather than 10477.1047), integral floats from 100 up as ints (counts and steps:
    1200, not 1200.0 or 1.2000e+03), e-notation when tiny or huge; anything else as `str`."""
    if value is None:
        return missing
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or not math.isfinite(value):
        return str(value)
    if value.is_integer() and 100 <= abs(value) < 1e15:
        return str(int(value))
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
        return f"{value:.4e}"
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.4f}"


def thousands(value: float | None) -> str:
    """A rate for a glance: 12700.0 -> 12.7k, 3.2e6 -> 3.2M."""
    if value is None:
        return "n/a"
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}"


def duration(seconds: float) -> str:
    """A time for a glance: 12s, 4m50s, 1h05m."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def byte_size(num_bytes: float) -> str:
    """A memory size for a glance, in binary units: 512 B, 3.1 MiB, 19.4 GiB."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(num_bytes) >= size:
            return f"{num_bytes / size:.1f} {unit}"
    return f"{num_bytes:.0f} B"
