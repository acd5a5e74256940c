"""Command line: `python -m tdlm_jax.main --config=configs/base.py [--config.x.y=v] [--workdir=DIR]`.

Flags only; the work happens in `tdlm_jax.train`. Errors a user can cause print one line
naming the problem and the fix, and exit with status 2.
"""

from __future__ import annotations

import logging as logging_std
import os
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


class _OnlyOurInfo(logging_std.Filter):
    """Keeps INFO lines from tdlm_jax only: orbax alone logs dozens per checkpoint."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        return record.levelno >= logging_std.WARNING or _PACKAGE_DIR in record.pathname


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def default_workdir(config_path: str) -> str:
    """runs/<config file stem>, e.g. runs/base for configs/base.py."""
    stem = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
    return os.path.join("runs", stem)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_OnlyOurInfo())
    from tdlm_jax import train  # after flag parsing: importing JAX is slow and --help should not wait

    workdir = _WORKDIR.value or default_workdir(config_flags.get_config_filename(flags.FLAGS["config"]))
    try:
        summary = train.train(_CONFIG.value, workdir)
    except TdlmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if "preempted_at_step" in summary:
        logging.warning("preempted at step %d; checkpoint saved in %s; run the same command to resume",
                        summary["preempted_at_step"], workdir)
        return
    logging.info("done: %s (workdir %s)", summary, workdir)


if __name__ == "__main__":
    app.run(main)
