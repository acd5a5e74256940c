"""Compilation: JAX's persistent compilation cache, and a count of the train step's compiles.

The cache stores every compiled XLA executable on disk, keyed by the program, the devices
and the compiler options, so a resumed run (or a second run of the same config) loads its
train, eval and analysis steps instead of compiling them again. By default it lives in the
run's workdir (`<workdir>/compilation_cache`), or where JAX's own `JAX_COMPILATION_CACHE_DIR`
environment variable points when that is set; `training.compilation_cache_dir` moves it,
for example to one directory shared by the runs of a sweep, or turns it off ('none'); it
also stays off on a disk with less than 256 MB free. In a multi-host job JAX writes entries
from process 0 only, so the other hosts load them only if the directory is shared.

`CompileCounter` counts, per function name, how often JAX traced a jitted function to a
jaxpr and how often XLA compiled one, from the events JAX reports to `jax.monitoring`
listeners: the tests' evidence that a run compiles each program once (the loop calls the
programs `tdlm_jax.training.programs` compiled before the first step, so nothing in it can
recompile silently: an input of another shape or sharding would be an error).
"""

from __future__ import annotations

import collections
import os
import shutil
import threading
from typing import Any

import jax
import ml_collections
from absl import logging

from tdlm_jax.errors import CheckpointError, ConfigError

CACHE_SUBDIR = "compilation_cache"
DISABLED = "none"
# JAX's own setting, read from the environment: where it is set, the default ('') keeps to it
# rather than overriding it with the workdir (a user's, or a test session's, shared cache).
JAX_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
# Every program is cached, not only those that took JAX's default of 1 s or more to compile:
# a CPU run's steps often compile in less, and a resumed run should recompile nothing.
MIN_COMPILE_SECONDS = 0.0
# Below this much free space the cache stays off: JAX writes entries in place, so on a nearly
# full disk they would take the last bytes that metrics and checkpoints need.
MIN_FREE_BYTES = 256 * 2**20

# The duration events `jax._src.dispatch` reports, with the function's name as `fun_name`,
# and the events of JAX's persistent cache (a miss is counted when its entry is written).
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
CACHE_MISS_EVENT = "/jax/compilation_cache/cache_misses"


def cache_dir(config: ml_collections.ConfigDict, workdir: str) -> str | None:
    """The cache directory `training.compilation_cache_dir` names: '' (the default) is
    $JAX_COMPILATION_CACHE_DIR where that is set and <workdir>/compilation_cache otherwise,
    'none' is no cache (None), anything else is a path."""
    value = config.training.get("compilation_cache_dir", "")
    if not isinstance(value, str):
        raise ConfigError(f"config error: training.compilation_cache_dir={value!r}: must be a path, '' (in the "
                          f"workdir) or '{DISABLED}'")
    if value.strip().lower() == DISABLED:
        return None
    if value.strip():
        return os.path.expanduser(value)
    from_jax = os.environ.get(JAX_CACHE_ENV)
    return os.path.expanduser(from_jax) if from_jax else os.path.join(workdir, CACHE_SUBDIR)


def enable_persistent_cache(path: str | None) -> None:
    """Points JAX's persistent compilation cache at `path` (None turns it off) for this process.

    The cache stays off, with a warning, when its disk has less than `MIN_FREE_BYTES` free.
    JAX opens its cache once, at the first compile after the directory is set, so moving it
    (a second run in the same process, as in tests or sweeps) also resets that state.
    """
    if path is not None:
        try:
            os.makedirs(path, exist_ok=True)
            free = shutil.disk_usage(path).free
        except OSError as e:
            raise CheckpointError(f"cannot create the compilation cache {path} ({e.strerror}): fix permissions, or "
                                  "set --config.training.compilation_cache_dir to another path or 'none'") from e
        if free < MIN_FREE_BYTES:
            logging.warning("compilation cache off: only %.1f MB free on the disk of %s; free space or set "
                            "--config.training.compilation_cache_dir to another disk", free / 2**20, path)
            path = None
    if jax.config.jax_compilation_cache_dir != path:
        jax.config.update("jax_compilation_cache_dir", path)
        _reset_cache_state()
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    if path is not None:
        logging.info("persistent compilation cache: %s (%d compiled programs)", path, len(cache_entries(path)))


def _reset_cache_state() -> None:
    """Makes JAX reopen its cache at the next compile (jax 0.10 keeps the opened cache in a
    module global; `reset_cache` is its documented way back to the unopened state)."""
    from jax._src import compilation_cache  # not re-exported by the public jax API

    compilation_cache.reset_cache()


def cache_entries(path: str) -> list[str]:
    """The executables stored in the cache directory `path` (JAX writes one `<key>-cache` file each)."""
    if not os.path.isdir(path):
        return []
    return sorted(name for name in os.listdir(path) if name.endswith("-cache"))


class CompileCounter:
    """Counts traces and compiles per function name, and persistent-cache hits and writes,
    while active (a context manager).

    Counts come from `jax.monitoring` events, so they see every jitted function in the
    process, whatever thread calls it: `traces('train_step')` is how often `train_step` was
    traced to a jaxpr, `compiles('train_step')` how often an executable was built for it,
    by XLA or from the persistent cache (a new input sharding compiles without a retrace,
    so both are counted).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, collections.Counter] = {TRACE_EVENT: collections.Counter(),
                                                        COMPILE_EVENT: collections.Counter()}
        self.cache_hits = 0
        self.cache_writes = 0

    def _listen_duration(self, event: str, duration_secs: float, **kwargs: Any) -> None:
        del duration_secs
        if event in self._counts:
            with self._lock:
                self._counts[event][_base_name(str(kwargs.get("fun_name", "")))] += 1

    def _listen(self, event: str, **kwargs: Any) -> None:
        del kwargs
        with self._lock:
            self.cache_hits += int(event == CACHE_HIT_EVENT)
            self.cache_writes += int(event == CACHE_MISS_EVENT)

    def __enter__(self) -> "CompileCounter":
        jax.monitoring.register_event_duration_secs_listener(self._listen_duration)
        jax.monitoring.register_event_listener(self._listen)
        return self

    def __exit__(self, *exc_info: object) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listen_duration)
        jax.monitoring.unregister_event_listener(self._listen)

    def traces(self, name: str) -> int:
        with self._lock:
            return self._counts[TRACE_EVENT][name]

    def compiles(self, name: str) -> int:
        with self._lock:
            return self._counts[COMPILE_EVENT][name]


def _base_name(fun_name: str) -> str:
    """'train_step' from the names JAX reports: 'train_step' when tracing, 'jit(train_step)' when compiling."""
    if fun_name.startswith("jit(") and fun_name.endswith(")"):
        return fun_name[len("jit("):-1]
    return fun_name


_PROCESS_COUNTER: CompileCounter | None = None
_PROCESS_COUNTER_LOCK = threading.Lock()


def process_counter() -> CompileCounter:
    """A `CompileCounter` that counts for the rest of the process, started on first use."""
    global _PROCESS_COUNTER
    with _PROCESS_COUNTER_LOCK:
        if _PROCESS_COUNTER is None:
            _PROCESS_COUNTER = CompileCounter().__enter__()
        return _PROCESS_COUNTER
