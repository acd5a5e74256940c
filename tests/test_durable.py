"""Durable runs: Ctrl-C, a second process, a rerun, a kill: no file of a run is lost,
duplicated or rewritten, and the resumed run's files equal an uninterrupted run's. Real
processes and real signals, on configs/tiny.py."""

import itertools
import json
import math
import os
import pathlib
import random
import runpy
import signal
import socket
import subprocess
import sys
import time

import jax
import pytest

from tdlm_jax.errors import CheckpointError, ConfigError, DataError, TrainingError
from tdlm_jax.metrics import jsonl, writers
from tdlm_jax.parallel import sharding
from tdlm_jax.training import checkpoint, loop, rundir

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.py")
VOLATILE = ("train/tokens_per_second", "summary/training_time_hours")
# 40 steps: rows every 5, research every 10, checkpoints at 15 and 30, analysis at 30. The
# loss-weight alert's bound sits inside the weights' step-to-step spread, so an alert starts
# and clears: a resumed run must keep the health history to raise exactly the same ones.
SETTINGS = {"training.num_steps": 40, "training.checkpoint_every_n_steps": 15, "training.logging_steps": 5,
            "training.eval_every_n_steps": 15, "training.detailed_metrics_steps": 10,
            "training.attention_analysis_steps": 30, "sampling.num_samples_at_eval": 0,
            "health.loss_weight_min": 2.1}  # avg_loss_weight 2.029, 2.067, 2.151, 2.456: a start, a clear
OVERRIDES = tuple(f"--config.{key}={value}" for key, value in SETTINGS.items())
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def command(workdir, *overrides):
    return [sys.executable, "-m", "tdlm_jax.main", f"--config={TINY}", f"--workdir={workdir}", *OVERRIDES, *overrides]


def run_main(workdir, *overrides, timeout=300):
    return subprocess.run(command(workdir, *overrides), cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=ENV)


def start_main(workdir, *overrides):
    return subprocess.Popen(command(workdir, *overrides), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def run_files(workdir):
    """Everything a run's files say, without what measures the machine rather than the run."""
    rows = [{k: v for k, v in r.items() if k not in VOLATILE} for r in jsonl.read(workdir / "metrics.jsonl")]
    summary = json.loads((workdir / "summary.json").read_text())
    return {"metrics": rows, "alerts": jsonl.read(workdir / "alerts.jsonl"),
            "summary": {k: v for k, v in summary.items() if k not in VOLATILE},
            "tensorboard": {k: v for k, v in writers.read_scalars(str(workdir)).items() if k not in VOLATILE}}


def wait_for_step(workdir, step, process, deadline_s=180):
    """Blocks until metrics.jsonl holds a row at `step` or later."""
    deadline = time.time() + deadline_s
    while time.time() < deadline and process.poll() is None:
        if any(r["step"] >= step for r in jsonl.read(workdir / "metrics.jsonl")):
            return
        time.sleep(0.05)
    raise AssertionError(f"no row at step {step} within {deadline_s} s")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("durable") / "reference"
    result = run_main(workdir)
    assert result.returncode == 0, result.stderr[-2000:]
    files = run_files(workdir)
    # If the objective's numbers move, retune health.loss_weight_min above so that alerts still
    # start and clear: otherwise the resumed runs' alert files cannot tell a lost history.
    assert len({a["event"] for a in files["alerts"]}) == 2
    return files


def test_ctrl_c_at_a_random_moment_saves_and_the_resumed_files_equal_an_uninterrupted_run(reference, tmp_path):
    workdir = tmp_path / "interrupted"
    process = start_main(workdir)
    wait_for_step(workdir, random.Random(os.getpid()).choice([5, 10, 20, 25]), process)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 0.3))
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 130, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("Ctrl-C: interrupted at step ") and "Traceback" not in stderr
    step = int(last.split("at step ")[1].split(";")[0])
    assert (workdir / "checkpoints" / str(step)).is_dir() and not (workdir / "summary.json").exists()
    assert max(r["step"] for r in jsonl.read(workdir / "metrics.jsonl")) <= step
    resumed = run_main(workdir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert run_files(workdir) == reference


def reference_config():
    config = runpy.run_path(TINY)["get_config"]()
    for key, value in SETTINGS.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


@pytest.mark.parametrize("moment, interrupt_step", [("batch", 7), ("batch", 23), ("save", 15), ("evaluation", 30)])
def test_ctrl_c_at_a_chosen_moment_commits_that_step_and_the_resumed_files_equal_an_uninterrupted_run(
        reference, tmp_path, monkeypatch, moment, interrupt_step):
    """A real SIGINT, delivered right after the loop reads the batch of `interrupt_step`
    (between logging steps, before and after the first checkpoint: the open interval's sums
    and the health history must travel with the checkpoint), during a checkpoint save, or
    during an evaluation."""
    def interrupt_at(function, is_the_moment):
        def interrupting(*args, **kwargs):
            if is_the_moment(*args):
                os.kill(os.getpid(), signal.SIGINT)
            return function(*args, **kwargs)
        return interrupting

    if moment == "batch":
        calls, offset = itertools.count(1), reference_config().data.num_eval_batches  # validation batches first
        monkeypatch.setattr(sharding, "global_batch",
                            interrupt_at(sharding.global_batch, lambda *_: next(calls) - offset == interrupt_step))
    elif moment == "save":
        monkeypatch.setattr(checkpoint.Checkpointer, "save", interrupt_at(
            checkpoint.Checkpointer.save, lambda self, step, *_: step == interrupt_step))
    else:
        calls = itertools.count(1)  # evaluations at steps 15, 30
        monkeypatch.setattr(loop, "evaluate", interrupt_at(loop.evaluate, lambda *_: next(calls) == 2))
    assert loop.train(reference_config(), str(tmp_path)) == {"interrupted_at_step": interrupt_step}
    monkeypatch.undo()
    assert loop.train(reference_config(), str(tmp_path))["summary/total_steps"] == 40
    assert run_files(tmp_path) == reference


def test_a_second_ctrl_c_stops_at_once_without_a_traceback(tmp_path):
    workdir = tmp_path / "stopped"
    process = start_main(workdir, "--config.training.num_steps=5000")
    wait_for_step(workdir, 5, process)
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("Ctrl-C: stopped at once; ")


def test_kill_9_before_and_after_the_first_checkpoint_resumes_to_identical_files(reference, tmp_path):
    """Each kill leaves rows (and TensorBoard events) past the last checkpoint, or before any."""
    workdir = tmp_path / "killed"
    for step in (10, 20):  # before checkpoint 15, then between 15 and 30
        process = start_main(workdir)
        wait_for_step(workdir, step, process)
        process.kill()
        process.wait()
    resumed = run_main(workdir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert run_files(workdir) == reference


def test_a_second_process_on_a_workdir_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path):
    workdir = tmp_path / "shared"
    first = start_main(workdir, "--config.training.num_steps=5000")
    wait_for_step(workdir, 5, first)
    first.send_signal(signal.SIGSTOP)  # alive and holding the lock, but writing nothing meanwhile
    before = {p.name: p.stat().st_mtime_ns for p in workdir.iterdir()}
    second = run_main(workdir, timeout=120)
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [second.stderr.strip()]  # one line
    assert f"is in use by process {first.pid} on {socket.gethostname()}" in second.stderr
    after = {p.name: p.stat().st_mtime_ns for p in workdir.iterdir()}
    assert after == before  # the second touched nothing
    first.kill()
    first.wait()
    third = run_main(workdir, "--config.training.num_steps=6")
    assert third.returncode == 0, third.stderr[-2000:]
    assert f"took over the lock of process {first.pid}" in third.stderr


def tiny_config(**training):
    config = runpy.run_path(TINY)["get_config"]()
    config.sampling.num_samples_at_eval = 0
    config.training.update(training)
    return config


def test_a_finished_run_is_left_untouched_and_fewer_steps_are_refused(tmp_path):
    loop.train(tiny_config(), str(tmp_path))
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert loop.train(tiny_config(), str(tmp_path)) == {"finished_at_step": 8}
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files
    with pytest.raises(ConfigError, match="training.num_steps=6 is below step 8"):
        loop.train(tiny_config(num_steps=6), str(tmp_path))
    # Continuing with more steps: one summary, the new one, and the files of a 12-step run.
    summary = loop.train(tiny_config(num_steps=12), str(tmp_path))
    assert summary["summary/total_steps"] == 12
    summaries = [r for r in jsonl.read(tmp_path / "metrics.jsonl") if "summary/total_steps" in r]
    assert [r["step"] for r in summaries] == [12]


def test_a_change_of_the_objective_on_resume_is_refused_and_config_json_is_kept(tmp_path):
    config = tiny_config(num_steps=4)
    loop.train(config, str(tmp_path))
    saved = (tmp_path / "config.json").read_bytes()
    for key, value in (("diffusion", ("schedule", "cosine")), ("metrics", ("bucket_edges", (0.0, 0.5, 0.8, 1.0)))):
        changed = tiny_config(num_steps=8)
        changed[key][value[0]] = value[1]
        with pytest.raises(ConfigError, match=rf"{key}\.{value[0]}"):
            loop.train(changed, str(tmp_path))
        assert (tmp_path / "config.json").read_bytes() == saved
    loop.train(tiny_config(num_steps=4), str(tmp_path))  # finished, unchanged
    assert (tmp_path / "config.json").read_bytes() == saved


def test_the_lock_is_released_by_an_error_and_held_against_this_process_too(tmp_path):
    with rundir.locked(str(tmp_path)):
        with pytest.raises(CheckpointError, match=f"in use by process {os.getpid()}"):
            with rundir.locked(str(tmp_path)):
                pass
    with pytest.raises(RuntimeError):
        with rundir.locked(str(tmp_path)):
            raise RuntimeError
    with rundir.locked(str(tmp_path)):  # free again
        pass


def test_an_overflowing_perplexity_is_logged_as_inf():
    sums = {"nelbo_sum": 1000.0, "valid_tokens": 1.0, "masked_tokens": 1.0, "correct_tokens": 0.0}
    row = loop.evaluate(lambda *args: sums, None, [{"tokens": None, "valid": None}], jax.random.key(0))
    assert row["val/loss"] == 1000.0 and row["val/perplexity"] == math.inf


# --- one line instead of a traceback ---------------------------------------------------------


def test_out_of_memory_is_one_line_naming_the_fixes(tmp_path, monkeypatch):
    config = tiny_config(num_steps=2)
    config.data.seq_len = 100_000  # [8, 2, L, L] attention: terabytes
    # Known before step 1, from the compiled step's memory analysis:
    with pytest.raises(TrainingError, match=r"^out of memory before step 1: the train step needs [\d.]+ GiB per device "
                                            r"and the device has .*grad_accum_steps.*model.remat=true$"):
        loop.train(config, str(tmp_path / "checked"))
    # And where an analysis underestimates, the allocation failure itself is one line too.
    monkeypatch.setattr(loop.programs, "check_fits", lambda *args: None)
    with pytest.raises(TrainingError, match=r"^out of memory on .*(RESOURCE_EXHAUSTED|Out of memory).*"
                                            r"grad_accum_steps.*model.remat=true$"):
        loop.train(config, str(tmp_path / "unchecked"))


def test_a_key_set_inside_a_config_file_but_unknown_is_refused_before_the_workdir_exists(tmp_path):
    config = tiny_config()
    config.training.learning_rat = 0.5
    with pytest.raises(ConfigError, match=r"training.learning_rat is not a config key \(did you mean "
                                          r"training.learning_rate\?\)"):
        loop.train(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_config_file_whose_get_config_raises_is_one_line(tmp_path):
    path = tmp_path / "raising.py"
    path.write_text("def get_config():\n    raise ValueError('no such corpus')\n")
    result = subprocess.run([sys.executable, "-m", "tdlm_jax.main", f"--config={path}", f"--workdir={tmp_path / 'r'}"],
                            cwd=REPO, capture_output=True, text=True, timeout=120, env=ENV)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: config file '{path}' could not be loaded (ValueError: no such corpus): pass "
        "--config=configs/base.py or another file that defines get_config()"]


def test_a_validation_split_shorter_than_a_window_is_refused(tmp_path):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": "to be or not to be " * 40}) + "\n" for _ in range(39))
                      + json.dumps({"text": "short."}) + "\n")
    config = tiny_config()
    config.data.source, config.data.val_fraction = str(corpus), 0.02  # one held-out document, 7 tokens
    with pytest.raises(DataError, match="validation split .* has 7 tokens, fewer than one window of seq_len=32"):
        loop.train(config, str(tmp_path / "run"))
