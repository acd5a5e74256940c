"""The sweep runner and comparison: loading, naming, dry runs, skipping, failures, and one
real two-point tiny sweep (run once per module, since each point is a training process)."""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from tdlm_jax.analysis import sweep_compare
from tdlm_jax.errors import SweepError
from tdlm_jax.sweeps import runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")
SAFE_NAME = re.compile(r"[A-Za-z0-9._+-]+")


def write_sweep_file(directory, points: list[dict], cpu: dict | None = None) -> str:
    path = os.path.join(str(directory), "tiny_sweep.py")
    with open(path, "w") as f:
        f.write(f'"""A test sweep."""\nBASE_CONFIG = {TINY!r}\nCPU_OVERRIDES = {cpu or {}!r}\n'
                f"def get_sweep():\n    return {points!r}\n")
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tdlm_jax.sweep", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "experiments", "*.py"))))
def test_every_experiment_loads_with_seeds_and_docs(path):
    loaded = runner.load_sweep(path)
    assert os.path.isfile(loaded.base_config)
    assert all("seed" in p for p in loaded.points) and len({p["seed"] for p in loaded.points}) >= 2
    assert loaded.cpu_overrides.get("training.num_steps", 0) > 0
    with open(path) as f:
        assert "--size=full" in f.read()  # the full-size command is documented
    names = runner.point_names(loaded.points)
    assert len(set(names)) == len(names) and all(SAFE_NAME.fullmatch(n) for n in names)


def test_loss_weighting_sweep_axes():
    loaded = runner.load_sweep(os.path.join(REPO, "experiments", "loss_weighting.py"))
    got = {(p["diffusion.loss_weighting"], p["seed"]) for p in loaded.points}
    assert got == {(w, s) for w in ("elbo", "uniform", "clipped") for s in (0, 1)}


def test_point_names():
    names = runner.point_names([{"diffusion.loss_weighting": "uniform", "seed": 1},
                               {"diffusion.t_min": 1e-3, "data.source": "/data/my text/*.txt"}, {}])
    assert names[0] == "loss_weighting-uniform__seed-1"
    assert names[1] == "t_min-0.001__source-_data_my_text__.txt"
    assert names[2] == "default"
    # Two keys with the same last part keep their full keys, so the names stay distinct.
    assert runner.point_names([{"a.lr": 1}, {"b.lr": 1}]) == ["a.lr-1", "b.lr-1"]
    with pytest.raises(SweepError, match="both get the name"):
        runner.point_names([{"x.y": "a/b"}, {"x.y": "a_b"}])


def test_bad_sweep_files(tmp_path):
    with pytest.raises(SweepError, match="not a file"):
        runner.load_sweep(str(tmp_path / "missing.py"))
    bad = tmp_path / "bad.py"
    bad.write_text("BASE_CONFIG = 'configs/base.py'\ndef get_sweep():\n    return [{'not a key': 1}]\n")
    with pytest.raises(SweepError, match="not a config key"):
        runner.load_sweep(str(bad))
    result = run_cli(str(bad))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "error:" in result.stderr


@pytest.mark.parametrize("source, expected", [
    ("def get_sweep(:\n", r"could not be loaded \(SyntaxError: "),
    ("BASE_CONFIG = 'configs/base.py'\ndef get_sweep():\n    raise KeyError('seed')\n",
     r"get_sweep\(\) raised \(KeyError: 'seed'\)")])
def test_a_sweep_file_that_does_not_run_is_one_line(tmp_path, source, expected):
    path = tmp_path / "broken.py"
    path.write_text(source)
    with pytest.raises(SweepError, match=expected):
        runner.load_sweep(str(path))
    result = run_cli(str(path), "--dry_run")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_dry_run_prints_one_command_per_point(tmp_path):
    path = write_sweep_file(tmp_path, [{"diffusion.loss_weighting": "elbo", "seed": 0},
                                       {"diffusion.loss_weighting": "uniform", "seed": 1}],
                            cpu={"training.num_steps": 3})
    result = run_cli(path, f"--workdir={tmp_path / 'sw'}", "--dry_run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and all("python -m tdlm_jax.main" in line for line in lines)
    for line, (weighting, seed) in zip(lines, [("elbo", 0), ("uniform", 1)]):
        argv = shlex.split(line.split(" && ", 1)[1])
        assert f"--config={TINY}" in argv and "--config.training.num_steps=3" in argv
        assert f"--config.diffusion.loss_weighting={weighting}" in argv and f"--config.seed={seed}" in argv
        assert f"--workdir={tmp_path / 'sw' / f'loss_weighting-{weighting}__seed-{seed}'}" in argv
    assert not (tmp_path / "sw").exists()  # a dry run creates nothing
    full = run_cli(path, f"--workdir={tmp_path / 'sw'}", "--dry_run", "--size=full")
    assert "num_steps" not in full.stdout  # --size=full drops CPU_OVERRIDES


def test_finished_points_are_skipped_and_interrupted_ones_rerun(tmp_path):
    loaded = runner.load_sweep(write_sweep_file(tmp_path, [{"seed": 0}, {"seed": 1}, {"seed": 2}]))
    points = runner.build_points(loaded, str(tmp_path / "sw"), "cpu")
    # Each fake point just writes a marker in its directory, so we can see which ones ran.
    points = [runner.Point(p.name, p.overrides, p.flags, p.directory,
                          (sys.executable, "-c", f"import os; os.makedirs({p.directory!r}, exist_ok=True); "
                           f"open({os.path.join(p.directory, 'ran')!r}, 'w')"))
              for p in points]
    for point, total in zip(points[:2], (8.0, 4.0)):  # finished; interrupted at step 4 of 8
        os.makedirs(point.directory)
        with open(os.path.join(point.directory, "summary.json"), "w") as f:
            json.dump({"summary/total_steps": total}, f)
    steps = [runner.expected_steps(loaded.base_config, p.flags) for p in points]
    assert steps == [8, 8, 8]  # tiny.py's num_steps
    outcomes = runner.run_points(points, steps, parallel=2, say=lambda _: None, poll_s=0.01)
    assert [o.status for o in outcomes] == ["skipped", "finished", "finished"]
    assert [os.path.exists(os.path.join(p.directory, "ran")) for p in points] == [False, True, True]
    assert not os.path.exists(runner.log_path(points[0]))


def test_logs_live_outside_the_point_workdirs(tmp_path):
    """The trainer refuses a workdir holding files that are not a run's, so logs go beside."""
    loaded = runner.load_sweep(write_sweep_file(tmp_path, [{"seed": 0}]))
    (point,) = runner.build_points(loaded, str(tmp_path / "sw"), "cpu")
    assert runner.log_path(point) == str(tmp_path / "sw" / "logs" / f"{point.name}.txt")
    assert not runner.log_path(point).startswith(point.directory + os.sep)


def test_compare_partial_sweep_groups_seeds(tmp_path):
    """Synthetic point dirs: two finished seeds, one point with metrics only, one empty."""
    root = tmp_path / "sw"
    points = [{"x.w": "a", "seed": 0}, {"x.w": "a", "seed": 1}, {"x.w": "b", "seed": 0}, {"x.w": "b", "seed": 1}]
    names = runner.point_names(points)
    for name, loss in zip(names[:3], (2.0, 3.0, 4.0)):
        os.makedirs(root / name)
        (root / name / "metrics.jsonl").write_text(
            json.dumps({"step": 10, "val/loss": loss + 1}) + "\n" + json.dumps({"step": 20, "val/loss": loss}) + "\n"
            + json.dumps({"step": 20, "train/tokens_per_second": 100.0, "metrics/mask_accuracy": 0.5}) + "\n")
    for name, loss in zip(names[:2], (2.0, 3.0)):
        (root / name / "summary.json").write_text(json.dumps({"summary/best_val_loss": loss, "alerts/total": 1}))
    (root / "sweep.json").write_text(json.dumps({"points": [
        {"name": n, "overrides": p, "dir": str(root / n)} for n, p in zip(names, points)]}))
    md_path, html_path = sweep_compare.write_comparison(str(root))
    md = open(md_path).read()
    assert "| x.w=a | 2/2 | 2.5000 ± 0.7071 |" in md  # mean ± sample std over seeds
    assert "| x.w=b | 1/2 | 4.0000 |" in md
    assert f"| {names[2]} | step 20 | 4.0000 | 0.5000 | — |" in md
    assert f"| {names[3]} | not started | — |" in md
    assert "data:image/png;base64," in open(html_path).read()


def test_compare_needs_a_sweep_dir(tmp_path):
    result = run_cli(f"--compare={tmp_path}")
    assert result.returncode == 2 and "sweep.json" in result.stderr


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """Three tiny points run for real: elbo and uniform succeed, num_steps=0 fails."""
    tmp = tmp_path_factory.mktemp("tiny_sweep")
    path = write_sweep_file(tmp, [{"diffusion.loss_weighting": "elbo"}, {"diffusion.loss_weighting": "uniform"},
                                  {"diffusion.loss_weighting": "elbo", "training.num_steps": 0}],
                            # Tier 3 and samples off: fewer functions to compile, a faster test.
                            cpu={"training.attention_analysis_steps": 1000, "sampling.num_samples_at_eval": 0})
    workdir = tmp / "sw"
    return workdir, run_cli(path, f"--workdir={workdir}", "--parallel=2")


def test_failing_point_is_reported_and_others_finish(tiny_sweep):
    workdir, result = tiny_sweep
    assert result.returncode == 1
    bad = workdir / "loss_weighting-elbo__num_steps-0"
    assert f"FAILED loss_weighting-elbo__num_steps-0 (exit 2): see {workdir / 'logs' / (bad.name + '.txt')}" in result.stderr
    assert "training.num_steps=0" in (workdir / "logs" / (bad.name + ".txt")).read_text()
    for name in ("loss_weighting-elbo", "loss_weighting-uniform"):
        assert (workdir / name / "summary.json").exists(), (workdir / "logs" / (name + ".txt")).read_text()[-2000:]
    record = json.loads((workdir / "sweep.json").read_text())
    assert [p["name"] for p in record["points"]] == [
        "loss_weighting-elbo", "loss_weighting-uniform", "loss_weighting-elbo__num_steps-0"]


def test_real_sweep_comparison(tiny_sweep):
    workdir, _ = tiny_sweep
    result = run_cli(f"--compare={workdir}")
    assert result.returncode == 0, result.stderr
    md = (workdir / "comparison.md").read_text()
    for name in ("loss_weighting-elbo", "loss_weighting-uniform"):
        best = json.loads((workdir / name / "summary.json").read_text())["summary/best_val_loss"]
        assert f"| {name} | finished | {best:.4f} |" in md
    assert "| loss_weighting-elbo__num_steps-0 | not started | — |" in md
    html = (workdir / "comparison.html").read_text()
    assert html.count('src="data:image/png;base64,') >= 2  # val/loss and at least one research metric
