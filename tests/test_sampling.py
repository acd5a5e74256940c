"""Samplers: fake models with known outputs, the logit filters, the real tiny denoiser, and the CLI."""

from __future__ import annotations

import functools
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdlm_jax.diffusion import sampling
from tdlm_jax.diffusion.schedules import Schedule
from tdlm_jax.errors import ConfigError
from tdlm_jax.inference.generation import SEPARATOR, make_template
from tests.common import MODEL, model_parts

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.py")
MASK, PAD, VOCAB, PREDICTABLE = 256, 257, 258, 256
TOKEN = 42
PROMPT = 5
METHODS = [
    dict(method="ancestral"),
    dict(method="confidence"),
    dict(method="confidence", remasking="random"),
    dict(method="confidence", block_length=4),
    dict(method="ancestral", block_length=4),
]


def make_prompt_template(batch: int = 2, length: int = 16, prompt: int = PROMPT) -> np.ndarray:
    template = np.full((batch, length), MASK, np.int32)
    template[:, :prompt] = np.arange(prompt) + 7
    return template


def one_hot_model(calls: list | None = None, inputs: list | None = None):
    """Logits with all mass on TOKEN, whatever the input; optionally records each real call."""

    def model_fn(x_NxL, valid_NxL, t_N):
        if calls is not None:
            jax.debug.callback(lambda: calls.append(1))
        if inputs is not None:
            jax.debug.callback(lambda x: inputs.append(np.asarray(x)), x_NxL)
        return jnp.full(x_NxL.shape + (VOCAB,), -jnp.inf).at[..., TOKEN].set(0.0)

    return model_fn


def fixed_random_model(seed: int = 0, length: int = 16):
    """Input-independent random logits that favour [MASK] and [PAD] most, to test the guard."""
    logits_LxV = jax.random.normal(jax.random.key(seed), (length, VOCAB)) * 3.0
    logits_LxV = logits_LxV.at[:, MASK:].add(100.0)
    return (lambda x_NxL, valid_NxL, t_N: jnp.broadcast_to(logits_LxV, x_NxL.shape + (VOCAB,))), logits_LxV


def run(model_fn, template, seed: int = 0, steps: int = 16, **kwargs) -> sampling.SampleResult:
    fn = jitted(model_fn, steps, tuple(sorted(kwargs.items())))
    return jax.device_get(fn(jax.random.key(seed), template))


@functools.lru_cache(maxsize=None)
def jitted(model_fn, steps: int, options: tuple):
    """One compiled sampler per (model, options): compilation dominates these tests."""
    return jax.jit(lambda rng, t: sampling.generate(model_fn, rng, t, mask_id=MASK, num_predictable=PREDICTABLE,
                                                    steps=steps, **dict(options)))


@pytest.mark.parametrize("kwargs", METHODS, ids=lambda k: "-".join(str(v) for v in k.values()))
def test_every_method_fills_masks_with_the_model_token_and_keeps_the_template(kwargs):
    calls = []
    template = make_prompt_template()
    result = run(one_hot_model(calls), template, steps=16, **kwargs)
    tokens = np.asarray(result.tokens_NxL)
    np.testing.assert_array_equal(tokens[:, :PROMPT], template[:, :PROMPT])
    assert (tokens[:, PROMPT:] == TOKEN).all()
    assert 1 <= int(result.nfe) <= 16
    assert int(result.nfe) == len(calls)  # nfe counts the calls that really ran


LENGTH = 16
TOKEN_B = 43
# Position i predicts TOKEN with probability P_A[i] and TOKEN_B otherwise, whatever the input.
P_A = np.linspace(0.2, 0.8, LENGTH)
# Confidence (the argmax's probability) by position, all distinct: the order a confidence
# sampler must commit them in is the descending one.
CONFIDENCE = np.random.default_rng(0).permutation(np.linspace(0.55, 0.95, LENGTH))


def two_token_model(p_a_L: np.ndarray, inputs: list | None = None):
    """Input-independent logits: mass p_a on TOKEN and 1 − p_a on TOKEN_B at each position."""
    logits_LxV = np.full((len(p_a_L), VOCAB), -np.inf, np.float32)
    logits_LxV[:, TOKEN], logits_LxV[:, TOKEN_B] = np.log(p_a_L), np.log1p(-p_a_L)

    def model_fn(x_NxL, valid_NxL, t_N):
        if inputs is not None:
            jax.debug.callback(lambda x: inputs.append(np.asarray(x)), x_NxL)
        return jnp.broadcast_to(jnp.asarray(logits_LxV), x_NxL.shape + (VOCAB,))

    return model_fn


ANCESTRAL_MODEL = two_token_model(P_A)


@pytest.mark.parametrize("kwargs, exact", [(dict(method="ancestral"), True),
                                           (dict(method="confidence", remasking="random"), True),
                                           (dict(method="confidence"), False)],
                         ids=["ancestral", "random_remask", "confidence"])
def test_sampled_tokens_follow_the_model_s_probabilities_where_the_sampler_is_exact(kwargs, exact):
    """With a context-free model, the exact samplers draw each position from its own
    distribution, whenever they reveal it; committing the most confident draws first is
    biased towards each position's likelier token."""
    rows = 2048
    tokens = np.asarray(run(ANCESTRAL_MODEL, np.full((rows, LENGTH), MASK, np.int32), steps=LENGTH,
                            **kwargs).tokens_NxL)
    assert np.isin(tokens, [TOKEN, TOKEN_B]).all()
    frequency = (tokens == TOKEN).mean(axis=0)
    standard_error = np.sqrt(P_A * (1 - P_A) / rows)
    likelier = np.maximum(P_A, 1 - P_A)
    likelier_frequency = np.where(P_A >= 0.5, frequency, 1 - frequency)
    if exact:
        assert (np.abs(frequency - P_A) < 4.5 * standard_error).all(), frequency - P_A
    else:  # mode-seeking: the likelier token is over-represented, far beyond the noise
        assert (likelier_frequency - likelier).mean() > 10 * standard_error.mean()


@pytest.mark.parametrize("filters", [dict(top_k=2), dict(top_p=0.6), dict(top_k=2, temperature=0.5)])
def test_top_k_and_top_p_inside_generate_renormalize_the_kept_tokens(filters):
    """Every position predicts TOKEN, TOKEN_B, TOKEN_C with 0.5, 0.3, 0.2: top-k 2 and top-p 0.6
    keep the first two, drawn 5 : 3 (at temperature 1; at 0.5, 25 : 9)."""
    probs = {TOKEN: 0.5, TOKEN_B: 0.3, TOKEN + 2: 0.2}
    logits_V = np.full(VOCAB, -np.inf, np.float32)
    for token, p in probs.items():
        logits_V[token] = np.log(p)
    model_fn = one_distribution_model(tuple(logits_V))
    rows = 512
    tokens = np.asarray(run(model_fn, np.full((rows, LENGTH), MASK, np.int32), steps=LENGTH, method="ancestral",
                            **filters).tokens_NxL)
    assert np.isin(tokens, [TOKEN, TOKEN_B]).all()  # the least likely token is never drawn
    temperature = filters.get("temperature", 1.0)
    odds = (0.5 / 0.3) ** (1 / temperature)
    expected = odds / (1 + odds)
    frequency = (tokens == TOKEN).mean()
    assert abs(frequency - expected) < 4 * np.sqrt(expected * (1 - expected) / tokens.size)


@functools.lru_cache(maxsize=None)
def one_distribution_model(logits_V: tuple):
    """The same logits at every position, whatever the input (cached: one compile per model)."""
    logits = jnp.asarray(np.array(logits_V, np.float32))
    return lambda x_NxL, valid_NxL, t_N: jnp.broadcast_to(logits, x_NxL.shape + (VOCAB,))


# A joint distribution over 3 positions of {TOKEN, TOKEN_B} with strong correlations: its
# marginals are all 1/2, but AAA and BBB carry 0.3 each.
JOINT_C = np.array([0.3, 0.05, 0.1, 0.05, 0.05, 0.1, 0.05, 0.3])
BITS_CxL = np.array([[(c >> (2 - j)) & 1 for j in range(3)] for c in range(8)])  # 1 = TOKEN_B


def exact_conditional_model():
    """The toy denoiser whose answer is known: at every position, the exact conditional under
    JOINT_C given the tokens revealed so far. Any exact sampler then draws from JOINT_C."""
    joint, bits = jnp.asarray(JOINT_C, jnp.float32), jnp.asarray(BITS_CxL)

    def model_fn(x_NxL, valid_NxL, t_N):
        revealed_NxL, is_b_NxL = x_NxL != MASK, (x_NxL == TOKEN_B).astype(jnp.int32)
        consistent_NxC = jnp.all(~revealed_NxL[:, None, :] | (bits[None] == is_b_NxL[:, None, :]), axis=-1)
        weight_NxC = consistent_NxC * joint
        p_b_NxL = weight_NxC @ bits.astype(jnp.float32) / weight_NxC.sum(-1, keepdims=True)
        logits = jnp.full(x_NxL.shape + (VOCAB,), -jnp.inf)
        return logits.at[..., TOKEN].set(jnp.log1p(-p_b_NxL)).at[..., TOKEN_B].set(jnp.log(p_b_NxL))

    return model_fn


EXACT_MODEL = exact_conditional_model()


def outcome_frequencies(tokens_NxL: np.ndarray) -> np.ndarray:
    codes = ((tokens_NxL == TOKEN_B).astype(int) * np.array([4, 2, 1])).sum(-1)
    return np.bincount(codes, minlength=8) / len(tokens_NxL)


@pytest.mark.parametrize("kwargs", [dict(method="first_hitting"), dict(method="ancestral", steps=256),
                                    dict(method="first_hitting", sampling_dtype="float64")],
                         ids=["first_hitting", "ancestral-256-steps", "first_hitting-float64"])
def test_exact_samplers_draw_the_joint_distribution_of_a_known_denoiser(kwargs):
    rows = 4096
    with jax.enable_x64(kwargs.get("sampling_dtype") == "float64"):
        result = run(EXACT_MODEL, np.full((rows, 3), MASK, np.int32), **{"steps": 3, **kwargs})
    frequency = outcome_frequencies(np.asarray(result.tokens_NxL))
    standard_error = np.sqrt(JOINT_C * (1 - JOINT_C) / rows)
    assert (np.abs(frequency - JOINT_C) < 4.5 * standard_error).all(), frequency
    if kwargs["method"] == "first_hitting":
        assert int(result.nfe) == 3  # one call per mask, for 4096 rows


def test_the_known_denoiser_has_teeth():
    """One ancestral step reveals every position at once from its marginal (1/2): AAA gets 1/8."""
    frequency = outcome_frequencies(np.asarray(run(EXACT_MODEL, np.full((4096, 3), MASK, np.int32), steps=1,
                                                   method="ancestral").tokens_NxL))
    assert abs(frequency[0] - 0.125) < 0.03 and abs(frequency[0] - JOINT_C[0]) > 0.1


@pytest.mark.parametrize("batch", [1, 64])
def test_first_hitting_takes_one_call_per_mask_whatever_the_batch_and_steps(batch):
    calls = []
    template = make_prompt_template(batch=batch)
    num_masks = int((template[0] == MASK).sum())
    result = run(one_hot_model(calls), template, steps=1000, method="first_hitting")
    assert int(result.nfe) == len(calls) == num_masks
    tokens = np.asarray(result.tokens_NxL)
    np.testing.assert_array_equal(tokens[:, :PROMPT], template[:, :PROMPT])
    assert (tokens[:, PROMPT:] == TOKEN).all()


def test_first_hitting_reveals_blocks_left_to_right_one_mask_per_call():
    inputs = []
    run(one_hot_model(inputs=inputs), np.full((2, 16), MASK, np.int32), steps=4, method="first_hitting",
        block_length=4)
    assert len(inputs) == 16
    for k, x_NxL in enumerate(inputs):
        masked_per_block = (x_NxL == MASK).reshape(2, 4, 4).sum(axis=-1)
        np.testing.assert_array_equal(masked_per_block[0], masked_per_block[1])
        assert masked_per_block[0].tolist() == [max(0, min(4, 4 * (b + 1) - k)) for b in range(4)]


def test_float64_draws_need_64_bit_types_and_use_them():
    with pytest.raises(ConfigError, match="float64 sampling must be traced with 64-bit types on"):
        run(one_hot_model(), make_prompt_template(), method="ancestral", sampling_dtype="float64")
    with pytest.raises(ConfigError, match="unknown sampling dtype 'float16'"):
        run(one_hot_model(), make_prompt_template(), method="ancestral", sampling_dtype="float16")
    seen = []
    real = jax.random.categorical

    def recording(key, logits, axis=-1):
        seen.append(logits.dtype)
        return real(key, logits, axis=axis)

    with jax.enable_x64(True), pytest.MonkeyPatch.context() as patch:
        patch.setattr(sampling.jax.random, "categorical", recording)
        sampling.generate(one_hot_model(), jax.random.key(0), make_prompt_template(), mask_id=MASK,
                          num_predictable=PREDICTABLE, steps=4, method="first_hitting", sampling_dtype="float64")
    assert seen and all(dtype == jnp.float64 for dtype in seen)


def test_first_hitting_refuses_a_time_conditioned_denoiser():
    with pytest.raises(ConfigError, match="first_hitting needs a denoiser that does not read t"):
        run(one_hot_model(), make_prompt_template(), method="first_hitting", time_conditioned=True)


def revealed_order(inputs: list[np.ndarray]) -> np.ndarray:
    """For each row, the position revealed at each step, from the inputs of successive calls
    (the last reveal is the one position still masked at the last call)."""
    masked = np.stack([x == MASK for x in inputs])  # [calls, N, L]
    order = [np.argmax(masked[k] & ~masked[k + 1], axis=-1) for k in range(len(inputs) - 1)]
    return np.stack(order + [np.argmax(masked[-1], axis=-1)], axis=1)


def test_confidence_commits_in_descending_confidence_random_remasking_and_first_hitting_in_any_order():
    p_a = CONFIDENCE  # TOKEN is each position's argmax, with that probability
    inputs = []
    run(two_token_model(p_a, inputs), np.full((2, LENGTH), MASK, np.int32), steps=LENGTH, method="confidence",
        temperature=0.0)
    assert len(inputs) == LENGTH  # one commit per step
    np.testing.assert_array_equal(revealed_order(inputs), np.tile(np.argsort(-p_a), (2, 1)))

    for sampler in (dict(method="confidence", remasking="random"), dict(method="first_hitting")):
        inputs, rows = [], 1024
        run(two_token_model(p_a, inputs), np.full((rows, LENGTH), MASK, np.int32), steps=LENGTH,
            temperature=0.0, **sampler)
        first = revealed_order(inputs)[:, 0]
        frequency = np.bincount(first, minlength=LENGTH) / rows  # uniform over the 16 positions
        assert (np.abs(frequency - 1 / LENGTH) < 4.5 * np.sqrt((1 / LENGTH) * (1 - 1 / LENGTH) / rows)).all(), sampler


def test_infilling_template_keeps_known_spans():
    template = np.full((2, 16), MASK, np.int32)
    template[:, ::3] = 9  # known tokens scattered between masks
    tokens = np.asarray(run(one_hot_model(), template, method="confidence").tokens_NxL)
    np.testing.assert_array_equal(tokens, np.where(template == MASK, TOKEN, 9))


def test_ancestral_cache_calls_the_model_once_per_revealing_step():
    # With far more steps than masks, most steps reveal nothing. The model is called at
    # step 0 and after each step that revealed something, except after the last reveal
    # (no mask is left to predict): nfe = number of revealing steps <= number of masks.
    calls = []
    template = make_prompt_template()
    num_masks = int((template == MASK).sum())
    result = run(one_hot_model(calls), template, steps=1000, method="ancestral")
    assert 1 <= int(result.nfe) <= num_masks
    assert int(result.nfe) == len(calls)
    # A time-conditioned model cannot reuse logits: every step with masks left is a call.
    calls.clear()
    all_masked = np.full((2, 16), MASK, np.int32)
    result = run(one_hot_model(calls), all_masked, steps=4, method="ancestral", time_conditioned=True)
    assert int(result.nfe) == len(calls) == 4


def test_confidence_reveals_at_every_step_when_steps_do_not_exceed_masks():
    result = run(one_hot_model(), make_prompt_template(), steps=8, method="confidence")
    assert int(result.nfe) == 8


def test_blocks_are_generated_left_to_right():
    inputs = []
    run(one_hot_model(inputs=inputs), np.full((2, 16), MASK, np.int32), steps=16, method="confidence",
        block_length=4)
    assert len(inputs) == 16
    for x_NxL in inputs:
        masked_per_block = (x_NxL[0] == MASK).reshape(4, 4).sum(axis=1)
        current = int(np.argmax(masked_per_block > 0))
        assert (masked_per_block[:current] == 0).all()  # earlier blocks are done
        assert (masked_per_block[current + 1:] == 4).all()  # later blocks are untouched


def test_num_to_commit_matches_llada_split_and_reveal_probability_is_exact():
    remaining, counts = np.array([10]), []
    for k in range(4):
        p = sampling.reveal_probability(Schedule("linear"), 1.0 - k / 4, 1.0 - (k + 1) / 4)
        np.testing.assert_allclose(p, 1.0 / (4 - k), rtol=1e-6)
        n = int(sampling.num_to_commit(remaining, p)[0])
        counts.append(n)
        remaining = remaining - n
    assert counts == [3, 3, 2, 2]


@pytest.mark.parametrize("schedule", ["linear", "cosine", "polynomial", "loglinear"])
def test_confidence_commits_add_up_to_all_masks_for_every_schedule(schedule):
    steps, remaining, counts = 7, np.array([0, 1, 5, 100]), []
    start = remaining.copy()
    for k in range(steps):
        t, s = 1.0 - k / steps, 1.0 - (k + 1) / steps
        p = 1.0 if k == steps - 1 else sampling.reveal_probability(Schedule(schedule), t, s)
        n = np.asarray(sampling.num_to_commit(remaining, p))
        assert (n >= 0).all() and (n <= remaining).all()
        counts.append(n)
        remaining = remaining - n
    np.testing.assert_array_equal(np.sum(counts, axis=0), start)


def test_top_k_one_and_temperature_zero_equal_argmax():
    logits = jax.random.normal(jax.random.key(1), (3, 5, 50))
    argmax = np.asarray(jnp.argmax(logits, -1))
    for seed in range(3):
        top1 = sampling.sample_tokens(jax.random.key(seed), logits, top_k=1)
        np.testing.assert_array_equal(top1, argmax)
    np.testing.assert_array_equal(sampling.sample_tokens(jax.random.key(0), logits, temperature=0.0), argmax)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([0.05, 0.5, 0.15, 0.3])  # sorted: 0.5, 0.3, 0.15, 0.05
    logits = jnp.log(jnp.asarray(probs))[None, None]
    expected_kept = {0.4: {1}, 0.7: {1, 3}, 0.9: {1, 3, 2}, 0.97: {0, 1, 2, 3}, 1.0: {0, 1, 2, 3}}
    for p, kept in expected_kept.items():
        filtered = np.asarray(sampling.filter_logits(logits, top_p=p))[0, 0]
        assert set(np.flatnonzero(np.isfinite(filtered))) == kept, p
        np.testing.assert_allclose(filtered[list(kept)], np.log(probs[list(kept)]), rtol=1e-6)
    # top-p applies to the distribution left by top-k: of the renormalized pair {0.5, 0.3},
    # 0.625 already reaches p = 0.6, while without top-k 0.5 does not.
    filtered = np.asarray(sampling.filter_logits(logits, top_k=2, top_p=0.6))[0, 0]
    assert set(np.flatnonzero(np.isfinite(filtered))) == {1}
    filtered = np.asarray(sampling.filter_logits(logits, top_p=0.6))[0, 0]
    assert set(np.flatnonzero(np.isfinite(filtered))) == {1, 3}


def test_temperature_zero_generate_is_argmax_over_predictable_ids():
    model_fn, logits_LxV = fixed_random_model()
    template = make_prompt_template()
    for kwargs in METHODS[:2]:
        tokens = np.asarray(run(model_fn, template, temperature=0.0, **kwargs).tokens_NxL)
        expected = np.asarray(jnp.argmax(logits_LxV[:, :PREDICTABLE], -1))
        np.testing.assert_array_equal(tokens[:, PROMPT:], np.broadcast_to(expected[PROMPT:], (2, 16 - PROMPT)))


@pytest.mark.parametrize("kwargs", METHODS[:3], ids=lambda k: "-".join(str(v) for v in k.values()))
def test_no_mask_or_pad_even_when_the_model_prefers_them(kwargs):
    model_fn, _ = fixed_random_model()
    tokens = np.asarray(run(model_fn, make_prompt_template(), top_p=0.9, **kwargs).tokens_NxL)
    assert tokens.max() < PREDICTABLE and tokens.min() >= 0


def test_same_rng_same_samples_and_different_rng_different_samples():
    model_fn, _ = fixed_random_model()
    template = make_prompt_template(batch=4, prompt=0)
    a, b = (np.asarray(run(model_fn, template, seed=3).tokens_NxL) for _ in range(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, np.asarray(run(model_fn, template, seed=4).tokens_NxL))


def test_invalid_options_raise_config_error():
    with pytest.raises(ConfigError, match="unknown sampling method"):
        run(one_hot_model(), make_prompt_template(), method="greedy")
    with pytest.raises(ConfigError, match="fewer than the 4 blocks"):
        run(one_hot_model(), make_prompt_template(), steps=3, block_length=4)
    with pytest.raises(ConfigError, match="top_p"):
        run(one_hot_model(), make_prompt_template(), top_p=0.0)
    with pytest.raises(ConfigError, match="longer than the sample length"):
        make_template(np.arange(5), 4, 2, MASK)


def test_real_tiny_denoiser_runs_jitted():
    from flax import nnx

    graphdef, params = model_parts()

    @jax.jit
    def sample(params, rng, template):
        return sampling.generate(nnx.merge(graphdef, params), rng, template, mask_id=MASK,
                                 num_predictable=MODEL.num_predictable, steps=8, method="confidence",
                                 top_k=20, block_length=8)

    template = make_prompt_template(batch=2, length=16)
    result = jax.device_get(sample(params, jax.random.key(0), template))
    tokens = np.asarray(result.tokens_NxL)
    assert tokens.shape == (2, 16)
    np.testing.assert_array_equal(tokens[:, :PROMPT], template[:, :PROMPT])
    assert tokens.max() < MODEL.num_predictable
    assert 1 <= int(result.nfe) <= 8


# --- The CLI, end to end on a real tiny run. ---

def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> pathlib.Path:
    workdir = tmp_path_factory.mktemp("sample") / "run"
    result = run_module("tdlm_jax.main", f"--config={TINY}", f"--workdir={workdir}",
                        "--config.training.num_steps=2",
                        # A checkpoint is all the sampler needs: skip the periodic extras.
                        "--config.training.checkpoint_every_n_steps=2", "--config.training.eval_every_n_steps=100",
                        "--config.training.detailed_metrics_steps=100",
                        "--config.training.attention_analysis_steps=100")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_cli_prints_every_sample_starting_with_the_prompt(tiny_run):
    result = run_module("tdlm_jax.sample", f"--workdir={tiny_run}", "--num_samples=3", "--steps=8",
                        "--sampler=random_remask", "--prompt=ROMEO:", "--block_length=16", "--top_p=0.9")
    assert result.returncode == 0, result.stderr[-3000:]
    parts = re.split(rf"^{SEPARATOR} sample \d+/3 {SEPARATOR}\n", result.stdout, flags=re.M)
    samples = parts[1:]
    assert len(samples) == 3
    assert all(s.startswith("ROMEO:") for s in samples)
    nfe = int(re.search(r"^nfe: (\d+)$", result.stdout, flags=re.M).group(1))
    assert 1 <= nfe <= 8


@pytest.mark.parametrize("args, message", [
    (["--sampler=beam"], "unknown sampler 'beam'"),
    (["--prompt=" + "x" * 40], "longer than the sample length 32"),
])
def test_cli_errors_are_one_line(tiny_run, args, message):
    result = run_module("tdlm_jax.sample", f"--workdir={tiny_run}", *args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_missing_workdir_is_one_line(tmp_path):
    result = run_module("tdlm_jax.sample", f"--workdir={tmp_path / 'nothing'}")
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr
