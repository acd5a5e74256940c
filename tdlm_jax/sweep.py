"""Command line: `python -m tdlm_jax.sweep SWEEP_FILE [--workdir=DIR] [--parallel=N] [--dry_run]
[--size=cpu|full]` runs an ablation sweep; `python -m tdlm_jax.sweep --compare=DIR` compares its points.

A sweep file (see experiments/) defines `get_sweep() -> list[dict]` of flat config
overrides and `BASE_CONFIG` (see `tdlm_jax.sweeps.runner`). Each point is one
`python -m tdlm_jax.main` subprocess in `DIR/<point name>/`, logging to
`DIR/logs/<point name>.txt`; rerunning the sweep resumes interrupted points and skips
finished ones. Errors a user can cause print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from tdlm_jax.errors import SweepError, TdlmError
from tdlm_jax.sweeps.runner import (SIZES, build_points, expected_steps, load_sweep, run_points, shell_line,
                                    write_sweep_json)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tdlm_jax.sweep", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_file", nargs="?", help="a sweep definition, e.g. experiments/loss_weighting.py")
    parser.add_argument("--workdir", help="sweep directory; default runs/<sweep file stem>")
    parser.add_argument("--parallel", type=int, default=1,
                        help="points run at once (default 1). JAX on CPU already uses every core in one "
                        "process, and on an accelerator takes all of it, so 1 is right on a laptop or one GPU; "
                        "for a cluster, hand the --dry_run commands to its scheduler instead")
    parser.add_argument("--dry_run", action="store_true",
                        help="print each point's command, one shell line per point, and run nothing")
    parser.add_argument("--size", choices=SIZES, default="cpu",
                        help="cpu (default): apply the sweep file's CPU_OVERRIDES; full: the base config's sizes")
    parser.add_argument("--compare", metavar="SWEEP_DIR",
                        help="write comparison.md and comparison.html for a (possibly unfinished) sweep")
    return parser


def run_sweep(args: argparse.Namespace) -> int:
    """Runs (or prints) the sweep; the exit status: 0, or 1 if any point failed."""
    sweep = load_sweep(args.sweep_file)
    workdir = args.workdir or os.path.join("runs", os.path.splitext(os.path.basename(args.sweep_file))[0])
    points = build_points(sweep, workdir, args.size)
    if args.dry_run:
        for point in points:
            print(shell_line(point))
        return 0
    if args.parallel < 1:
        raise SweepError(f"sweep error: --parallel={args.parallel}: must be at least 1")
    print(f"sweep: {len(points)} points in {os.path.abspath(workdir)} ({write_sweep_json(workdir, sweep, args.size, points)})")
    steps = [expected_steps(sweep.base_config, p.flags) for p in points]
    outcomes = run_points(points, steps, args.parallel)
    failed = [o for o in outcomes if o.status == "failed"]
    done = sum(o.status != "failed" for o in outcomes)
    print(f"sweep: {done}/{len(points)} points finished, {len(failed)} failed")
    for outcome in failed:
        print(f"FAILED {outcome.point.name} (exit {outcome.returncode}): see {outcome.log}", file=sys.stderr)
    return 1 if failed else 0


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM (a scheduler's stop) ends the sweep like Ctrl-C: running points are stopped too."""
    del signum, frame
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.compare:
            if args.sweep_file or args.dry_run:
                raise SweepError("sweep error: --compare=DIR takes no sweep file and no --dry_run")
            from tdlm_jax.analysis import sweep_compare  # matplotlib only when comparing

            for path in sweep_compare.write_comparison(args.compare):
                print(path)
            return 0
        if not args.sweep_file:
            raise SweepError("sweep error: pass a sweep file (e.g. experiments/loss_weighting.py) or --compare=DIR")
        return run_sweep(args)
    except TdlmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sweep: interrupted; running points were stopped. Run the same command again to resume.",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
