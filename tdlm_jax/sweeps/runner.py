"""Ablation sweeps (`python -m tdlm_jax.sweep`): load a sweep file, name its points, run them.

A sweep file (see experiments/) defines `get_sweep() -> list[dict]` of flat config
overrides, `BASE_CONFIG` (a config path relative to the repo root, or absolute) and
optionally `CPU_OVERRIDES`, applied under `--size=cpu` (the default) so the sweep fits a
laptop; `--size=full` drops them. Each point is one `python -m tdlm_jax.main` subprocess
in `DIR/<point name>/`, logging to `DIR/logs/<point name>.txt`, so a point that crashes cannot take the
others down, and rerunning the sweep resumes interrupted points and skips finished ones.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tdlm_jax.errors import SweepError
from tdlm_jax.metrics.catalogue import TOTAL_STEPS

# The repo root: base configs are named relative to it, and subprocesses run there so that
# `python -m tdlm_jax.main` imports this checkout whether or not the package is installed.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZES = ("cpu", "full")
_SAFE = re.compile(r"[^A-Za-z0-9.+-]")


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A loaded sweep file: its points' overrides and what they apply to."""

    path: str
    base_config: str  # absolute path
    points: tuple[dict[str, Any], ...]
    cpu_overrides: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of a sweep: its name, its own overrides, all overrides passed, and its dir."""

    name: str
    overrides: dict[str, Any]  # the sweep axis values, which name the point
    flags: dict[str, Any]  # size overrides, then the point's own (the point's win)
    directory: str
    command: tuple[str, ...]


# --- loading and naming ---------------------------------------------------------------------


# The CPU size most sweep files start from (their CPU_OVERRIDES extend it): short runs,
# frequent evaluation for curves, no text samples. About 2.3 minutes a point on 2 idle cores.
CPU_SIZE: dict[str, Any] = {
    "training.num_steps": 300,
    "training.eval_every_n_steps": 50,
    "training.logging_steps": 50,
    "training.detailed_metrics_steps": 100,
    "training.checkpoint_every_n_steps": 100,
    "sampling.num_samples_at_eval": 0,
}


def _check_overrides(overrides: Any, where: str) -> dict[str, Any]:
    """The overrides as a dict with dotted string keys, or a SweepError naming `where`."""
    if not isinstance(overrides, Mapping):
        raise SweepError(f"sweep error: {where} must be a dict of config overrides, got {type(overrides).__name__}")
    for key in overrides:
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
            raise SweepError(f"sweep error: {where}: {key!r} is not a config key like 'diffusion.schedule'")
    return dict(overrides)


def load_sweep(path: str) -> Sweep:
    """Runs the sweep file and checks what it defines."""
    if not os.path.isfile(path):
        raise SweepError(f"sweep error: {path!r} is not a file; pass a sweep file, e.g. experiments/loss_weighting.py")
    module = _run_user_code(path, lambda: runpy.run_path(path), "could not be loaded")
    get_sweep, base = module.get("get_sweep"), module.get("BASE_CONFIG")
    if not callable(get_sweep) or not isinstance(base, str):
        raise SweepError(f"sweep error: {path} must define get_sweep() and BASE_CONFIG (a config path)")
    base_path = base if os.path.isabs(base) else os.path.join(REPO_ROOT, base)
    if not os.path.isfile(base_path):
        raise SweepError(f"sweep error: {path}: BASE_CONFIG={base!r} not found (relative paths start at {REPO_ROOT})")
    points = _run_user_code(path, get_sweep, "get_sweep() raised")
    if not isinstance(points, (list, tuple)) or not points:
        raise SweepError(f"sweep error: {path}: get_sweep() must return a non-empty list of override dicts")
    checked = tuple(_check_overrides(p, f"{path}: point {i}") for i, p in enumerate(points))
    cpu = _check_overrides(module.get("CPU_OVERRIDES", {}), f"{path}: CPU_OVERRIDES")
    return Sweep(os.path.abspath(path), base_path, checked, cpu)


def _run_user_code(path: str, call: Callable[[], Any], what: str) -> Any:
    """`call()`, with whatever a user's file raises turned into a one-line SweepError naming it."""
    try:
        return call()
    except Exception as e:  # a sweep or config file is arbitrary code: any error is the file's
        first = (str(e).strip().splitlines() or [""])[0]
        raise SweepError(f"sweep error: {path} {what} ({type(e).__name__}: {first}): fix that file") from None


def _safe(text: str) -> str:
    return _SAFE.sub("_", text)


def point_names(points: Sequence[Mapping[str, Any]]) -> list[str]:
    """Filesystem-safe, distinct names: `diffusion.loss_weighting=uniform, seed=1` →
    `loss_weighting-uniform__seed-1`.

    Keys are shortened to their last part unless two keys of the sweep share it (then the
    whole key, dots kept), so names stay readable and unambiguous.
    """
    keys = {k for p in points for k in p}
    leaves: dict[str, set[str]] = {}
    for key in keys:
        leaves.setdefault(key.split(".")[-1], set()).add(key)
    short = {k: k.split(".")[-1] if len(leaves[k.split(".")[-1]]) == 1 else k for k in keys}
    names = ["__".join(f"{_safe(short[k])}-{_safe(format_value(v))}" for k, v in p.items()) or "default"
             for p in points]
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise SweepError(f"sweep error: points {seen[name]} and {i} both get the name {name!r}: "
                             "make their overrides differ")
        seen[name] = i
    return names


def format_value(value: Any) -> str:
    """An override value as `--config.key=` text: strings as they are, others as Python literals."""
    return value if isinstance(value, str) else repr(value)


def build_points(sweep: Sweep, workdir: str, size: str, python: str = sys.executable) -> list[Point]:
    """The sweep's points at this size, with their directories and commands."""
    if size not in SIZES:
        raise SweepError(f"sweep error: --size={size!r}: must be one of {', '.join(SIZES)}")
    extra = sweep.cpu_overrides if size == "cpu" else {}
    root = os.path.abspath(workdir)
    points = []
    for name, overrides in zip(point_names(sweep.points), sweep.points):
        flags = {**extra, **overrides}
        directory = os.path.join(root, name)
        command = (python, "-m", "tdlm_jax.main", f"--config={sweep.base_config}", f"--workdir={directory}",
                   *(f"--config.{k}={format_value(v)}" for k, v in flags.items()))
        points.append(Point(name, overrides, flags, directory, command))
    return points


def shell_line(point: Point) -> str:
    """The point's command as one shell line, run from the repo root like the runner does."""
    return f"cd {shlex.quote(REPO_ROOT)} && {shlex.join(point.command)}"


# --- skipping and running -------------------------------------------------------------------


def expected_steps(base_config: str, flags: Mapping[str, Any]) -> int:
    """training.num_steps of the point: its override, else the base config's value."""
    if "training.num_steps" in flags:
        return int(flags["training.num_steps"])
    config = _run_user_code(base_config, lambda: runpy.run_path(base_config)["get_config"](), "could not be loaded")
    return int(config.training.num_steps)


def is_finished(directory: str, num_steps: int) -> bool:
    """True if the point's run wrote its summary after exactly `num_steps` steps."""
    try:
        with open(os.path.join(directory, "summary.json"), encoding="utf-8") as f:
            total = json.load(f).get(TOTAL_STEPS)
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(total, (int, float)) and int(total) == num_steps


def write_sweep_json(workdir: str, sweep: Sweep, size: str, points: Sequence[Point]) -> str:
    """`workdir`/sweep.json: what the comparison reads to find and label the points."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "sweep.json")
    record = {"sweep_file": sweep.path, "base_config": sweep.base_config, "size": size,
              "points": [{"name": p.name, "overrides": p.overrides, "flags": p.flags, "dir": p.directory,
                          "command": shell_line(p)} for p in points]}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    return path


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How one point ended: 'finished', 'skipped' or 'failed' (with its exit status)."""

    point: Point
    status: str
    returncode: int | None = None

    @property
    def log(self) -> str:
        return log_path(self.point)


def log_path(point: Point) -> str:
    """`<sweep dir>/logs/<point>.txt`: outside the point's workdir, which the trainer keeps to
    its own files (it refuses a workdir holding anything else)."""
    return os.path.join(os.path.dirname(point.directory), "logs", f"{point.name}.txt")


def _start(point: Point) -> subprocess.Popen:
    target = log_path(point)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    # Appended, not truncated: a resumed or retried point keeps the log of earlier attempts.
    with open(target, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shell_line(point)}\n".encode())
        log.flush()
        return subprocess.Popen(point.command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)


def run_points(points: Sequence[Point], steps: Sequence[int], parallel: int,
               say: Callable[[str], None] = print, poll_s: float = 0.5) -> list[Outcome]:
    """Runs the unfinished points, up to `parallel` at a time; one failure stops nothing."""
    outcomes: dict[str, Outcome] = {}
    queue = []
    for point, num_steps in zip(points, steps):
        if is_finished(point.directory, num_steps):
            outcomes[point.name] = Outcome(point, "skipped")
            say(f"skip {point.name}: finished ({num_steps} steps)")
        else:
            queue.append(point)
    running: dict[str, tuple[Point, subprocess.Popen, float]] = {}
    try:
        while queue or running:
            while queue and len(running) < parallel:
                point = queue.pop(0)
                running[point.name] = (point, _start(point), time.time())
                say(f"start {point.name} ({len(outcomes) + len(running)}/{len(points)})")
            for name, (point, proc, started) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                del running[name]
                status = "finished" if code == 0 else "failed"
                outcomes[name] = Outcome(point, status, code)
                say(f"{status} {name} in {time.time() - started:.0f} s"
                    + ("" if code == 0 else f" (exit {code}; log {outcomes[name].log})"))
            time.sleep(poll_s if running else 0)
    except KeyboardInterrupt:
        # Our children only, by their own handles; rerunning the sweep resumes them.
        for _, proc, _ in running.values():
            proc.terminate()
        for point, proc, _ in running.values():
            proc.wait()
        raise
    return [outcomes[p.name] for p in points]
