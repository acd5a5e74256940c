"""`bench --suite=gpu` (tdlm_jax.training.bench_suite), run here as a dry run on configs/tiny.py:
the runs, their time budget, the tables it writes, and its refusal where there is no GPU."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tdlm_jax.errors import ConfigError
from tdlm_jax.training import bench_suite

TINY = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py")
NAMES = [name for name, _, _ in bench_suite.RUNS]


def test_dry_run_writes_the_figures_of_the_runs_asked_for(tmp_path):
    table = bench_suite.run_suite(str(tmp_path), budget=300, config=TINY, overrides=["--config.model.num_layers=1"],
                                  only=["train_b32"], allow_cpu=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["env.txt", "figures.jsonl", "figures.md", "log.txt"]
    (record,) = map(json.loads, (tmp_path / "figures.jsonl").read_text().splitlines())
    assert record["name"] == "train_b32" and record["mode"] == "train"
    assert record["overrides"] == ["--config.training.batch_size=32", "--config.model.num_layers=1"]
    assert record["setup"].startswith("batch 32 x 32, model d=32 layers=1")
    assert (tmp_path / "figures.md").read_text() == "\n".join(table) + "\n"
    rows = {line.split(" | ")[0].strip("| "): line for line in table if line.startswith("| ")}
    assert f"| {1e3 * record['figures']['step_seconds']:.1f} ms |" in rows["train_b32"]
    assert all("not asked for" in rows[n] for n in NAMES if n not in ("train_b32", "memory_b32"))
    assert "memory_b32: not asked for" in table
    # The first run's programs were dumped; on a CPU no train step calls cuDNN.
    assert table[-1].startswith(f"cuDNN attention: {bench_suite.CUDNN_ATTENTION} in 0 of ")
    log = (tmp_path / "log.txt").read_text()
    assert "=== train_b32: ok after" in log and "PLATFORM cpu" in (tmp_path / "env.txt").read_text()


def test_runs_that_the_budget_cannot_start_are_skipped_and_say_so(tmp_path):
    table = bench_suite.run_suite(str(tmp_path), budget=0, config=TINY, allow_cpu=True)
    assert (tmp_path / "figures.jsonl").exists() is False
    assert sum("skipped (0 s of the budget left)" in line for line in table) == len(NAMES)


def test_a_run_past_its_time_is_stopped_and_a_failed_one_keeps_its_code(tmp_path):
    with (tmp_path / "log.txt").open("w") as log:
        slow = bench_suite.run_bench("slow", [sys.executable, "-c", "import time; time.sleep(60)"], 0.5, {}, log)
        failed = bench_suite.run_bench("failed", [sys.executable, "-c", "raise SystemExit(3)"], 60, {}, log)
    assert (slow, failed) == ("timed out", "failed (rc 3)")
    assert "=== slow: timed out after" in (tmp_path / "log.txt").read_text()


def test_the_tables_show_every_runs_figures_from_its_record():
    records = [
        {"name": "train_b32", "setup": "S", "figures": {"step_seconds": 0.0631, "tokens_per_second": 519_000.4,
                                                       "mfu": 0.4512, "peak_source": "NVIDIA H200 SXM"}},
        {"name": "tiers_b32", "setup": "S", "figures": {"bare_seconds": 0.05, "tier1_ratio": 1.0123,
                                                       "tier2_ratio": 1.0871, "tier3_ratio": 0.25}},
        {"name": "memory_b32", "setup": "S", "figures": {"table": ["memory per device ...", "  the train step  1 GiB"]}},
        {"name": "dots_b32", "setup": "S", "figures": {"step_seconds": 0.05, "dots_alone_seconds": 0.04,
                                                      "dots_alone_fraction_of_peak": 0.6234}},
    ]
    table = bench_suite.figures_table(records, {"train_xla_b32": "timed out"})
    assert "| train_b32 | S | 63.1 ms | 519,000 | 45.1 % | NVIDIA H200 SXM |" in table
    assert "| tiers_b32 | S | 50.0 ms | 1.012 | 1.087 | 0.250 |" in table
    assert "| dots_b32 | S | 50.0 ms | 40.0 ms | 0.800 | 62.3 % |" in table
    assert any(line.startswith("| train_xla_b32 |") and "| timed out |" in line for line in table)
    assert table[-3:] == ["memory_b32: S", "memory per device ...", "  the train step  1 GiB"]


def test_where_jax_sees_no_gpu_the_suite_stops_with_one_line(tmp_path):
    with pytest.raises(ConfigError, match="jax sees no GPU here .platform cpu"):
        bench_suite.run_suite(str(tmp_path), budget=300, config=TINY)
    assert not (tmp_path / "figures.jsonl").exists()


def test_the_command_line_names_a_missing_folder_unknown_runs_and_an_unreachable_registry(tmp_path):
    def run(*args, **env):
        return subprocess.run([sys.executable, "-m", "tdlm_jax.bench", *args], capture_output=True, text=True,
                              timeout=120, cwd=bench_suite.REPO, env={**os.environ, **env})
    missing, unknown = run("--suite=gpu"), run("--suite=gpu", "--out=/tmp/unused", "--suite_runs=train_b32,nope")
    no_registry = run(f"--fetch_wheels={tmp_path}", PIP_NO_INDEX="1")  # pip may look nowhere: nothing to download
    assert missing.returncode == unknown.returncode == no_registry.returncode == 2
    last_line = lambda result: result.stderr.strip().splitlines()[-1]
    assert last_line(missing) == "error: --suite=gpu needs --out=DIR, the folder its figures go to"
    assert last_line(unknown).startswith("error: --suite_runs: no run named nope: choose from train_b32")
    assert last_line(no_registry).startswith("error: --fetch_wheels: pip could not download flax==")
    assert "Traceback" not in missing.stderr + unknown.stderr + no_registry.stderr
