"""SIGTERM (a preemption notice) and Ctrl-C as a step at which the loop saves and stops, agreed
by every host of a multi-host job."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import jax
from absl import logging
from jax.experimental import multihost_utils


SIGTERM, CTRL_C = "SIGTERM", "Ctrl-C"


class Preemption:
    """While active, SIGTERM (a preemption notice) or a first Ctrl-C (SIGINT) makes
    `reached(step)` true at a step: the loop finishes that step, commits it (rows, then a
    checkpoint), and returns. `reason` says which. A second Ctrl-C raises KeyboardInterrupt
    at once: the run stops without saving, losing at most the work since its last checkpoint.

    A multi-host job must save and stop at the same step on every host, or orbax's save
    waits forever for the hosts that went on. There, JAX's preemption sync manager (started
    by jax.distributed.initialize) catches SIGTERM itself, tells every host, and
    `reached_preemption_sync_point` becomes true at one step they all agree on; it costs no
    host sync on the steps before a notice. A single process just sets a flag. A multi-host
    job whose sync manager is turned off (jax_enable_preemption_service) leaves SIGTERM to
    kill the process: the job then fails and resumes from its last regular checkpoint,
    instead of hanging in a save that only one host started. For the same reason Ctrl-C,
    which reaches one host only, keeps Python's default there (KeyboardInterrupt).
    """

    def __init__(self) -> None:
        self.requested = False
        self.reason = ""
        self._previous: dict[int, Any] = {}
        self._synced = jax.distributed.is_initialized() and _preemption_service_running()
        self._single = jax.process_count() == 1
        if not (self._synced or self._single):
            logging.warning("jax_enable_preemption_service is off: a SIGTERM stops this multi-host job without "
                            "a final checkpoint; it resumes from the last one")

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is not threading.main_thread():  # signals go to the main thread
            return self
        # A Python SIGTERM handler would replace the sync manager's, which then never hears of it.
        handlers = {signal.SIGTERM: self._on_sigterm} if self._single and not self._synced else {}
        if self._single:
            handlers[signal.SIGINT] = self._on_sigint
        self._previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step`; on every host, call it once per step."""
        if self._synced and not self.requested and multihost_utils.reached_preemption_sync_point(step):
            self.requested, self.reason = True, SIGTERM
        return self.requested

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.requested, self.reason = True, self.reason or SIGTERM

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.reason == CTRL_C:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.requested, self.reason = True, CTRL_C
        # os.write, not logging: a handler may run while the main thread holds a stream's lock.
        os.write(2, b"Ctrl-C: finishing the current step, then saving a checkpoint; press Ctrl-C again to stop "
                    b"at once (losing the steps since the last checkpoint)\n")


def _preemption_service_running() -> bool:
    """Whether jax.distributed started its preemption sync manager (jax_enable_preemption_service)."""
    from jax._src import distributed as jax_distributed  # the manager has no public accessor

    return getattr(jax_distributed.global_state, "preemption_sync_manager", None) is not None
