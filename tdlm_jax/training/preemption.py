"""SIGTERM (a preemption notice) as a step at which the loop saves and stops, agreed by every
host of a multi-host job."""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
from absl import logging
from jax.experimental import multihost_utils


class Preemption:
    """While active, SIGTERM (a preemption notice) makes `reached(step)` true at a step: the
    loop finishes that step, saves a checkpoint, flushes the writers and returns.

    A multi-host job must save and stop at the same step on every host, or orbax's save
    waits forever for the hosts that went on. There, JAX's preemption sync manager (started
    by jax.distributed.initialize) catches SIGTERM itself, tells every host, and
    `reached_preemption_sync_point` becomes true at one step they all agree on; it costs no
    host sync on the steps before a notice. A single process just sets a flag. A multi-host
    job whose sync manager is turned off (jax_enable_preemption_service) leaves SIGTERM to
    kill the process: the job then fails and resumes from its last regular checkpoint,
    instead of hanging in a save that only one host started.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous = None
        self._synced = jax.distributed.is_initialized() and _preemption_service_running()
        self._handles_sigterm = self._synced or jax.process_count() == 1
        if not self._handles_sigterm:
            logging.warning("jax_enable_preemption_service is off: a SIGTERM stops this multi-host job without "
                            "a final checkpoint; it resumes from the last one")

    def __enter__(self) -> "Preemption":
        # A Python handler would replace the sync manager's, which then never hears of SIGTERM.
        if (not self._synced and self._handles_sigterm
                and threading.current_thread() is threading.main_thread()):  # signals go to the main thread
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step`; on every host, call it once per step."""
        if self._synced and multihost_utils.reached_preemption_sync_point(step):
            self.requested = True
        return self.requested

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True


def _preemption_service_running() -> bool:
    """Whether jax.distributed started its preemption sync manager (jax_enable_preemption_service)."""
    from jax._src import distributed as jax_distributed  # the manager has no public accessor

    return getattr(jax_distributed.global_state, "preemption_sync_manager", None) is not None
