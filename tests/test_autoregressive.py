"""The autoregressive baseline: causality, exact NLL, float64 scoring, and a tiny run."""

import dataclasses
import math
import pathlib
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tdlm_jax.model.head import scores_from_logits
from tdlm_jax.metrics import catalogue, health_rules, jsonl
from tdlm_jax.model import autoregressive
from tdlm_jax.model.transformer import Denoiser
from tdlm_jax.training import loop
from common import MODEL, random_batch

MASK_ID = 256
AR_MODEL = dataclasses.replace(MODEL, causal=True)


def test_shift_right_puts_the_start_token_first():
    tokens = jnp.array([[5, 6, 7]])
    np.testing.assert_array_equal(autoregressive.shift_right(tokens, MASK_ID), [[MASK_ID, 5, 6]])


def test_causal_model_never_sees_the_future():
    model = Denoiser(AR_MODEL, nnx.Rngs(0))
    data = random_batch(with_padding=False)
    tokens, valid = jnp.asarray(data["tokens"]), jnp.asarray(data["valid"])
    changed = tokens.at[:, 10:].set(7)
    before = autoregressive.next_token_logits(model, tokens, valid, MASK_ID)
    after = autoregressive.next_token_logits(model, changed, valid, MASK_ID)
    # Position i predicts token i from tokens < i, so positions <= 10 are unaffected.
    np.testing.assert_allclose(before[:, :11], after[:, :11], rtol=1e-5, atol=1e-5)
    assert not np.allclose(before[:, 11:], after[:, 11:], atol=1e-3)


def test_uniform_predictor_nll_is_exactly_log_v():
    graphdef, params = nnx.split(Denoiser(AR_MODEL, nnx.Rngs(0)))
    params = jax.tree.map(jnp.zeros_like, params)  # zero head: uniform over the 256 byte ids
    data = random_batch()  # with a padded row: padding is not scored
    rows, _ = autoregressive.row_losses(graphdef, params, jnp.asarray(data["tokens"]),
                                        jnp.asarray(data["valid"]), MASK_ID)
    assert float(rows.sum()) == pytest.approx(math.log(256), rel=1e-6)


def test_float64_nll_matches_the_float32_cross_entropy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 258)).astype(np.float32) * 4
    logits[..., 256:] = -np.inf
    tokens = rng.integers(0, 256, (3, 5))
    valid = np.ones((3, 5), bool)
    valid[2, 3:] = False
    expected = np.where(valid, np.asarray(scores_from_logits(jnp.asarray(logits), jnp.asarray(tokens)).nll_BxL), 0).sum(-1)
    np.testing.assert_allclose(autoregressive.nll_float64(logits, tokens, valid), expected, rtol=1e-5)
    assert autoregressive.nll_float64(logits, tokens, valid).dtype == np.float64


def test_tiny_ar_run_logs_exact_nll_and_no_diffusion_metrics(tmp_path):
    config = runpy.run_path(str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py"))["get_config"]()
    config.model.kind = "ar"
    summary = loop.train(config, str(tmp_path))
    rows = jsonl.read(tmp_path / "metrics.jsonl")
    names = set().union(*rows)
    rules = [rule.name for rule in health_rules.default_rules()]
    assert names - {"step"} == catalogue.scalar_names("ar", num_layers=config.model.num_layers, rules=rules)
    assert {"train/loss", "val/loss", "val/perplexity"} <= names
    assert not {n for n in names if n.startswith(("metrics/", "research/", "advanced/"))}
    assert "val/mask_accuracy" not in names
    val = [r for r in rows if "val/loss" in r]
    assert all(r["val/perplexity"] == pytest.approx(math.exp(r["val/loss"])) for r in val)
    assert summary["summary/best_val_loss"] == min(r["val/loss"] for r in val)


def test_generative_perplexity_of_a_uniform_scorer_is_v_and_entropy_is_exact():
    model = Denoiser(AR_MODEL, nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    uniform = nnx.merge(graphdef, jax.tree.map(jnp.zeros_like, params))
    samples = np.random.default_rng(0).integers(0, 256, (5, 16))
    scores = autoregressive.generative_perplexity(uniform, samples, MASK_ID, batch_size=2)
    assert scores["gen/perplexity"] == pytest.approx(256.0, rel=1e-9)
    counts = np.bincount(samples.ravel()) / samples.size
    expected = -sum(p * math.log(p) for p in counts if p > 0)
    assert scores["gen/unigram_entropy"] == pytest.approx(expected, rel=1e-12)
    repetitive = autoregressive.generative_perplexity(uniform, np.full((2, 16), 101), MASK_ID)
    assert repetitive["gen/unigram_entropy"] == 0.0
