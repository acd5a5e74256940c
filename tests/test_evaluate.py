"""The NELBO evaluation: the estimator against values the math fixes, and the CLI on a tiny run."""

import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from tdlm_jax.diffusion.corruption import ForwardProcess
from tdlm_jax.diffusion.schedules import Schedule
from tdlm_jax.errors import ConfigError
from tdlm_jax.inference import evaluation, nelbo, sampler_comparison
from tdlm_jax.inference.trained import load_trained

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.py")
EDGES = (0.0, 0.3, 0.7, 1.0)
MASK_ID = 256
KEYS = {"eval/nelbo", "eval/nelbo_stderr", "eval/bits_per_token", "eval/perplexity_bound", "eval/num_sequences",
        "eval/num_tokens", "eval/num_t_samples", "eval/step"} | {
    f"eval/{b}_corruption_{what}" for b in ("low", "medium", "high") for what in ("loss", "accuracy")}


def uniform_model(params, noisy_BxL, valid_BxL, t_B):
    """Uniform over the 256 byte ids, −inf at [MASK] and [PAD], like the denoiser's SUBS output."""
    logits_BxLxV = jnp.zeros(noisy_BxL.shape + (258,), jnp.float32)
    return logits_BxLxV.at[..., 256:].set(-jnp.inf)


def linear_process() -> ForwardProcess:
    # 'uniform' weighting on purpose: evaluation must replace it with the exact ELBO weight.
    return ForwardProcess(Schedule("linear"), 1e-3, "stratified", "uniform", 10.0, MASK_ID, EDGES, 8)


def random_windows(num: int, length: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random bytes; the last window is half padding, like the final window of a split."""
    rng = np.random.default_rng(seed)
    tokens_NxL = rng.integers(0, 256, (num, length)).astype(np.int32)
    valid_NxL = np.ones((num, length), bool)
    valid_NxL[-1, length // 2:] = False
    tokens_NxL[~valid_NxL] = 257
    return tokens_NxL, valid_NxL


def check_invariants(result: dict) -> None:
    """What holds for every report: the derived scalars and the parts adding up to the whole."""
    assert result["eval/perplexity_bound"] == pytest.approx(math.exp(result["eval/nelbo"]), rel=1e-9)
    assert result["eval/bits_per_token"] == pytest.approx(result["eval/nelbo"] / math.log(2), rel=1e-9)
    for rows in (result["curve"], result["buckets"]):
        assert sum(r["nelbo"] for r in rows) == pytest.approx(result["eval/nelbo"], rel=1e-6)
        assert sum(r["samples"] for r in rows) == result["eval/num_sequences"] * result["eval/num_t_samples"]


def test_uniform_predictor_scores_log_256():
    tokens_NxL, valid_NxL = random_windows(61, 128)  # 61 rows: the last batch is padded
    result = nelbo.estimate(uniform_model, None, tokens_NxL, valid_NxL, process=linear_process(),
                            num_t_samples=32, batch_size=16, seed=0)
    # E_t[w(t)·(1 − α(t))] = 1 for the linear schedule: the bound is log 256 in expectation.
    assert abs(result["eval/nelbo"] - math.log(256)) < 4 * result["eval/nelbo_stderr"]
    # Teeth: 4 standard errors stay below 0.28, the bias of clipped weights (5.27 against 5.55).
    assert result["eval/nelbo_stderr"] < 0.05  # measured 0.029
    assert result["eval/num_sequences"] == 61 and result["eval/num_tokens"] == valid_NxL.sum()
    for row in result["curve"]:  # unweighted CE of a uniform predictor is log 256 at every level
        assert row["loss"] == pytest.approx(math.log(256), rel=1e-5)
    check_invariants(result)


def test_result_is_independent_of_batch_size():
    """Each sequence's noise depends on its index alone, and padding rows count for nothing."""
    tokens_NxL, valid_NxL = random_windows(21, 8, seed=1)
    run = lambda batch_size: nelbo.estimate(uniform_model, None, tokens_NxL, valid_NxL, process=linear_process(),
                                            num_t_samples=3, batch_size=batch_size, seed=5)
    small, large = run(4), run(24)
    assert small["eval/nelbo"] == pytest.approx(large["eval/nelbo"], rel=1e-6)
    assert small["curve"] == large["curve"]


def test_ratio_stderr_is_the_plain_stderr_for_equal_lengths():
    rng = np.random.default_rng(0)
    estimates_N, tokens_N = rng.normal(100.0, 10.0, 50), np.full(50, 32.0)
    ratio, stderr = nelbo.ratio_estimate(estimates_N, tokens_N)
    per_token_N = estimates_N / tokens_N
    assert ratio == pytest.approx(per_token_N.mean())
    assert stderr == pytest.approx(per_token_N.std(ddof=1) / math.sqrt(50))
    assert nelbo.ratio_estimate(estimates_N[:1], tokens_N[:1])[1] is None


def test_batch_size_must_divide_over_the_devices():
    tokens_NxL, valid_NxL = random_windows(8, 8)
    with pytest.raises(ConfigError, match="--batch_size=6"):
        nelbo.estimate(uniform_model, None, tokens_NxL, valid_NxL, process=linear_process(), num_t_samples=1,
                       batch_size=6)


def run_evaluate(*args):
    return subprocess.run([sys.executable, "-m", "tdlm_jax.evaluate", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> pathlib.Path:
    """A trained tiny run; 4 steps are enough to restore and evaluate (step 8 adds a tier-3 compile)."""
    workdir = tmp_path_factory.mktemp("evaluate") / "run"
    result = subprocess.run([sys.executable, "-m", "tdlm_jax.main", f"--config={TINY}", f"--workdir={workdir}",
                             "--config.training.num_steps=4"], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_more_t_samples_agree_and_shrink_the_stderr(tiny_run):
    trained = load_trained(str(tiny_run))
    tokens_NxL, valid_NxL = nelbo.split_windows(trained.config, trained.tokenizer, "val", max_sequences=128)
    one, many = (nelbo.nelbo_estimate(trained, tokens_NxL, valid_NxL, num_t_samples=k, seed=0) for k in (1, 16))
    combined = math.hypot(one["eval/nelbo_stderr"], many["eval/nelbo_stderr"])
    assert abs(one["eval/nelbo"] - many["eval/nelbo"]) < 3 * combined
    assert many["eval/nelbo_stderr"] < one["eval/nelbo_stderr"]
    assert many["eval/step"] == 4 and many["eval/num_t_samples"] == 16
    check_invariants(many)


def test_cli_prints_the_table_and_writes_json(tiny_run):
    result = run_evaluate(f"--workdir={tiny_run}", "--max_sequences=64", "--num_t_samples=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "eval/nelbo" in result.stdout and "by corruption bucket" in result.stdout
    written = json.loads((tiny_run / "eval_4.json").read_text())
    assert KEYS <= set(written)
    assert written["eval/num_sequences"] == 64 and written["eval/num_tokens"] == 64 * 32
    assert written["eval/step"] == 4 and written["split"] == "val"
    check_invariants(written)


def test_the_estimator_spread_of_every_design_estimates_the_same_loss(tiny_run):
    """Fresh noise draws of the training loss on one batch: iid, stratified and (with a skewed
    proposal over 4 bins) adaptive agree in mean within 4 standard errors; each std is positive."""
    from tdlm_jax.inference import estimator_spread

    trained = load_trained(str(tiny_run))
    tokens, valid = nelbo.split_windows(trained.config, trained.tokenizer, "val", max_sequences=8)
    q = np.array([0.55, 0.25, 0.15, 0.05], np.float32)
    got = estimator_spread.loss_estimate_spread(trained, tokens, valid, draws=400, seed=0, q_K=q)
    means = {d: (got[f"estimator_spread/{d}_mean"], got[f"estimator_spread/{d}_std"] / math.sqrt(400))
             for d in estimator_spread.DESIGNS}
    for a, b in (("iid", "stratified"), ("iid", "adaptive"), ("stratified", "adaptive")):
        assert abs(means[a][0] - means[b][0]) < 4 * math.hypot(means[a][1], means[b][1]), (a, b, means)
    assert all(got[f"estimator_spread/{d}_std"] > 0 for d in estimator_spread.DESIGNS)
    assert "adaptive_std" not in str(estimator_spread.loss_estimate_spread(trained, tokens, valid, draws=8, seed=0,
                                                                           q_K=None))
    assert estimator_spread.last_logged_proposal(str(tiny_run)) is None  # not an adaptive run


def test_cli_missing_workdir_is_one_line_and_exit_2(tmp_path):
    result = run_evaluate(f"--workdir={tmp_path / 'nothing'}")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: ")
    assert "config.json does not exist" in result.stderr


def test_cli_train_split_goes_to_its_own_file(tiny_run):
    result = run_evaluate(f"--workdir={tiny_run}", "--split=train", "--max_sequences=32", "--num_t_samples=1")
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads((tiny_run / "eval_4_train.json").read_text())
    assert written["split"] == "train" and written["eval/num_sequences"] == 32
    assert "on the train split" in result.stdout


def test_the_estimate_is_the_same_on_one_device(tiny_run):
    """This process has 4 devices; the command in a process with one computes the same numbers."""
    one = subprocess.run([sys.executable, "-m", "tdlm_jax.evaluate", f"--workdir={tiny_run}", "--max_sequences=32",
                          "--num_t_samples=2", "--seed=5"], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO),
                              "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    assert one.returncode == 0, one.stderr[-2000:]
    one_device = json.loads((tiny_run / "eval_4.json").read_text())
    trained = load_trained(str(tiny_run))
    tokens_NxL, valid_NxL = nelbo.split_windows(trained.config, trained.tokenizer, "val", max_sequences=32)
    four_devices = nelbo.nelbo_estimate(trained, tokens_NxL, valid_NxL, num_t_samples=2, seed=5)
    for key in ("eval/nelbo", "eval/nelbo_stderr", "eval/mask_accuracy"):
        assert one_device[key] == pytest.approx(four_devices[key], rel=1e-5), key


@pytest.fixture(scope="module")
def tiny_ar_run(tmp_path_factory) -> pathlib.Path:
    workdir = tmp_path_factory.mktemp("evaluate_ar") / "run"
    result = subprocess.run([sys.executable, "-m", "tdlm_jax.main", f"--config={TINY}", f"--workdir={workdir}",
                             "--config.model.kind=ar", "--config.training.num_steps=4"], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_gen_ppl_scores_samples_with_an_autoregressive_run(tiny_run, tiny_ar_run):
    result = run_evaluate(f"--workdir={tiny_run}", "--max_sequences=16", "--num_t_samples=1",
                          f"--gen_ppl_model={tiny_ar_run}", "--gen_num_samples=8", "--gen_steps=8")
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads((tiny_run / "eval_4.json").read_text())
    assert written["gen/num_samples"] == 8 and written["gen/sampler"] == "ancestral" and written["gen/scorer_step"] == 4
    # 4 steps of training leave both models near uniform over 257 ids: perplexity near 257.
    assert 50 < written["gen/perplexity"] <= 1000
    assert written["gen/nll_per_token"] == pytest.approx(math.log(written["gen/perplexity"]), rel=1e-9)
    assert 0 < written["gen/unigram_entropy"] <= math.log(257) + 1e-9
    refused = run_evaluate(f"--workdir={tiny_run}", "--max_sequences=16", f"--gen_ppl_model={tiny_run}")
    assert refused.returncode == 2 and "is not an autoregressive run" in refused.stderr
    assert refused.stderr.strip().count("\n") == 0


def test_evaluate_and_sample_refuse_a_tokenizer_that_no_longer_matches(tiny_run, tmp_path):
    changed = tmp_path / "run"
    shutil.copytree(tiny_run, changed)
    info = json.loads((changed / "tokenizer_info.json").read_text())
    (changed / "tokenizer_info.json").write_text(json.dumps({**info, "eos_id": info["eos_id"] - 1}))
    for module in ("tdlm_jax.evaluate", "tdlm_jax.sample"):
        result = subprocess.run([sys.executable, "-m", module, f"--workdir={changed}"], cwd=REPO, capture_output=True,
                                text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert result.returncode == 2, (module, result.stderr[-2000:])
        assert result.stderr.strip().count("\n") == 0 and "tokenizer" in result.stderr, module


def test_samplers_compare_speed_and_quality_with_a_card(tiny_run, tiny_ar_run):
    result = run_evaluate(f"--workdir={tiny_run}", "--max_sequences=8", "--num_t_samples=1",
                          f"--gen_ppl_model={tiny_ar_run}", "--gen_num_samples=4", "--gen_steps=4",
                          "--samplers=ancestral,first_hitting,confidence", "--sampler_steps=2,4")
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads((tiny_run / "samplers_4.json").read_text())
    records = written["records"]
    assert [(r["sampler"], r["steps"]) for r in records] == [
        ("ancestral", 2), ("ancestral", 4), ("first_hitting", None), ("confidence", 2), ("confidence", 4)]
    by_name = {(r["sampler"], r["steps"]): r for r in records}
    assert by_name[("first_hitting", None)]["nfe"] == 32  # one call per mask of the 32-token samples
    assert all(r["nfe"] <= r["steps"] for r in records if r["steps"] is not None)
    for r in records:
        assert r["seconds_per_sample"] > 0 and 1 < r["gen/perplexity"] and len(r["samples"]) == 3
        assert r["data_unigram_entropy"] == records[0]["data_unigram_entropy"] > 0
        assert r["frontier"] == sampler_comparison.on_frontier(r, records)
    assert any(r["frontier"] for r in records)
    card = written["card"]
    assert card["checkpoint_step"] == 4 and card["sampling_dtype"] == "float64" and card["scorer_step"] == 4
    assert card["gen_num_samples"] == 4 and card["versions"]["jax"] and "sampler" not in card
    page = (tiny_run / "samplers_4.html").read_text()
    assert "data:image/png;base64," in page and "Eval card" in page and "first_hitting" in page
    evaluated = json.loads((tiny_run / "eval_4.json").read_text())  # the single-sampler card
    assert evaluated["card"]["sampler"] == "ancestral" and evaluated["card"]["sampler_steps"] == 4
    assert evaluated["card"]["num_t_samples"] == 1 and evaluated["card"]["ema"] is False


def test_samplers_need_a_scorer_and_known_names_before_anything_slow(tiny_run):
    for args, message in ((["--samplers=ancestral"], "--samplers needs --gen_ppl_model"),
                          (["--samplers=ancestral,nope", "--gen_ppl_model=x"], "unknown sampler 'nope'"),
                          (["--samplers=ancestral", "--sampler_steps=8,x", "--gen_ppl_model=x"],
                           "--sampler_steps='8,x': must be a comma-separated list of ints")):
        result = run_evaluate(f"--workdir={tiny_run}", *args)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-1000:]
        assert result.stderr.strip().count("\n") == 0


def test_the_frontier_and_the_low_diversity_warning():
    def record(seconds, ppl, collapsed=False):
        return {"seconds_per_sample": seconds, "gen/perplexity": ppl, "collapsed": collapsed}

    records = [record(1, 30), record(2, 25), record(3, 28), record(0.5, 5, collapsed=True), record(4, 20)]
    assert [sampler_comparison.on_frontier(r, records) for r in records] == [True, True, False, False, True]
    assert evaluation.diversity_warning(2.4, 3.3) and evaluation.diversity_warning(3.2, 3.3) is None
