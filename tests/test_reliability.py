"""Faults a run must survive: preemption, a kill mid-save, corrupt checkpoints, changed
configs, unwritable workdirs; and determinism."""

import json
import math
import os
import pathlib
import random
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tdlm_jax.errors import CheckpointError, ConfigError
from tdlm_jax.metrics import jsonl
from tdlm_jax.training import loop

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.py")
VOLATILE = ("train/tokens_per_second", "summary/training_time_hours")


def tiny_config():
    return runpy.run_path(TINY)["get_config"]()


def comparable_rows(workdir, after_step=0):
    return [{k: v for k, v in r.items() if k not in VOLATILE}
            for r in jsonl.read(workdir / "metrics.jsonl") if r["step"] > after_step]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reliability") / "uninterrupted"
    loop.train(tiny_config(), str(workdir))
    return workdir


def test_same_config_and_seed_give_bit_identical_metrics(uninterrupted, tmp_path):
    loop.train(tiny_config(), str(tmp_path / "again"))
    assert comparable_rows(tmp_path / "again") == comparable_rows(uninterrupted)


def test_kill_during_a_save_falls_back_to_the_previous_checkpoint_without_duplicate_rows(uninterrupted, tmp_path):
    """As if killed while writing checkpoint 8: its data file is cut short, and the metrics
    log holds rows past step 4 plus a torn last line."""
    workdir = tmp_path / "killed"
    shutil.copytree(uninterrupted, workdir)
    step_8 = workdir / "checkpoints" / "8"
    largest = max((p for p in step_8.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 3])
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "train/lo')
    loop.train(tiny_config(), str(workdir))
    assert (workdir / "checkpoints-corrupt" / "8").is_dir()  # moved aside, named in a warning
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())[-1] == 8
    steps = [r["step"] for r in jsonl.read(workdir / "metrics.jsonl") if "train/loss" in r]
    assert steps == sorted(set(steps))  # no step logged twice
    assert comparable_rows(workdir) == comparable_rows(uninterrupted)


def test_no_readable_checkpoint_is_an_error_not_a_silent_restart(uninterrupted, tmp_path):
    workdir = tmp_path / "all_bad"
    shutil.copytree(uninterrupted, workdir)
    for step_dir in (workdir / "checkpoints").iterdir():
        if step_dir.name.isdigit():
            for p in step_dir.rglob("*"):
                if p.is_file() and p.stat().st_size > 1000:
                    p.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="could not be restored"):
        loop.train(tiny_config(), str(workdir))
    assert not (workdir / "checkpoints-corrupt").exists()  # nothing moved when nothing restores


@pytest.mark.parametrize("key, value", [("model.num_layers", 3), ("data.seq_len", 16), ("data.tokenizer", "gpt2"),
                                        ("training.batch_size", 16), ("seed", 1),
                                        ("metrics.bucket_edges", (0.0, 0.2, 0.8, 1.0))])
def test_a_change_of_what_the_run_computes_is_refused_on_resume(uninterrupted, tmp_path, key, value):
    workdir = tmp_path / "changed"
    shutil.copytree(uninterrupted, workdir)
    recorded = (workdir / "config.json").read_text()
    config = tiny_config()
    config.update_from_flattened_dict({key: value})
    with pytest.raises(ConfigError, match=rf"resuming .* different {re.escape(key)} .*allow_config_change=true"):
        loop.train(config, str(workdir))
    assert (workdir / "config.json").read_text() == recorded


def test_a_run_saved_before_a_key_existed_resumes_at_its_default_and_refuses_another_value(uninterrupted, tmp_path):
    """config.json of a run from an earlier version lacks the keys added since (here the
    adaptive sampler's): at base.py's defaults they are no change; set otherwise, they are."""
    workdir = tmp_path / "older"
    shutil.copytree(uninterrupted, workdir)
    saved = json.loads((workdir / "config.json").read_text())
    for key in [k for k in saved["diffusion"] if k.startswith("adaptive_")]:
        del saved["diffusion"][key]
    (workdir / "config.json").write_text(json.dumps(saved))
    config = tiny_config()
    config.diffusion.adaptive_bins = 16
    with pytest.raises(ConfigError, match=r"different diffusion.adaptive_bins \(diffusion.adaptive_bins: None -> 16\)"):
        loop.train(config, str(workdir))
    config.training.num_steps = 10
    config.diffusion.adaptive_bins = 32  # base.py's default
    assert loop.train(config, str(workdir))["summary/total_steps"] == 10


def test_changes_of_how_the_run_evaluates_are_allowed_on_resume(uninterrupted, tmp_path):
    workdir = tmp_path / "changed"
    shutil.copytree(uninterrupted, workdir)
    config = tiny_config()
    config.training.num_steps = 10
    config.training.logging_steps = 1
    config.data.num_eval_batches, config.data.eval_batch_size = 1, 4  # evaluation size, not the objective
    summary = loop.train(config, str(workdir))
    assert summary["summary/total_steps"] == 10
    assert json.loads((workdir / "config.json").read_text())["data"]["num_eval_batches"] == 1


def test_unwritable_workdir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointError, match="is not writable"):
        loop.train(tiny_config(), str(blocker / "run"))


def test_sigterm_saves_a_checkpoint_exits_zero_and_the_restart_resumes(tmp_path):
    workdir = tmp_path / "preempted"
    command = [sys.executable, "-m", "tdlm_jax.main", f"--config={TINY}", f"--workdir={workdir}",
               "--config.training.num_steps=5000", "--config.training.checkpoint_every_n_steps=5000",
               "--config.training.eval_every_n_steps=5000", "--config.training.detailed_metrics_steps=5000",
               "--config.training.attention_analysis_steps=5000"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (workdir / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-2000:]
    saved = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and 0 < saved[0] < 5000
    assert not (workdir / "summary.json").exists()  # the run is not finished
    assert max(r["step"] for r in jsonl.read(workdir / "metrics.jsonl")) <= saved[0]
    resumed = subprocess.run(command[:6] + [f"--config.training.num_steps={saved[0] + 2}"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"at step {saved[0]}" in resumed.stderr
    assert json.loads((workdir / "summary.json").read_text())["summary/total_steps"] == saved[0] + 2


def test_a_workdir_holding_other_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("someone else's work")
    with pytest.raises(CheckpointError, match="holds other files"):
        loop.train(tiny_config(), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


@pytest.mark.parametrize("args, expected", [
    (["--config=configs/missing.py"], "config file 'configs/missing.py' could not be loaded (OSError: [Errno 2]"),
    (["--config=README.md"], "config file 'README.md' could not be loaded (SyntaxError"),
    ([f"--config={TINY}", "--config.training.num_step=5"],
     "--config.training.num_step names a key the config does not have (did you mean num_steps?)"),
    ([f"--config={TINY}", "--config.training.num_steps=many"], "--config.training.num_steps=many: invalid literal"),
])
def test_hostile_command_lines_get_one_line_errors(args, expected, tmp_path):
    result = subprocess.run([sys.executable, "-m", "tdlm_jax.main", *args, f"--workdir={tmp_path / 'run'}"],
                            cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # exactly one line
    assert result.stderr.startswith("error: ") and expected in result.stderr
    assert not (tmp_path / "run").exists()


def run_main(workdir, *overrides, timeout=300):
    return subprocess.run([sys.executable, "-m", "tdlm_jax.main", f"--config={TINY}", f"--workdir={workdir}",
                           *overrides], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_sigkill_at_a_random_moment_resumes_and_repeats_the_uninterrupted_losses(tmp_path):
    """A real kill -9, at a random moment after the first checkpoint (during a save or not)."""
    overrides = ["--config.training.num_steps=300", "--config.training.checkpoint_every_n_steps=25",
                 "--config.training.logging_steps=5", "--config.training.eval_every_n_steps=25",
                 "--config.training.detailed_metrics_steps=10", "--config.training.attention_analysis_steps=50"]
    reference = run_main(tmp_path / "reference", *overrides)
    assert reference.returncode == 0, reference.stderr[-2000:]

    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "tdlm_jax.main", f"--config={TINY}", f"--workdir={killed}",
                                *overrides], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "25").is_dir() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 2.0))
    process.kill()
    process.wait()
    resumed = run_main(killed, *overrides)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert comparable_rows(killed) == comparable_rows(tmp_path / "reference")


def test_full_disk_at_checkpoint_time_is_a_clear_error_and_keeps_earlier_checkpoints(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root; this machine does not allow it")
    try:
        workdir = disk / "run"
        assert run_main(workdir).returncode == 0  # checkpoints 4 and 8
        filler = disk / "filler"
        with open(filler, "wb") as f:  # leave ~40 KB: metric rows fit, a checkpoint does not
            free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
            f.write(b"\0" * max(free - 40_000, 0))
        result = run_main(workdir, "--config.training.num_steps=12")
        assert result.returncode == 2
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "could not be written" in errors[0] and "disk space" in errors[0]
        assert f"{os.sep}tdlm_jax{os.sep}" not in result.stderr.split(errors[0])[1]  # no stack through our code
        filler.unlink()
        from tdlm_jax.inference.trained import load_trained
        assert load_trained(str(workdir), step=8).step == 8  # the earlier checkpoint is intact
        assert run_main(workdir, "--config.training.num_steps=12").returncode == 0  # and resumable
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_a_text_file_with_one_extremely_long_line_trains(tmp_path):
    corpus = tmp_path / "one_line.txt"
    corpus.write_text("to be or not to be " * 200_000)  # 3.8 MB, no newline at all
    config = tiny_config()
    config.data.source = str(corpus)
    config.training.num_steps = 2
    summary = loop.train(config, str(tmp_path / "run"))
    assert summary["summary/total_steps"] == 2 and math.isfinite(summary["summary/final_loss"])
    from tdlm_jax.data import cache, tokenizer

    token_cache = cache.open_or_build(config.data, tokenizer.ByteTokenizer())  # the run's own entry
    assert not token_cache.built and token_cache.meta["split_by"] == "tokens"  # one document
    assert token_cache.train.num_tokens + token_cache.val.num_tokens == len(corpus.read_bytes()) + 1  # all + EOS


def test_a_binary_file_given_as_text_is_refused_but_a_few_bad_bytes_are_not(tmp_path):
    from tdlm_jax.data import sources
    from tdlm_jax.errors import DataError

    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(20_000)))
    with pytest.raises(DataError, match="looks binary"):
        sources.load_text(str(binary))
    mostly_text = tmp_path / "scraped.txt"
    mostly_text.write_bytes(b"a fine line of text\n" * 500 + b"\xff\xfe" + b"more text\n")
    assert "\ufffd" in sources.load_text(str(mostly_text))  # replaced and counted, not refused
