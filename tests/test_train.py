"""End to end: the CLI on configs/tiny.py, resume equivalence, and config errors."""

import itertools
import json
import math
import os
import pathlib
import runpy
import shutil
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from tdlm_jax.errors import ConfigError, TrainingError
from tdlm_jax.inference.trained import load_trained
from tdlm_jax.metrics import catalogue, jsonl
from tdlm_jax.metrics.writers import read_scalars
from tdlm_jax.parallel import sharding
from tdlm_jax.training import loop, setup
from tdlm_jax.training import config as config_lib
from tdlm_jax.training import step as step_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.py")
TIER1 = {
    "train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second",
    "metrics/mask_accuracy", "metrics/total_masked_tokens", "metrics/valid_ratio",
    "val/loss", "val/perplexity", "val/bits_per_token", "val/mask_accuracy",
    "summary/training_time_hours", "summary/total_steps", "summary/final_loss", "summary/best_val_loss",
}
TIER2 = {f"research/{b}_corruption_{what}" for b in ("low", "medium", "high")
         for what in ("accuracy", "count", "loss", "loss_std")} | {
    "research/loss_estimator_stderr", "research/gradient_noise_scale", "research/gradient_noise_trace",
    "research/gradient_signal_squared"} | {
    f"research/gradient_norm_{b}_corruption" for b in ("low", "medium", "high")} | {
    "research/gradient_norm_total", "research/gradient_norm_ratio_high_to_low",
    "research/weight_difficulty_correlation", "research/avg_loss_weight", "research/weight_std",
    "research/avg_prediction_difficulty"}


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "tdlm_jax.main", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cli") / "run"
    result = run_cli(f"--config={TINY}", f"--workdir={workdir}", "--config.training.num_steps=6")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


def test_the_default_run_shows_every_tier_and_the_long_preset_keeps_the_guide_s_frequencies():
    def training(name):
        return runpy.run_path(str(REPO / "configs" / name))["get_config"]().training

    base = training("base.py")
    fired = {key: base.num_steps // base[key]  # the loop's `step % period == 0`
             for key in ("detailed_metrics_steps", "attention_analysis_steps", "eval_every_n_steps")}
    assert fired["detailed_metrics_steps"] >= 6 and fired["attention_analysis_steps"] >= 3
    assert fired["eval_every_n_steps"] >= 6
    assert all(base[key] % base.logging_steps == 0 for key in fired)  # aligned with tier-1 rows
    owt = training("owt_gpt2_small.py")
    assert (owt.logging_steps, owt.detailed_metrics_steps, owt.attention_analysis_steps) == (100, 500, 2000)


def test_the_auto_eval_prompt_is_the_built_in_source_s_cue_and_none_elsewhere():
    config = tiny_config()
    assert config.sampling.prompt == "auto" and config_lib.eval_prompt(config) == "ROMEO:"
    config.data.source = "corpus/*.jsonl"
    assert config_lib.eval_prompt(config) == ""
    config.sampling.prompt = "Once upon"
    assert config_lib.eval_prompt(config) == "Once upon"


def test_cli_writes_the_workdir(cli_run):
    workdir, _ = cli_run
    assert {"config.json", "metrics.jsonl", "summary.json", "checkpoints"} <= set(os.listdir(workdir))
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))
    assert json.loads((workdir / "config.json").read_text())["training"]["num_steps"] == 6  # the override
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["summary/total_steps"] == 6
    assert summary["summary/best_val_loss"] == min(r["val/loss"] for r in jsonl.read(workdir / "metrics.jsonl")
                                                   if "val/loss" in r)
    assert sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()) == [4, 6]
    samples = jsonl.read(workdir / "samples.jsonl")  # every evaluation's samples, as data
    assert [(s["step"], s["index"], s["sampler"], s["steps"], s["prompt"]) for s in samples] == [
        (4, 0, "ancestral", 4, "ROMEO:"), (6, 0, "ancestral", 4, "ROMEO:")]  # 'auto' on Shakespeare
    assert all(s["text"].startswith("ROMEO:") and 1 <= s["nfe"] <= 4 for s in samples)
    # ...and as TensorBoard text, under tensorboardX's tag name (README).
    events = b"".join(p.read_bytes() for p in workdir.glob("events.out.tfevents*"))
    assert b"samples/0/text_summary" in events and samples[-1]["text"].encode() in events


def test_cli_console_is_short_lines_with_progress(cli_run):
    """Not a terminal (a pipe here): no bar, and each logging step's line carries the progress."""
    _, result = cli_run
    log = result.stderr
    assert "compiling the train step…" in log and "the train step ready in" in log
    assert "compiling the train step with tier-2 metrics…" in log and "evaluation ready in" in log
    assert "the sampler ready in" in log
    # Every program but the sampler compiles before step 1, its memory logged:
    assert log.index("evaluation ready in") < log.index("memory per device") < log.index("] step 2/6")
    train_lines = [line for line in log.splitlines() if "] step " in line]
    assert [line.split("] step ")[1].split(" |")[0] for line in train_lines] == ["2/6 33%", "4/6 66%", "6/6 100%"]
    assert all("step/s" in line and "tok/s" in line and "loss " in line for line in train_lines)
    assert "ETA" in train_lines[0] and "ETA" not in train_lines[-1]
    assert "research step 4 (buckets low/med/high) | loss " in log
    assert "samples at step 4:\n  [0] ROMEO:" in log  # a text block, not an escaped repr
    assert "run summary (all of it in summary.json):\n  steps             6\n" in log
    assert "%|" not in log  # no progress bar outside a terminal
    assert max(len(line) for line in log.splitlines() if "console.py" in line) < 300


def test_a_checkpoint_opens_with_plain_orbax_without_this_project(cli_run):
    workdir, _ = cli_run
    script = f"""
import json, sys
import orbax.checkpoint as ocp
state = ocp.StandardCheckpointer().restore({str(workdir / "checkpoints" / "6" / "train_state")!r})
assert not any(name.startswith("tdlm_jax") for name in sys.modules)
def names(tree, prefix=""):
    for key, value in tree.items():
        yield from names(value, prefix + key + "/") if isinstance(value, dict) else [prefix + key]
print(json.dumps({{"names": sorted(names(state)), "step": int(state["step"]),
                  "embedding": state["params"]["embed"]["embedding"].tolist()}}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    restored = json.loads(result.stdout.strip().splitlines()[-1])
    assert restored["step"] == 6 and not any(n.endswith("/value") for n in restored["names"])
    assert {"opt_state/1/0/count", "opt_state/1/0/mu/embed/embedding", "params/embed/embedding"} <= set(restored["names"])
    trained = load_trained(str(workdir), step=6)  # the project's own restore: the same values
    np.testing.assert_array_equal(np.asarray(restored["embedding"], np.float32),
                                  np.asarray(trained.params["embed"]["embedding"][...]))


def test_cli_logs_every_tier1_name_to_jsonl_and_tensorboard(cli_run):
    workdir, _ = cli_run
    rows = jsonl.read(workdir / "metrics.jsonl")
    logged = set().union(*rows) - {"step"}
    assert TIER1 <= logged
    assert TIER1 <= set(read_scalars(str(workdir)))
    assert sorted({r["step"] for r in rows if "train/loss" in r}) == [2, 4, 6]
    for row in rows:
        if "val/loss" in row:
            assert row["val/perplexity"] == pytest.approx(math.exp(row["val/loss"]), rel=1e-12)
            assert row["val/bits_per_token"] == pytest.approx(row["val/loss"] / math.log(2), rel=1e-12)


def test_cli_logs_research_metrics_on_detailed_steps_only(cli_run):
    workdir, _ = cli_run
    rows = jsonl.read(workdir / "metrics.jsonl")
    research_steps = {r["step"] for r in rows if any(k.startswith("research/") for k in r)}
    assert research_steps == {4}  # detailed_metrics_steps = 4 in tiny.py; the run ends at 6
    assert TIER2 == {k for r in rows for k in r if k.startswith("research/")}
    events = read_scalars(str(workdir))
    for name in TIER2:
        assert [step for step, _ in events.get(name, [])] in ([4], []), name
    # Only metrics that may be undefined can be missing from TensorBoard (skipped as None).
    assert {n for n in TIER2 if n not in events} <= {n for n in TIER2 if n.endswith("accuracy") or "ratio" in n
                                                    or "correlation" in n or n.endswith("noise_scale")}


def test_cli_rejects_bad_config_values_with_one_line(tmp_path):
    for override, expected in [("--config.diffusion.schedule=sqrt", "diffusion.schedule='sqrt': must be one of linear"),
                               ("--config.training.num_steps=0", "training.num_steps=0: must be a positive integer")]:
        result = run_cli(f"--config={TINY}", f"--workdir={tmp_path / 'bad'}", override)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines()[-1].startswith("error: config error: " + expected.split(":")[0])
        assert expected in result.stderr
        assert "Traceback" not in result.stderr


def tiny_config(**overrides):
    config = runpy.run_path(TINY)["get_config"]()
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


@pytest.mark.parametrize("overrides, message", [
    ({"diffusion.schedule": "sqrt"}, "diffusion.schedule='sqrt': must be one of linear, cosine, polynomial, loglinear"),
    ({"training.num_steps": 0}, "training.num_steps=0: must be a positive integer"),
    ({"training.batch_size": 6}, "training.batch_size=6: does not divide over 4 devices: use a multiple of 4"),
    ({"diffusion.loss_weighting": "snr"}, "diffusion.loss_weighting='snr': must be one of elbo, uniform, clipped"),
    ({"metrics.bucket_edges": (0.0, 0.5, 1.0)}, "metrics.bucket_edges=(0.0, 0.5, 1.0): must be 4 increasing"),
    ({"model.d_model": 30}, "model.d_model=30: must be a multiple of 2·model.num_heads (4)"),
    ({"diffusion.t_min": 0.0}, "diffusion.t_min=0.0: must be in (0, 1)"),
    ({"metrics.row_gradient_mb": -1}, "metrics.row_gradient_mb=-1: must be an integer >= 0"),
    ({"training.grad_accum_unroll": -1}, "training.grad_accum_unroll=-1: must be an integer >= 0"),
])
def test_validate_names_the_key_and_what_is_allowed(overrides, message):
    with pytest.raises(ConfigError) as error:
        config_lib.validate(tiny_config(**overrides), num_devices=jax.device_count())
    assert message in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("megabytes, expected", [(0, 32 * 2**20), (5, 5 * 2**20)], ids=["by platform", "set"])
def test_the_train_step_takes_its_per_row_gradient_budget_from_the_config(megabytes, expected):
    statics = setup.train_step_statics(tiny_config(**{"metrics.row_gradient_mb": megabytes}), graphdef=None,
                                       optimizer=None, lr_schedule=None, mask_id=0, mesh=sharding.make_mesh())
    assert statics["row_gradient_bytes"] == expected  # 32 MiB: this CPU's default


@pytest.mark.parametrize("unroll, expected", [(0, 2), (3, 3)], ids=["by platform", "set"])
def test_the_train_step_takes_its_accumulation_unroll_from_the_config(unroll, expected):
    statics = setup.train_step_statics(tiny_config(**{"training.grad_accum_unroll": unroll}), graphdef=None,
                                       optimizer=None, lr_schedule=None, mask_id=0, mesh=sharding.make_mesh())
    assert statics["accum_unroll"] == expected  # 2: a CPU's default
    gpu = types.SimpleNamespace(platform="gpu")
    assert step_lib.accumulation_unroll(0, gpu) == 1 and step_lib.accumulation_unroll(3, gpu) == 3


# Adaptive: 4 bins, so that q leaves uniform within the run (each bin has seen 10 sequences
# by about step 5), and the resumed half must restore the proposal's statistics to match.
ADAPTIVE = {"diffusion.time_sampling": "adaptive", "diffusion.adaptive_bins": 4, "diffusion.adaptive_warmup_steps": 2}


@pytest.mark.parametrize("overrides", [{}, ADAPTIVE], ids=["stratified", "adaptive"])
def test_resumed_run_logs_the_same_values_as_an_uninterrupted_one(tmp_path, overrides):
    """Interrupt after the step-4 checkpoint (drop checkpoint 8 and later rows), resume."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    loop.train(tiny_config(**overrides), str(full))
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "8")
    kept = [json.dumps(r) for r in jsonl.read(resumed / "metrics.jsonl") if r["step"] <= 4]
    (resumed / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    loop.train(tiny_config(**overrides), str(resumed))
    if overrides:  # the proposal the step-8 research row logs has left uniform
        q = [r for r in jsonl.read(full / "metrics.jsonl") if "research/time_proposal/bin_0" in r][-1]
        assert q["step"] == 8 and max(abs(q[f"research/time_proposal/bin_{k}"] - 0.25) for k in range(4)) > 1e-3
        assert sum(q[f"research/time_proposal/bin_{k}"] for k in range(4)) == pytest.approx(1.0)
        logged = set(q) - {"step"}
        assert logged == {n for n in catalogue.scalar_names("diffusion", 2, (), tiers=(catalogue.TIER2,), num_bins=4)
                          if catalogue.tier_of(n) == catalogue.TIER2}  # every research name, the bins included
        assert [s for s, _ in read_scalars(str(full))["research/time_proposal/bin_3"]] == [4, 8]
        events = b"".join(p.read_bytes() for p in full.glob("events.out.tfevents*"))
        # A Summary.Value whose tag is followed by field 5 (0x2a): a histogram, one per detailed step.
        assert events.count(b"research/time_proposal\x2a") == 2

    def after_step_4(workdir):
        return [{k: v for k, v in r.items() if k not in ("train/tokens_per_second",) and not k.startswith("summary/")}
                for r in jsonl.read(workdir / "metrics.jsonl") if r["step"] > 4]

    expected, got = after_step_4(full), after_step_4(resumed)
    assert len(expected) == len(got) > 0
    # samples.jsonl was not cut by hand: the resume drops its rows after step 4 and draws them again.
    assert jsonl.read(resumed / "samples.jsonl") == jsonl.read(full / "samples.jsonl")
    assert [s["step"] for s in jsonl.read(full / "samples.jsonl")] == [4, 8]
    for e, g in zip(expected, got):
        assert e.keys() == g.keys()
        for k in e:
            assert g[k] == pytest.approx(e[k], rel=1e-6, abs=1e-7, nan_ok=True), k


def poison_training_batches(monkeypatch, config, first: int, last: int) -> None:
    """Makes training batches first..last (1-based) carry an id outside the vocabulary,
    which embeds as NaN: a corrupt batch."""
    real_global_batch, calls = sharding.global_batch, itertools.count(1)
    offset = config.data.num_eval_batches  # validation batches are placed first

    def poisoned(local_batch, mesh):
        if first <= next(calls) - offset <= last:
            local_batch = {**local_batch, "tokens": local_batch["tokens"].copy()}
            local_batch["tokens"][0, 0] = 10_000
        return real_global_batch(local_batch, mesh)

    monkeypatch.setattr(sharding, "global_batch", poisoned)


def test_a_nan_batch_is_skipped_alerted_and_training_goes_on(tmp_path, monkeypatch):
    """Poison the third training batch: the run finishes, counts the skip, and raises the alert."""
    config = tiny_config()
    poison_training_batches(monkeypatch, config, 3, 3)
    summary = loop.train(config, str(tmp_path))
    rows = jsonl.read(tmp_path / "metrics.jsonl")
    skipped = {r["step"]: r["train/skipped_steps"] for r in rows if "train/skipped_steps" in r}
    assert skipped == {2: 0, 4: 1, 6: 1, 8: 1}
    # The poisoned row's NaN always reaches the gradient; it reaches the loss only if that row
    # happens to have masked tokens.
    grad_norm = {r["step"]: r["train/grad_norm"] for r in rows if "train/grad_norm" in r}
    assert math.isnan(grad_norm[4]) and math.isfinite(grad_norm[6]) and math.isfinite(grad_norm[8])
    alerts = [(a["step"], a["event"]) for a in jsonl.read(tmp_path / "alerts.jsonl")
              if a["rule"] == "non_finite_training"]
    assert alerts == [(4, "start"), (6, "clear")]
    assert summary["alerts/starts/non_finite_training"] == 1


def test_too_many_consecutive_nonfinite_steps_stop_with_the_last_good_state(tmp_path, monkeypatch):
    config = tiny_config()
    config.training.max_consecutive_nonfinite = 3
    poison_training_batches(monkeypatch, config, 3, 10**6)
    with pytest.raises(TrainingError, match="after 4 consecutive non-finite"):
        loop.train(config, str(tmp_path))  # seen at the step-6 log (4 skips), acted on at step 7
    stop, before = load_trained(str(tmp_path), step=7), load_trained(str(tmp_path), step=4)
    for a, b in zip(jax.tree.leaves(stop.params), jax.tree.leaves(before.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # steps 3-7 changed nothing
