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


def stopped_at_once(workdir: str) -> str:
    """What a second Ctrl-C prints: the steps since the last checkpoint are lost, not the run."""
    return f"stopped at once; run the same command to resume from the last checkpoint in {workdir}"


class Preemption:
    """While active, SIGTERM (a preemption notice) or a first Ctrl-C (SIGINT) makes
    `reached(step)` true at a step: the loop finishes that step, commits it (rows, then a
    checkpoint), and returns. `reason` says which. A second Ctrl-C ends the process at once
    with exit status 130, after printing `at_once_message`: the run stops without saving,
    losing at most the work since its last checkpoint (resuming drops the rows past it, as
    after kill -9).

    Ctrl-C is counted by a thread that reads the signal wakeup fd, not by a Python handler:
    Python runs handlers only between bytecodes of the main thread, so during a long step
    (in XLA's C++) two presses would arrive as one call, after the step, and the second would
    be lost. The wakeup fd gets one byte per signal as it arrives, so both messages come at
    once and the second press exits mid-step. It exits by os._exit, not KeyboardInterrupt,
    which can land in a gc callback or a __del__ (JAX registers one in gc.callbacks), where
    Python prints it as "Exception ignored" and drops it.

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

    def __init__(self, at_once_message: str) -> None:
        self.at_once_message = at_once_message
        self.requested = False
        self.reason = ""
        self._previous: dict[int, Any] = {}
        self._wakeup: tuple[int, int, int, threading.Thread] | None = None  # (previous fd, read, write, watcher)
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
            handlers[signal.SIGINT] = _counted_by_the_watcher
            self._watch_ctrl_c()
        self._previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        if self._wakeup is not None:
            previous_fd, read_fd, write_fd, watcher = self._wakeup
            signal.set_wakeup_fd(previous_fd)
            os.close(write_fd)  # the watcher reads end-of-file and returns
            watcher.join()
            os.close(read_fd)
            self._wakeup = None

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step`; on every host, call it once per step."""
        if self._synced and not self.requested and multihost_utils.reached_preemption_sync_point(step):
            self.requested, self.reason = True, SIGTERM
        return self.requested

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.requested, self.reason = True, self.reason or SIGTERM

    def _watch_ctrl_c(self) -> None:
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)  # the C-level signal handler must never block
        previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        watcher = threading.Thread(target=self._count_ctrl_c, args=(read_fd,), name="tdlm-ctrl-c", daemon=True)
        watcher.start()
        self._wakeup = (previous_fd, read_fd, write_fd, watcher)

    def _count_ctrl_c(self, read_fd: int) -> None:
        while signums := os.read(read_fd, 64):  # one byte per signal delivered; b"" once closed
            for signum in signums:
                if signum == signal.SIGINT:
                    self._on_ctrl_c()

    def _on_ctrl_c(self) -> None:
        if self.reason == CTRL_C:  # the second Ctrl-C: stop now
            os.write(2, f"Ctrl-C: {self.at_once_message}\n".encode())
            os._exit(130)  # 128 + SIGINT, as a shell reports an interrupt
        self.requested, self.reason = True, CTRL_C
        # os.write, not logging: the main thread may hold a stream's lock.
        os.write(2, b"Ctrl-C: finishing the current step, then saving a checkpoint; press Ctrl-C again to stop "
                    b"at once (losing the steps since the last checkpoint)\n")


def _counted_by_the_watcher(signum: int, frame: Any) -> None:
    """SIGINT's Python handler: it must exist (the wakeup fd hears only of signals Python
    handles, and Python's default raises KeyboardInterrupt), but Preemption's watcher acts."""


def _preemption_service_running() -> bool:
    """Whether jax.distributed started its preemption sync manager (jax_enable_preemption_service)."""
    from jax._src import distributed as jax_distributed  # the manager has no public accessor

    return getattr(jax_distributed.global_state, "preemption_sync_manager", None) is not None
