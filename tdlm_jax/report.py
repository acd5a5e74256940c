"""Command line: `python -m tdlm_jax.report --workdir=DIR` writes DIR/report.html.

One self-contained page of the run's metrics by tier, verdicts on the forward and reverse
processes, and its health alerts (`tdlm_jax.analysis.run_report`); it works on a run in
progress too. Errors a user can cause print one line and exit with status 2.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from tdlm_jax.analysis.run_report import write_report

_WORKDIR = flags.DEFINE_string("workdir", None, "The run directory to report on (holds metrics.jsonl).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    workdir = _WORKDIR.value
    if not workdir or not os.path.isdir(workdir):
        print(f"error: --workdir={workdir!r} is not a directory; pass a run's workdir, e.g. runs/base",
              file=sys.stderr)
        sys.exit(2)
    print(write_report(workdir))


if __name__ == "__main__":
    app.run(main)
