"""The forward process and the NELBO, against values the math fixes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdlm_jax.diffusion.corruption import Corrupted, ForwardProcess, corrupt, plan_buckets
from tdlm_jax.diffusion.loss import num_valid_tokens, weighted_token_losses
from tdlm_jax.diffusion.schedules import LOGLINEAR_EPS, SCHEDULES, Schedule
from tdlm_jax.metrics.tier1 import correct_rows, tier1_metrics
from common import scored

EDGES = (0.0, 0.3, 0.7, 1.0)
MASK_ID, PAD_ID, V = 256, 257, 256


def make_process(batch_size, schedule="linear", sampling="stratified", weighting="elbo", t_min=1e-3):
    return ForwardProcess(Schedule(schedule, 2.0), t_min, sampling, weighting, 10.0, MASK_ID, EDGES, batch_size)


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_endpoints_and_monotonicity(name):
    s = Schedule(name)
    t = jnp.linspace(0.0, 1.0, 101)
    alpha = s.alpha(t)
    assert float(alpha[0]) == pytest.approx(1.0)
    expected_end = LOGLINEAR_EPS if name == "loglinear" else 0.0
    assert float(alpha[-1]) == pytest.approx(expected_end, abs=1e-6)
    assert bool(jnp.all(jnp.diff(alpha) < 0))


@pytest.mark.parametrize("name", SCHEDULES)
def test_elbo_weight_is_minus_dalpha_over_one_minus_alpha(name):
    s = Schedule(name)
    t = jnp.linspace(0.05, 0.95, 19)
    dalpha = jax.vmap(jax.grad(lambda x: s.alpha(x)))(t)  # autodiff checks the closed form
    np.testing.assert_allclose(s.dalpha(t), dalpha, rtol=1e-5)
    np.testing.assert_allclose(s.elbo_weight(t), -dalpha / (1 - s.alpha(t)), rtol=1e-5)


def test_linear_schedule_weight_is_one_over_t():
    t = jnp.array([0.01, 0.1, 0.5, 1.0])
    np.testing.assert_allclose(Schedule("linear").elbo_weight(t), 1.0 / t, rtol=1e-6)


@pytest.mark.parametrize("name", SCHEDULES)
def test_time_at_mask_rate_inverts_the_schedule(name):
    s = Schedule(name)
    for m in (0.1, 0.3, 0.7, 0.95):
        assert 1.0 - float(s.alpha(s.time_at_mask_rate(m))) == pytest.approx(m, abs=1e-6)


def test_bucket_plan_allocates_rows_in_proportion():
    plan = plan_buckets(Schedule("linear"), 1e-3, EDGES, 32)
    assert plan.counts == (9, 13, 10) and sum(plan.counts) == 32
    assert plan.slots == ((0, 9), (9, 22), (22, 32)) and (plan.slot_rows, plan.shards) == (1, 1)
    # p_b·B / n_b, with p_b the bucket's share of U[t_min, 1].
    probs = [(hi - lo) / (1 - 1e-3) for lo, hi in plan.t_bounds]
    np.testing.assert_allclose(plan.unbias, [p * 32 / n for p, n in zip(probs, plan.counts)])
    assert plan_buckets(Schedule("linear"), 1e-3, EDGES, 2).counts.count(0) == 1  # too few rows


def test_bucket_plan_aligned_to_microbatches_and_shards_gives_each_the_same_buckets():
    # base.py: 32 rows in 8 microbatches: 4 slots of 8 rows, shared 1, 2, 1 (p·4 = 1.2, 1.6, 1.2).
    plan = plan_buckets(Schedule("linear"), 1e-3, EDGES, 32, microbatches=8)
    assert plan.slots == ((0, 1), (1, 3), (3, 4)) and plan.counts == (8, 16, 8)
    bucket_B, _ = plan.row_strata()
    np.testing.assert_array_equal(bucket_B, np.repeat([0, 1, 1, 2], 8))
    # 2 microbatches over 4 shards: each shard's 8 rows are 4 slots of 2; every microbatch
    # (rows j, j + 2, ...) holds buckets 0, 1, 1, 2 on every shard.
    plan = plan_buckets(Schedule("linear"), 1e-3, EDGES, 32, microbatches=2, shards=4)
    bucket_B, stratum_B = plan.row_strata()
    np.testing.assert_array_equal(bucket_B, np.tile([0, 0, 1, 1, 1, 1, 2, 2], 4))
    for j in range(2):
        np.testing.assert_array_equal(bucket_B[j::2].reshape(4, 4), np.tile([0, 1, 1, 2], (4, 1)))
    for b, n in enumerate(plan.counts):  # strata 0..n_b − 1, each once
        np.testing.assert_array_equal(np.sort(stratum_B[bucket_B == b]), np.arange(n))
    probs = [(hi - lo) / (1 - 1e-3) for lo, hi in plan.t_bounds]
    np.testing.assert_allclose(plan.unbias, [p * 32 / n for p, n in zip(probs, plan.counts)])
    # Fewer slots than buckets (8 rows in 8 microbatches): allocated row by row, as unaligned.
    unaligned = plan_buckets(Schedule("linear"), 1e-3, EDGES, 8, microbatches=8)
    assert (unaligned.slot_rows, unaligned.shards, unaligned.counts) == (1, 1, (2, 3, 3))


@pytest.mark.parametrize("microbatches, shards", [(8, 1), (2, 4)])
def test_aligned_stratified_times_fall_in_their_bucket_and_strata_and_stay_unbiased(microbatches, shards):
    process = ForwardProcess(Schedule("linear"), 1e-3, "stratified", "elbo", 10.0, MASK_ID, EDGES, 32,
                             microbatches=microbatches, shards=shards)
    assert process.aligned_buckets(microbatches) and not process.aligned_buckets(1)
    bucket_B, stratum_B = process.plan.row_strata()
    t, unbias = (np.asarray(x) for x in process.sample_times(jax.random.key(0)))
    for b, ((lo, hi), n) in enumerate(zip(process.plan.t_bounds, process.plan.counts)):
        in_b = bucket_B == b
        np.testing.assert_array_equal(np.floor((t[in_b] - lo) / (hi - lo) * n), stratum_B[in_b])
    np.testing.assert_allclose(unbias, np.asarray(process.plan.unbias)[bucket_B])
    # The factors keep the estimate of E[f(t)] under U[t_min, 1] unbiased, for f(t) = t².
    def estimate(key):
        t_B, unbias_B = process.sample_times(key)
        return jnp.mean(unbias_B * t_B ** 2)

    samples = np.asarray(jax.vmap(estimate)(jax.random.split(jax.random.key(1), 4000)))
    exact = (1 - 1e-3 ** 3) / (3 * (1 - 1e-3))
    assert abs(samples.mean() - exact) < 4 * samples.std() / np.sqrt(len(samples)) + 1e-6


def test_stratified_times_fall_in_their_bucket_and_strata():
    process = make_process(32)
    t, unbias = process.sample_times(jax.random.key(0))
    for (start, stop), (lo, hi) in zip(process.plan.slots, process.plan.t_bounds):
        n = stop - start
        strata = np.floor((np.asarray(t[start:stop]) - lo) / (hi - lo) * n)
        np.testing.assert_array_equal(strata, np.arange(n))  # one draw in each stratum
    np.testing.assert_allclose(unbias, np.repeat(process.plan.unbias, process.plan.counts))


@pytest.mark.parametrize("sampling", ["stratified", "iid"])
def test_stratified_and_iid_time_estimators_are_unbiased(sampling):
    """E[unbias·f(t)] equals the mean of f over U[t_min, 1], for f(t) = t²."""
    process = make_process(16, sampling=sampling)
    keys = jax.random.split(jax.random.key(1), 4000)
    t, unbias = jax.vmap(process.sample_times)(keys)
    t_min = process.t_min
    exact = (1 - t_min**3) / 3 / (1 - t_min)
    estimate = float(jnp.mean(unbias * t**2))
    assert estimate == pytest.approx(exact, rel=0.01)


def test_per_sequence_mask_ratio_follows_one_minus_alpha():
    """Each row's masked fraction is Binomial(L, 1 − α(t))/L; check it within 5 sigma."""
    process = make_process(64, schedule="cosine")
    length = 4096
    tokens = jnp.zeros((64, length), jnp.int32)
    batch = corrupt(process, jax.random.key(2), tokens, jnp.ones_like(tokens, bool))
    rate = np.asarray(batch.mask_rate_B)
    np.testing.assert_allclose(rate, 1 - np.cos(np.pi / 2 * np.asarray(batch.t_B)), rtol=1e-5)
    observed = np.asarray(batch.masked_BxL.mean(axis=1))
    sigma = np.sqrt(rate * (1 - rate) / length)
    assert np.all(np.abs(observed - rate) <= 5 * sigma + 1e-6)
    assert np.all(np.asarray(batch.noisy_BxL)[np.asarray(batch.masked_BxL)] == MASK_ID)


def test_padding_is_never_masked_but_counts_in_valid_ratio():
    process = make_process(8)
    tokens = jnp.ones((8, 64), jnp.int32)
    valid = jnp.arange(64)[None, :] < 48  # the last quarter of every row is padding
    valid = jnp.broadcast_to(valid, tokens.shape)
    batch = corrupt(process, jax.random.key(3), jnp.where(valid, tokens, PAD_ID), valid)
    assert not bool(jnp.any(batch.masked_BxL & ~valid))
    logits = jnp.zeros((8, 64, V + 2))
    ratio = float(tier1_metrics(correct_rows(scored(logits, batch), batch), batch)["metrics/valid_ratio"])
    u = batch.unbias_B[:, None]  # each sequence weighted by its unbiasing factor
    assert ratio == pytest.approx(float((u * batch.masked_BxL).sum() / (u * batch.drawn_BxL).sum()))
    assert 0.6 < ratio < 0.9  # about 3/4 of the drawn masks land on real tokens


def uniform_logits(shape):
    """Uniform over the V predictable ids; [MASK] and [PAD] are never predicted."""
    return jnp.where(jnp.arange(V + 2) < V, 0.0, -jnp.inf) * jnp.ones(shape + (V + 2,))


@pytest.mark.parametrize("sampling", ["stratified", "iid"])
def test_uniform_predictor_nelbo_is_log_v(sampling):
    """With exact weights, the NELBO of a uniform predictor is log V (linear schedule)."""
    batch_size, length, draws = 32, 64, 300
    process = make_process(batch_size, sampling=sampling)
    tokens = jax.random.randint(jax.random.key(4), (batch_size, length), 0, V)
    valid = jnp.ones_like(tokens, bool)
    logits = uniform_logits((batch_size, length))

    def estimate(key):
        batch = corrupt(process, key, tokens, valid)
        return weighted_token_losses(scored(logits, batch).nll_BxL, batch).sum() / num_valid_tokens(batch)

    values = np.asarray(jax.jit(jax.vmap(estimate))(jax.random.split(jax.random.key(5), draws)))
    standard_error = values.std() / np.sqrt(draws)
    assert abs(values.mean() - math.log(V)) < 4 * standard_error
    assert standard_error < 0.05  # the check above has teeth


def test_golden_mask_accuracy_on_hand_built_batch():
    """2 rows × 4 positions; 4 masked valid tokens, of which the argmax gets 2 right."""
    tokens = jnp.array([[1, 2, 3, 4], [5, 6, 7, PAD_ID]])
    valid = jnp.array([[1, 1, 1, 1], [1, 1, 1, 0]], bool)
    drawn = jnp.array([[1, 1, 0, 0], [1, 0, 1, 1]], bool)  # the last draw lands on padding
    masked = drawn & valid
    predictions = jnp.array([[1, 9, 3, 4], [5, 6, 0, 0]])  # wrong at (0, 1) and (1, 2)
    logits = jax.nn.one_hot(predictions, V + 2) * 10.0
    batch = Corrupted(tokens_BxL=tokens, noisy_BxL=jnp.where(masked, MASK_ID, tokens), valid_BxL=valid,
                      masked_BxL=masked, drawn_BxL=drawn, t_B=jnp.array([0.5, 0.8]),
                      mask_rate_B=jnp.array([0.5, 0.8]), weight_B=jnp.array([2.0, 1.25]),
                      unbias_B=jnp.ones(2))
    metrics = tier1_metrics(correct_rows(scored(logits, batch), batch), batch)
    # masked valid: (0,0) ok, (0,1) wrong, (1,0) ok, (1,2) wrong -> 2/4
    assert float(metrics["metrics/mask_accuracy"]) == pytest.approx(2 / 4)
    assert float(metrics["metrics/total_masked_tokens"]) == 4
    assert float(metrics["metrics/valid_ratio"]) == pytest.approx(4 / 5)


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_a_uniform_predictor_scores_log_v_at_every_batch_size(batch_size):
    """With exact weights, a predictor uniform over V ids has NELBO E_t[w·(1 − α)]·log V = log V.
    B = 1 and 2 cannot give each of the 3 buckets a row; a bucket left unsampled would bias
    the estimate (0.4·log V at B = 1). The estimate over many batches must hit log V."""
    process = make_process(batch_size)
    log_v, length = np.log(256.0), 64
    tokens = jnp.zeros((batch_size, length), jnp.int32)

    def estimate(key):
        batch = corrupt(process, key, tokens, jnp.ones_like(tokens, bool))
        per_row = batch.weight_B * batch.unbias_B * batch.masked_BxL.sum(axis=1)
        return per_row.sum() / (batch_size * length) * log_v

    samples = np.asarray(jax.vmap(estimate)(jax.random.split(jax.random.key(3), 20000)))
    stderr = samples.std() / np.sqrt(len(samples))
    assert abs(samples.mean() - log_v) < 4 * stderr, (samples.mean(), stderr)
    assert process.static_buckets == (batch_size >= 3)
