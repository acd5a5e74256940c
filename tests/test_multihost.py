"""A real two-process job on this machine: jax.distributed over localhost, gloo CPU collectives.

Two `python -m tdlm_jax.main` processes with 2 fake CPU devices each form a (data=2, fsdp=2)
mesh: the parameters are FSDP-sharded within each process and the batch is split over all
4 devices. Process 1 gets a SIGTERM mid-run; both must save at the same step and exit, and
a restart of both must finish the run. The metrics of the interrupted-and-resumed job must
then be those of an uninterrupted single-process run on a 4-device (data=4) mesh, and the
checkpoint the two processes wrote must restore in a single process.
"""

from __future__ import annotations

import os
import pathlib
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from tdlm_jax.inference.trained import load_trained
from tdlm_jax.metrics import jsonl
from tdlm_jax.training import loop

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.py")
NUM_STEPS = 40  # enough steps that the SIGTERM lands mid-run
# No tier-2 step: its variant takes the longest to compile, and test_distributed checks it under FSDP.
# Every step logged: the preemption may land between logging steps, and a resumed run's first
# interval mean covers only the steps after its checkpoint.
OVERRIDES = (f"--config.training.num_steps={NUM_STEPS}", "--config.training.detailed_metrics_steps=1000",
             "--config.training.logging_steps=1")
TIMEOUT = 240  # seconds: a hang fails the test instead of blocking CI
COMPARED = ("train/", "val/", "metrics/", "research/", "advanced/")  # not throughput, compile counts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(workdir: pathlib.Path) -> list[subprocess.Popen]:
    """Both processes of the job, each with 2 fake CPU devices; output goes to files in the workdir's parent."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    processes = []
    for i in range(2):
        log = open(workdir.parent / f"{workdir.name}.{i}.{port}.log", "w+")
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "tdlm_jax.main", f"--config={TINY}", f"--workdir={workdir}",
             *OVERRIDES, "--config.sharding.mesh_shape=(2, 2)",
             f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True))
        processes[-1].log = log
    return processes


def finish(processes: list[subprocess.Popen], deadline: float) -> list[str]:
    """Waits for both processes (killing them at the deadline) and returns their output."""
    try:
        for p in processes:
            p.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    outputs = []
    for p in processes:
        p.log.seek(0)
        outputs.append(p.log.read())
        p.log.close()
    for i, (p, out) in enumerate(zip(processes, outputs)):
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{out[-3000:]}"
    return outputs


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def logged(workdir: pathlib.Path) -> dict[tuple[int, str], float]:
    return {(row["step"], key): value for row in jsonl.read(workdir / "metrics.jsonl")
            for key, value in row.items() if key.startswith(COMPARED) and key != "train/tokens_per_second"}


def preempted_job(job: pathlib.Path, deadline: float) -> dict:
    """Runs the job, SIGTERMs process 1 once training has begun, then restarts the job."""
    first = launch(job)
    try:
        while not (job / "metrics.jsonl").exists() and time.time() < deadline and first[0].poll() is None:
            time.sleep(0.1)  # the first row is written after step 2 is dispatched
        first[1].send_signal(signal.SIGTERM)  # one host only: JAX tells the other
    finally:
        first_out = finish(first, deadline)
    preempted = checkpoint_steps(job)[-1]
    data_files = sorted(os.listdir(job / "checkpoints" / str(preempted) / "data"))  # before it is rotated out
    return dict(preempted=preempted, data_files=data_files, first_out=first_out,
                second_out=finish(launch(job), deadline))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(two-process workdir, single-process workdir, the preempted step, the files of its
    checkpoint's data item, both runs' outputs)."""
    root = tmp_path_factory.mktemp("multihost")
    job, single = root / "job", root / "single"
    deadline = time.time() + TIMEOUT
    outcome: dict = {}

    def run_job() -> None:
        try:
            outcome.update(preempted_job(job, deadline))
        except BaseException as e:  # re-raised in the test's thread
            outcome["error"] = e

    orchestrator = threading.Thread(target=run_job, daemon=True)
    orchestrator.start()
    # Meanwhile, the uninterrupted single-process reference (loop.train wants the main thread).
    config = runpy.run_path(TINY)["get_config"]()
    config.training.num_steps, config.training.detailed_metrics_steps = NUM_STEPS, 1000  # as OVERRIDES
    config.training.logging_steps = 1
    assert jax.process_count() == 1 and jax.device_count() == 4
    loop.train(config, str(single))
    orchestrator.join(timeout=max(1.0, deadline - time.time()) + 30)
    if "error" in outcome:
        raise outcome["error"]
    assert not orchestrator.is_alive(), "the two-process job did not finish"
    return (job, single, outcome["preempted"], outcome["data_files"], outcome["first_out"],
            outcome["second_out"])


def test_sigterm_on_one_host_stops_both_at_the_same_checkpointed_step(runs):
    _, _, preempted, data_files, first_out, _ = runs
    assert 0 < preempted < NUM_STEPS
    for out in first_out:  # a warning, so process 1 shows it too
        assert f"preempted at step {preempted}" in out, out[-2000:]
    assert data_files == ["commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]  # each host's position


def test_only_process_zero_logs_and_writes_the_run_files(runs):
    job, _, preempted, _, _, (out_0, out_1) = runs
    assert f"at step {preempted}" in out_0 and "joined a 2-process job (manual) as process 0" in out_0
    assert "resumed from" not in out_1 and "val/loss" not in out_1  # INFO lines of process 1 are dropped
    # A second writer would show as repeated rows (`logged` folds them away) or extra event files.
    pairs = [(row["step"], key) for row in jsonl.read(job / "metrics.jsonl") for key in row if key != "step"]
    assert len(pairs) == len(set(pairs))  # no (step, metric) written twice
    samples = [(row["step"], row["index"]) for row in jsonl.read(job / "samples.jsonl")]
    assert samples and len(samples) == len(set(samples))
    events = [n for n in os.listdir(job) if n.startswith("events.out.tfevents")]
    assert len(events) == 2  # one per launch of the job (the first, and the resumed), both process 0's


def test_two_process_fsdp_job_matches_the_single_process_run(runs):
    job, single = runs[:2]
    got, expected = logged(job), logged(single)
    assert got.keys() == expected.keys()
    assert {(NUM_STEPS, "train/loss"), (NUM_STEPS, "val/loss"), (8, "advanced/attention_entropy")} <= got.keys()
    for key, value in expected.items():
        np.testing.assert_allclose(np.asarray(got[key], float), np.asarray(value, float), rtol=1e-4, atol=1e-6,
                                   err_msg=str(key))  # None (no data) and NaN compare equal to themselves
    assert checkpoint_steps(job)[-1] == NUM_STEPS


def test_the_two_process_checkpoint_restores_in_one_process(runs):
    job, single = runs[:2]
    restored, reference = load_trained(str(job)), load_trained(str(single))
    assert restored.step == reference.step == NUM_STEPS
    for x, y in zip(jax.tree.leaves(restored.params), jax.tree.leaves(reference.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_resuming_with_another_process_count_is_refused_with_one_line(runs, tmp_path):
    """Each host's data position is its own file: one process cannot continue a 2-process run."""
    job = tmp_path / "job"
    shutil.copytree(runs[0], job)
    rows_before = (job / "metrics.jsonl").read_text()
    result = subprocess.run([sys.executable, "-m", "tdlm_jax.main", f"--config={TINY}", f"--workdir={job}",
                             *OVERRIDES, f"--config.training.num_steps={NUM_STEPS + 2}",
                             "--config.sharding.mesh_shape=(2, 2)"], cwd=REPO, capture_output=True, text=True,
                            timeout=TIMEOUT, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: checkpoint ")
    assert "was written by a 2-process job and this job has 1: resume with 2 processes" in result.stderr
    assert "Traceback" not in result.stderr
    assert (job / "metrics.jsonl").read_text() == rows_before and not (job / "checkpoints-corrupt").exists()


def test_an_incomplete_manual_setup_is_a_one_line_error():
    result = subprocess.run([sys.executable, "-m", "tdlm_jax.main", f"--config={TINY}", "--num_processes=2"],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: a multi-host run needs a coordinator address, a process count and a process id; missing "
        "--coordinator_address (JAX_COORDINATOR_ADDRESS), --process_id (JAX_PROCESS_ID): pass all three, "
        "or none for a single-process run"]
