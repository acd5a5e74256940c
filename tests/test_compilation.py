"""Compilation: the persistent cache of a real run, one compile per program, and no host sync in the loop."""

import os
import pathlib
import runpy
import types

import jax
import jax.numpy as jnp
import pytest

from tdlm_jax.errors import CheckpointError, ConfigError
from tdlm_jax.training import compilation, loop, rundir

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(**training):
    config = runpy.run_path(str(REPO / "configs" / "tiny.py"))["get_config"]()
    config.training.num_steps = 4
    config.training.attention_analysis_steps = 4  # every variant runs: ordinary, detailed (4), analysis (4)
    config.sampling.num_samples_at_eval = 0
    config.training.update(training)
    return config


@pytest.fixture(autouse=True)
def session_cache_afterwards():
    yield
    # Later tests in this process use the test session's cache again (tests/conftest.py), or none.
    compilation.enable_persistent_cache(os.environ.get(compilation.JAX_CACHE_ENV))


def test_cache_dir_follows_the_config(tmp_path, monkeypatch):
    monkeypatch.delenv(compilation.JAX_CACHE_ENV, raising=False)
    assert compilation.cache_dir(tiny_config(), "runs/x") == os.path.join("runs/x", "compilation_cache")
    monkeypatch.setenv(compilation.JAX_CACHE_ENV, str(tmp_path / "jax"))  # JAX's own setting is kept
    assert compilation.cache_dir(tiny_config(), "runs/x") == str(tmp_path / "jax")
    assert compilation.cache_dir(tiny_config(compilation_cache_dir="none"), "runs/x") is None
    assert compilation.cache_dir(tiny_config(compilation_cache_dir=str(tmp_path)), "runs/x") == str(tmp_path)
    config = tiny_config()
    config.training.compilation_cache_dir = None
    with pytest.raises(ConfigError, match="compilation_cache_dir"):
        compilation.cache_dir(config, "runs/x")


def test_a_resumed_run_loads_every_program_from_the_cache(tmp_path, monkeypatch):
    """The real loop, interrupted and resumed: its hot loop never syncs with the host (an
    implicit device-to-host transfer would raise), the train step compiles once per variant,
    and the resumed run, restored from checkpoint 4, compiles nothing itself."""
    real_loop, real_evaluate = loop.run_loop, loop.evaluate
    evaluations = []

    def guarded_loop(*args, **kwargs):
        # A host sync is an implicit device-to-host transfer (float(x), np.asarray(x), `if x:`);
        # explicit ones (the deferred metric fetches, checkpoints) stay allowed.
        with jax.transfer_guard_device_to_host("disallow"):
            return real_loop(*args, **kwargs)

    def interrupted_at_the_second_evaluation(*args, **kwargs):  # step 8: resumes from checkpoint 4
        evaluations.append(1)
        if len(evaluations) == 2:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(loop, "run_loop", guarded_loop)
    monkeypatch.setattr(loop, "evaluate", interrupted_at_the_second_evaluation)
    monkeypatch.setattr(compilation, "MIN_FREE_BYTES", 0)  # whatever this machine's free space
    monkeypatch.delenv(compilation.JAX_CACHE_ENV, raising=False)  # the default: a cache in the workdir, empty at first
    config, workdir = tiny_config(num_steps=8), str(tmp_path / "run")
    counter = compilation.process_counter()
    jax.clear_caches()  # both runs start as a new process would, with nothing compiled in memory
    traces_before = counter.traces("train_step")
    with compilation.CompileCounter() as first_run, pytest.raises(KeyboardInterrupt):
        loop.train(config, workdir)
    assert counter.traces("train_step") - traces_before == 2  # ordinary and detailed, once each
    entries = compilation.cache_entries(os.path.join(workdir, "compilation_cache"))
    assert any(name.startswith("jit_train_step-") for name in entries)
    assert first_run.cache_writes == len(entries) and first_run.cache_hits == 0

    jax.clear_caches()
    with compilation.CompileCounter() as resumed:
        summary = loop.train(config, workdir)
    assert summary["summary/total_steps"] == 8  # resumed from checkpoint 4 and finished
    assert resumed.cache_writes == 0 and resumed.cache_hits == len(entries)
    assert compilation.cache_entries(os.path.join(workdir, "compilation_cache")) == entries


def test_a_configured_cache_directory_is_used_and_reopened(tmp_path):
    def cached_probe(x):
        return x + 1

    for directory in (tmp_path / "a", tmp_path / "b"):  # moving the cache in-process reopens it
        compilation.enable_persistent_cache(str(directory))
        jax.clear_caches()
        with compilation.CompileCounter() as counts:
            jax.jit(cached_probe)(jnp.ones(3))
        assert counts.cache_writes >= 1 and compilation.cache_entries(str(directory))
        assert any(name.startswith("jit_cached_probe-") for name in compilation.cache_entries(str(directory)))


def test_a_nearly_full_disk_keeps_the_cache_off(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(compilation.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=40_000))
    with caplog.at_level("WARNING"):
        compilation.enable_persistent_cache(str(tmp_path / "cache"))
    assert jax.config.jax_compilation_cache_dir is None and "compilation cache off" in caplog.text


def test_a_workdir_holding_only_the_cache_is_a_run(tmp_path):
    """The cache is created before any other run file, so a run stopped right after it resumes;
    a directory holding any other directory instead is refused."""
    run, other = tmp_path / "run", tmp_path / "other"
    os.makedirs(run / "compilation_cache")
    rundir.ensure_writable(str(run))  # does not raise "holds other files"
    os.makedirs(other / "some_cache")
    with pytest.raises(CheckpointError, match="holds other files"):
        rundir.ensure_writable(str(other))
