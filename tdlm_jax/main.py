"""Command line: `python -m tdlm_jax.main --config=configs/base.py [--config.x.y=v] [--workdir=DIR]`.

Flags only; the work happens in `tdlm_jax.training.loop`. Errors a user can cause print one line
naming the problem and the fix, and exit with status 2.
"""

from __future__ import annotations

import logging as logging_std
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from tdlm_jax.errors import TdlmError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file defining get_config(), e.g. configs/base.py.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory for checkpoints, metrics and TensorBoard events. "
    "Default: runs/<config file stem>. Running again with the same workdir resumes.")
flags.mark_flag_as_required("config")
# Multi-host jobs (see tdlm_jax.parallel.distributed): SLURM, Open MPI and Cloud TPU are detected
# automatically; elsewhere pass these three (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
# JAX_PROCESS_ID) to every process.
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, which every process of a multi-host job connects to.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in the multi-host job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes-1.")
_CLUSTER_DETECTION = flags.DEFINE_string(
    "cluster_detection_method", None, "Force one of JAX's cluster detections: slurm, ompi, mpi4py, gcetpu, "
    "gketpu or k8s (mpi4py and k8s are never automatic).")


class _OnlyOurInfo(logging_std.Filter):
    """Keeps INFO lines from tdlm_jax only (orbax alone logs dozens per checkpoint), and
    drops the stack dumps orbax's background threads log when a save fails: the failure
    comes back as tdlm_jax's one-line CheckpointError."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        if _PACKAGE_DIR in record.pathname:
            return True
        if record.exc_info and f"{os.sep}orbax{os.sep}" in record.pathname:
            return False
        return record.levelno >= logging_std.WARNING


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def default_workdir(config_path: str) -> str:
    """runs/<config file stem>, e.g. runs/base for configs/base.py."""
    stem = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
    return os.path.join("runs", stem)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a one-line error for a bad override instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:  # a value of the wrong type, a malformed flag, or a config file that raised
        if "Error whilst parsing config file" in str(e):  # config_flags' words: the file's get_config() raised
            _fail_config_file(next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "?"), e)
        _fail(f"config error: {str(e).strip().splitlines()[0]}")
    except (AttributeError, KeyError) as e:  # an override of a key the config does not have
        text = str(e).replace("\\n", " ").replace("\n", " ")
        flag = next((a for a in argv if a.startswith("--config.")), "an override")
        hint = re.search(r'Did you mean "([^"]+)"', text)
        suggestion = f" (did you mean {hint.group(1)}?)" if hint else ""
        _fail(f"config error: {flag.split('=')[0]} names a key the config does not have{suggestion}; "
              "configs/base.py lists every key")
    except (SyntaxError, ImportError) as e:  # the --config file itself does not run
        _fail_config_file(next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "?"), e)
    return argv  # not reached


def load_config():
    """The parsed config; a missing or broken config file is a one-line error, not a traceback."""
    try:
        config = _CONFIG.value
        config.keys()  # a failed load surfaces at the first access, not at `.value`
        return config
    except Exception as e:  # config_flags defers a failed load of the file to this access
        _fail_config_file(config_flags.get_config_filename(flags.FLAGS["config"]), e)


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return error


def _fail_config_file(path: str, error: BaseException) -> None:
    root = _root_cause(error)
    lines = str(root).splitlines() or [""]
    reason = next((line.strip() for line in lines if "Errno" in line), lines[0])
    _fail(f"config file {path!r} could not be loaded ({type(root).__name__}: {reason}): "
          "pass --config=configs/base.py or another file that defines get_config()")


def join_multihost_job() -> int:
    """Initializes jax.distributed if this process is part of a multi-host job (before anything
    touches the backend); returns this process's index, 0 for a single-process run."""
    from tdlm_jax.parallel import distributed

    try:
        plan = distributed.plan(coordinator_address=_COORDINATOR_ADDRESS.value, num_processes=_NUM_PROCESSES.value,
                                process_id=_PROCESS_ID.value, cluster_detection_method=_CLUSTER_DETECTION.value,
                                on_cloud_tpu=distributed.on_cloud_tpu())
        distributed.initialize(plan)
    except TdlmError as e:
        _fail(str(e))
    if plan is None:
        return 0
    import jax

    logging.info("joined a %d-process job (%s) as process %d", jax.process_count(), plan.source, jax.process_index())
    return jax.process_index()


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_OnlyOurInfo())
    if join_multihost_job() > 0:
        logging.set_verbosity(logging.WARNING)  # process 0 alone logs progress; the others only problems
    from tdlm_jax.training import loop  # after flag parsing: importing JAX is slow and --help should not wait
    from tdlm_jax.training.preemption import stopped_at_once

    config = load_config()
    workdir = _WORKDIR.value or default_workdir(config_flags.get_config_filename(flags.FLAGS["config"]))
    try:
        summary = loop.train(config, workdir)
    except TdlmError as e:
        _fail(str(e))
    except KeyboardInterrupt:  # a Ctrl-C Preemption does not count (before the loop, multi-host): stop now
        _interrupted(stopped_at_once(workdir))
    if "preempted_at_step" in summary:
        logging.warning("preempted at step %d; checkpoint saved in %s; run the same command to resume",
                        summary["preempted_at_step"], workdir)
    elif "interrupted_at_step" in summary:
        _interrupted(f"interrupted at step {summary['interrupted_at_step']}; checkpoint saved in {workdir}; "
                     "run the same command to resume", at_once=False)
    elif "finished_at_step" not in summary:
        logging.info("done: the run is in %s; `python -m tdlm_jax.report --workdir=%s` writes its report.html", workdir, workdir)


def _interrupted(message: str, at_once: bool = True) -> None:
    """Ctrl-C's one line and exit status 130 (128 + SIGINT), as a shell reports an interrupt.

    At once (a second Ctrl-C), by os._exit: the interpreter's exit would wait for orbax's and
    grain's background threads, which a second Ctrl-C means not to wait for.
    """
    print(f"Ctrl-C: {message}", file=sys.stderr, flush=True)
    if at_once:
        os._exit(130)
    sys.exit(130)


def _run() -> None:
    try:
        app.run(main, flags_parser=parse_flags)
    except KeyboardInterrupt:  # before training started (imports, flag parsing, building the run)
        _interrupted("stopped before training started")


if __name__ == "__main__":
    _run()
