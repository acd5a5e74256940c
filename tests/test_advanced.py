"""Tier-3 (advanced) metrics against numpy recomputations, and the model's internals path."""

import dataclasses
import functools
import pathlib
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tdlm_jax.diffusion.corruption import corrupt
from tdlm_jax.metrics import advanced, jsonl
from tdlm_jax.parallel import sharding
from tdlm_jax.training import config as config_lib
from tdlm_jax.training import loop, programs, setup
from tdlm_jax.training import step as step_lib
from common import MODEL, make_process, model_parts, random_batch

REPO = pathlib.Path(__file__).resolve().parents[1]

# B=3, L=5: a full row, a row ending in padding, and a row with no valid position at all.
VALID = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], bool)


def hand_built_hidden(garbage: float = 0.0) -> np.ndarray:
    hidden = np.random.default_rng(0).normal(size=(3, 5, 3)).astype(np.float32) * [1.0, 2.0, 0.5]
    hidden[~VALID] = garbage
    return hidden


def numpy_reference(hidden_BxLxD: np.ndarray, valid_BxL: np.ndarray) -> dict[str, float]:
    """Loop-level recomputation of the three hidden-state metrics."""
    variances, stds, norms = [], [], []
    for h_LxD, valid_L in zip(hidden_BxLxD.astype(np.float64), valid_BxL):
        if valid_L.sum() == 0:
            continue
        rows = h_LxD[valid_L]
        variances.append(rows.var(axis=0).mean())
        stds.append(rows.std(axis=0).mean())
        norms.extend(np.linalg.norm(rows, axis=-1))
    return {"advanced/attention_entropy_proxy": np.mean(variances),
            "advanced/sequence_diversity": np.mean(stds), "advanced/hidden_state_norm": np.mean(norms)}


def uniform_probs(valid_BxL: np.ndarray, num_layers: int = 2, num_heads: int = 2) -> np.ndarray:
    """Every query attends uniformly to its sequence's valid keys: [K, B, N, L, L]."""
    batch, length = valid_BxL.shape
    probs_BxL = valid_BxL / np.maximum(valid_BxL.sum(-1, keepdims=True), 1)
    return np.broadcast_to(probs_BxL[None, :, None, None, :],
                           (num_layers, batch, num_heads, length, length)).astype(np.float32).copy()


@jax.jit
def stacked_metrics(hidden, probs_KxBxNxLxL, valid):
    """The metrics of stacked per-layer probabilities, reduced layer by layer as the pass does."""
    return advanced.advanced_metrics(hidden, advanced.attention_entropy_by_layer(probs_KxBxNxLxL, valid), valid)


def metrics_of(hidden, probs, valid=VALID) -> dict[str, float]:
    return jax.device_get(stacked_metrics(hidden, probs, valid))


def test_hidden_state_metrics_match_numpy_and_skip_empty_sequences():
    hidden = hand_built_hidden()
    got = metrics_of(hidden, uniform_probs(VALID), VALID)
    for name, expected in numpy_reference(hidden, VALID).items():
        np.testing.assert_allclose(got[name], expected, rtol=1e-5, err_msg=name)
        assert got[name].dtype == np.float32 and got[name].shape == ()


@pytest.mark.parametrize("garbage", [1e6, np.nan, np.inf])
def test_padding_does_not_change_any_metric(garbage):
    clean = metrics_of(hand_built_hidden(), uniform_probs(VALID))
    valid_keys, valid_queries = VALID[None, :, None, None, :], VALID[None, :, None, :, None]
    probs = np.where(valid_keys & valid_queries, uniform_probs(VALID), garbage).astype(np.float32)
    dirty = metrics_of(hand_built_hidden(garbage), probs)
    for name in clean:
        np.testing.assert_allclose(dirty[name], clean[name], rtol=1e-6, err_msg=name)


def test_uniform_attention_has_entropy_log_n():
    got = metrics_of(hand_built_hidden(), uniform_probs(VALID))
    # Pooled over valid queries: 5 queries with H = log 5 and 3 with H = log 3.
    expected = (5 * np.log(5) + 3 * np.log(3)) / 8
    np.testing.assert_allclose(got["advanced/attention_entropy"], expected, rtol=1e-6)
    single = metrics_of(hand_built_hidden(), uniform_probs(VALID[:1]), VALID[:1])
    np.testing.assert_allclose(single["advanced/attention_entropy"], np.log(5), rtol=1e-6)


def test_one_hot_attention_has_zero_entropy():
    probs = np.zeros((2, 3, 2, 5, 5), np.float32)
    probs[..., 1] = 1.0  # every query attends to key 1 only (0·log 0 must count as 0)
    got = metrics_of(hand_built_hidden(), probs)
    assert got["advanced/attention_entropy"] == 0.0
    assert got["advanced/attention_entropy/layer_0"] == 0.0


def test_per_layer_entropies_and_their_mean():
    probs = uniform_probs(VALID[:1], num_layers=3)
    probs[1] = 0.0
    probs[1, ..., 0] = 1.0  # layer 1 is one-hot
    got = metrics_of(hand_built_hidden()[:1], probs, VALID[:1])
    assert {f"advanced/attention_entropy/layer_{i}" for i in range(3)} <= got.keys()
    np.testing.assert_allclose([got[f"advanced/attention_entropy/layer_{i}"] for i in range(3)],
                               [np.log(5), 0.0, np.log(5)], atol=1e-6)
    np.testing.assert_allclose(got["advanced/attention_entropy"], 2 * np.log(5) / 3, rtol=1e-6)


def test_entropy_matches_numpy_on_random_attention():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(2, 3, 2, 5, 5)) * 3
    probs = np.exp(scores) * VALID[None, :, None, None, :]
    probs = (probs / np.maximum(probs.sum(-1, keepdims=True), 1e-30)).astype(np.float32)
    got = metrics_of(hand_built_hidden(), probs)
    for layer in range(2):
        rows = [probs[layer, b, n, q] for b in range(3) for n in range(2) for q in range(5) if VALID[b, q]]
        expected = np.mean([-sum(p * np.log(p) for p in row if p > 0) for row in rows])
        np.testing.assert_allclose(got[f"advanced/attention_entropy/layer_{layer}"], expected, rtol=1e-5)


def test_no_valid_position_gives_nan_not_zero():
    nothing = np.zeros_like(VALID)
    got = metrics_of(hand_built_hidden(), uniform_probs(VALID), nothing)
    assert all(np.isnan(value) for value in got.values()), got


def test_explicit_attention_matches_the_fused_kernel():
    graphdef, params = model_parts()
    model = nnx.merge(graphdef, params)
    batch = random_batch()
    fused = model(batch["tokens"], batch["valid"])
    logits, internals = model(batch["tokens"], batch["valid"], attention_summary=lambda probs: probs)
    np.testing.assert_allclose(logits, fused, atol=1e-5)
    hidden, probs = internals["hidden_BxLxD"], internals["attention_by_layer"]
    assert hidden.dtype == probs.dtype == jnp.float32
    assert hidden.shape == (*batch["tokens"].shape, MODEL.d_model)
    assert probs.shape == (MODEL.num_layers, batch["tokens"].shape[0], MODEL.num_heads,
                           batch["tokens"].shape[1], batch["tokens"].shape[1])
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert np.all(np.asarray(probs)[:, -1, :, :, ~batch["valid"][-1]] == 0)  # no weight on padding keys
    # The hidden state is the pre-norm residual stream: the head of its normed value gives the logits.
    predictable = np.arange(MODEL.vocab_size) < MODEL.num_predictable
    np.testing.assert_allclose(np.asarray(model.head(model.final_norm(hidden)))[..., predictable],
                               np.asarray(logits)[..., predictable], atol=1e-5)


@functools.lru_cache(maxsize=None)
def analysis_fn(num_devices: int):
    mesh = sharding.make_mesh(jax.devices()[:num_devices])
    return mesh, step_lib.jit_analysis_step(mesh, graphdef=model_parts()[0], process=make_process(), max_rows=8)


def run_analysis(num_devices: int) -> dict[str, float]:
    mesh, fn = analysis_fn(num_devices)
    batch = sharding.global_batch(random_batch(), mesh)
    params = sharding.replicate(model_parts()[1], mesh)
    return jax.device_get(fn(params, batch["tokens"], batch["valid"], jax.random.key(3)))


def test_analysis_step_is_the_same_on_one_and_four_devices():
    assert jax.device_count() == 4
    one, four = run_analysis(1), run_analysis(4)
    expected_names = {"advanced/attention_entropy_proxy", "advanced/hidden_state_norm",
                      "advanced/sequence_diversity", "advanced/attention_entropy",
                      *(f"advanced/attention_entropy/layer_{i}" for i in range(MODEL.num_layers))}
    assert one.keys() == four.keys() == expected_names
    for name in one:
        assert np.isfinite(one[name]), name
        np.testing.assert_allclose(four[name], one[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # Attention over at most LENGTH keys: entropy lies in [0, log LENGTH].
    assert 0.0 <= one["advanced/attention_entropy"] <= np.log(random_batch()["tokens"].shape[1]) + 1e-6


def test_the_loop_analyses_the_very_batch_each_step_trains_on(tmp_path, monkeypatch):
    """The analysis pass gets the step's tokens and the key the train step corrupts them with:
    its corruption masks as many tokens as that step's update saw (metrics/total_masked_tokens
    of a one-step logging interval), and its metrics are those of that corrupted batch."""
    config = runpy.run_path(str(REPO / "configs" / "tiny.py"))["get_config"]()
    config.training.update(num_steps=4, logging_steps=1, attention_analysis_steps=2, detailed_metrics_steps=100,
                           eval_every_n_steps=100)
    config.sampling.num_samples_at_eval = 0
    config.training.analysis_rows = 3  # of the batch's 8: rows 0, 2 and 5
    analysed, built = {}, {}
    real_build_run, real_compile = setup.build_run, programs.compile_programs

    def build_run(config, workdir):
        built["run"] = real_build_run(config, workdir)
        return built["run"]

    def compile_programs(config, mesh, state, **kwargs):
        compiled = real_compile(config, mesh, state, **kwargs)
        run = built["run"]
        process = config_lib.forward_process(config, run.tokenizer.mask_id)
        analysis = compiled[programs.ANALYSIS].compiled  # the program the loop calls

        def recording_analysis(params, tokens, valid, rng, *proposal_and_step):
            metrics = analysis(params, tokens, valid, rng, *proposal_and_step)
            batch = corrupt(process, rng, tokens, valid)
            rows = jax.tree.map(lambda x: x[np.array([0, 2, 5])], batch)
            _, internals = nnx.merge(run.graphdef, params)(rows.noisy_BxL, rows.valid_BxL, rows.t_B,
                                                          attention_summary=lambda probs: probs)
            expected = stacked_metrics(internals["hidden_BxLxD"], internals["attention_by_layer"], rows.valid_BxL)
            analysed[len(analysed)] = (int(batch.masked_BxL.sum()), jax.device_get(metrics), jax.device_get(expected))
            return metrics

        compiled[programs.ANALYSIS] = dataclasses.replace(compiled[programs.ANALYSIS], compiled=recording_analysis)
        return compiled

    monkeypatch.setattr(setup, "build_run", build_run)
    monkeypatch.setattr(programs, "compile_programs", compile_programs)
    loop.train(config, str(tmp_path / "run"))
    trained = {row["step"]: row["metrics/total_masked_tokens"]
               for row in jsonl.read(tmp_path / "run" / "metrics.jsonl") if "metrics/total_masked_tokens" in row}
    assert [masked for masked, _, _ in analysed.values()] == [trained[2], trained[4]]
    for _, got, expected in analysed.values():
        for name in expected:
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, err_msg=name)


def test_analysed_rows_are_evenly_spaced_and_bounded():
    np.testing.assert_array_equal(advanced.analysed_rows(32, 8), [0, 4, 8, 12, 16, 20, 24, 28])
    np.testing.assert_array_equal(advanced.analysed_rows(8, 3), [0, 2, 5])
    np.testing.assert_array_equal(advanced.analysed_rows(5, 8), [0, 1, 2, 3, 4])  # fewer rows: all of them


def test_the_analysis_pass_memory_does_not_grow_with_the_batch():
    """Compiled for 8 and for 128 rows of 64 positions, the pass's temporary memory is about the
    same: it analyses 4 rows whatever the batch, one layer's attention at a time (the stacked
    probabilities of every row would grow it 16-fold)."""
    mesh = sharding.make_mesh(jax.devices()[:1])
    params = model_parts()[1]

    def temp_bytes(batch_size):
        fn = step_lib.jit_analysis_step(mesh, graphdef=model_parts()[0], process=make_process(batch_size=batch_size),
                                        max_rows=4)
        tokens = jax.ShapeDtypeStruct((batch_size, 64), jnp.int32)
        valid = jax.ShapeDtypeStruct((batch_size, 64), jnp.bool_)
        return fn.lower(params, tokens, valid, jax.random.key(0)).compile().memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(8), temp_bytes(128)
    one_layer_probs = 4 * MODEL.num_heads * 64 * 64 * 4
    assert large < 1.5 * small, (small, large)
    assert small >= one_layer_probs  # it does build one layer's probabilities of the 4 rows
