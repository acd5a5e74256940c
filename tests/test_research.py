"""Tier-2 research metrics against brute-force and numpy recomputations."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tdlm_jax.diffusion.corruption import Corrupted, corrupt
from tdlm_jax.diffusion.loss import num_valid_tokens
from tdlm_jax.metrics import aggregation, research
from tdlm_jax.training.step import row_losses
from common import EDGES, make_process, model_parts, random_batch, scored

PAD_ID = 257


def test_bucket_index_at_the_edges():
    m = jnp.array([0.0, 0.2999, 0.3, 0.6999, 0.7, 0.99, 1.0])
    np.testing.assert_array_equal(research.bucket_index(m, EDGES), [0, 0, 1, 1, 2, 2, 2])
    custom = (0.0, 0.5, 0.9, 1.0)
    np.testing.assert_array_equal(research.bucket_index(jnp.array([0.49, 0.5, 0.9]), custom), [0, 1, 2])


def test_stratified_rows_lie_in_the_bucket_their_masking_rate_names():
    process = make_process(batch_size=32)
    batch = corrupt(process, jax.random.key(0), jnp.zeros((32, 4), jnp.int32), jnp.ones((32, 4), bool))
    np.testing.assert_array_equal(research.row_buckets(process, batch),
                                  research.bucket_index(batch.mask_rate_B, EDGES))


def hand_built_batch():
    """4 rows: low (m=0.2), medium (m=0.5), medium (m=0.6), high (m=0.9)."""
    tokens = jnp.array([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, PAD_ID, PAD_ID]])
    valid = tokens != PAD_ID
    masked = jnp.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 1], [1, 1, 0, 0]], bool)
    rate = jnp.array([0.2, 0.5, 0.6, 0.9])
    return Corrupted(tokens_BxL=tokens, noisy_BxL=jnp.where(masked, 256, tokens), valid_BxL=valid,
                     masked_BxL=masked, drawn_BxL=masked, t_B=rate, mask_rate_B=rate, weight_B=1.0 / rate,
                     unbias_B=jnp.ones(4))


def test_bucket_accuracy_and_count_on_a_hand_built_batch():
    batch = hand_built_batch()
    # Predictions: right at (0,0); (1,0) right, (1,1) wrong; (2,1),(2,2) right, (2,3) wrong;
    # (3,0) wrong, (3,1) wrong.
    predictions = jnp.array([[1, 0, 0, 0], [5, 0, 0, 0], [0, 10, 11, 0], [0, 0, 0, 0]])
    logits = jax.nn.one_hot(predictions, 258) * 5.0
    process = make_process(sampling="iid", batch_size=4)
    zero = {"w": jnp.zeros(3)}
    metrics = aggregation.to_host_scalars(
        research.research_metrics(research.row_statistics(scored(logits, batch), batch), batch, process,
                                  jnp.array([0.1, 0.2, 0.3, 0.4]), [zero] * 3))
    assert metrics["research/low_corruption_accuracy"] == pytest.approx(1.0)
    assert metrics["research/medium_corruption_accuracy"] == pytest.approx(3 / 5)
    assert metrics["research/high_corruption_accuracy"] == pytest.approx(0.0)
    assert [metrics[f"research/{b}_corruption_count"] for b in research.BUCKETS] == [1, 2, 1]
    # Each bucket's loss is the sum of its rows' contributions: 0.1 | 0.2 + 0.3 | 0.4.
    assert [metrics[f"research/{b}_corruption_loss"] for b in research.BUCKETS] == pytest.approx([0.1, 0.5, 0.4])
    assert metrics["research/gradient_norm_ratio_high_to_low"] is None  # 0/0: undefined, not 0


def test_empty_bucket_accuracy_is_missing_not_zero():
    batch = hand_built_batch()
    only_high = batch.replace(mask_rate_B=jnp.full(4, 0.9))
    logits = jnp.zeros((4, 4, 258))
    metrics = aggregation.to_host_scalars(research.research_metrics(
        research.row_statistics(scored(logits, only_high), only_high), only_high, make_process(sampling="iid", batch_size=4), jnp.zeros(4), [{"w": jnp.ones(2)}] * 3))
    assert metrics["research/low_corruption_accuracy"] is None
    assert metrics["research/medium_corruption_accuracy"] is None
    assert metrics["research/low_corruption_count"] == 0
    assert metrics["research/gradient_norm_ratio_high_to_low"] is None


def corrupted_batch(process, seed=0):
    data = random_batch(seed)
    return corrupt(process, jax.random.key(seed), jnp.asarray(data["tokens"]), jnp.asarray(data["valid"]))


def batch_with_every_bucket(process):
    """The first seed whose batch has sequences in all three buckets (iid may leave one empty)."""
    for seed in range(100):
        batch = corrupted_batch(process, seed)
        if len(set(np.asarray(research.bucket_index(batch.mask_rate_B, EDGES)).tolist())) == 3:
            return batch
    raise AssertionError("no seed gave all three buckets")


# Both are jitted, as in the train step: run op by op, the same gradients take 3-4× as long.
# (model_parts() is called outside the traces: its cached params must be concrete.)
def brute_force_bucket_grads(params, batch):
    """∇ of each bucket's loss, each by its own jax.grad over a bucket-masked full-batch loss."""
    graphdef = model_parts()[0]

    @jax.jit
    def grads(params, batch):
        num_valid = num_valid_tokens(batch)
        buckets = research.bucket_index(batch.mask_rate_B, EDGES)

        def bucket_loss(p, b):
            rows, _ = row_losses(graphdef, p, batch, num_valid)
            return jnp.where(buckets == b, rows, 0.0).sum()

        return [jax.grad(bucket_loss)(params, b) for b in range(3)]

    return grads(params, batch)


def project_grads(process, batch):
    graphdef, params = model_parts()

    @jax.jit
    def project(params, batch):
        row_loss_fn = functools.partial(row_losses, graphdef, num_valid=num_valid_tokens(batch))
        return research.bucket_gradients(row_loss_fn, params, batch, process, research.row_buckets(process, batch))

    return project(params, batch)


def assert_trees_close(a, b, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=atol)


@pytest.mark.parametrize("sampling", ["stratified", "iid"])
def test_bucket_gradients_equal_brute_force_and_sum_to_the_full_gradient(sampling):
    process = make_process(sampling)
    batch = batch_with_every_bucket(process)
    grads, halves_sq, rows, _ = project_grads(process, batch)
    params = model_parts()[1]
    for got, expected in zip(grads, brute_force_bucket_grads(params, batch)):
        assert_trees_close(got, expected)
        assert optax.tree.norm(expected) > 0
    graphdef = model_parts()[0]
    full = jax.grad(lambda p: row_losses(graphdef, p, batch, num_valid_tokens(batch))[0].sum())(params)
    assert_trees_close(jax.tree.map(lambda *g: sum(g), *grads), full)
    # The noise scale's small batches: the gradients of the even and of the odd rows.
    halves = [jax.grad(lambda p: jnp.where(jnp.arange(8) % 2 == h, row_losses(graphdef, p, batch, num_valid_tokens(
        batch))[0], 0.0).sum())(params) for h in (0, 1)]
    assert float(halves_sq) == pytest.approx(sum(float(optax.tree.norm(g)) ** 2 for g in halves), rel=1e-5)
    np.testing.assert_allclose(rows, row_losses(graphdef, params, batch, num_valid_tokens(batch))[0], rtol=1e-6)
    # The norms differ from a split of the total by counts: each is its own gradient.
    norms = np.array([float(optax.tree.norm(g)) for g in grads])
    counts = np.bincount(np.asarray(research.bucket_index(batch.mask_rate_B, EDGES)), minlength=3)
    assert not np.allclose(norms / norms.sum(), counts / counts.sum(), rtol=0.05)


@pytest.mark.parametrize("blocks", [2, 1], ids=["a row of each of 2 blocks", "one row, no vmap"])
def test_per_row_gradients_in_chunks_of_one_row_per_block_equal_one_chunk(blocks):
    """The data-membership path over 8 rows in one vmap, and in chunks of one row of each
    block (a per-row gradient budget of 1 byte): the same sums, halves and per-row values."""
    process = make_process("iid")
    batch = batch_with_every_bucket(process)
    graphdef, params = model_parts()
    row_loss_fn = functools.partial(row_losses, graphdef, num_valid=num_valid_tokens(batch))
    buckets = research.row_buckets(process, batch)
    whole = research.per_row_bucket_gradients(row_loss_fn, params, batch, buckets, halves=True)
    chunked = research.per_row_bucket_gradients(row_loss_fn, params, batch, buckets, halves=True, blocks=blocks,
                                                row_gradient_bytes=1)
    assert_trees_close(whole[0], chunked[0])
    assert float(whole[1]) == pytest.approx(float(chunked[1]), rel=1e-5)
    assert_trees_close(whole[2:], chunked[2:])


def test_a_chunk_takes_the_most_rows_of_each_block_that_divide_it_and_fit_the_budget():
    mb = 2**20
    assert research.rows_per_chunk(8, row_bytes=mb, budget=32 * mb) == 8
    assert research.rows_per_chunk(8, row_bytes=mb, budget=7 * mb) == 4  # 7 would not divide the block
    assert research.rows_per_chunk(32, row_bytes=650 * mb, budget=4 * 2**30) == 4  # GPT-2 small on an H200: not 6
    assert research.rows_per_chunk(8, row_bytes=mb, budget=1) == 1  # never none


def test_the_per_row_gradient_budget_is_the_configs_or_its_platforms():
    gpu = lambda stats: types.SimpleNamespace(platform="gpu", memory_stats=lambda: stats)
    cpu = jax.devices()[0]
    assert research.row_gradient_budget(100, cpu) == research.row_gradient_budget(100, gpu(None)) == 100 * 2**20
    assert research.row_gradient_budget(0, cpu) == 32 * 2**20
    assert research.row_gradient_budget(0, gpu({"bytes_limit": 140 * 2**30})) == 4 * 2**30  # an H200: the cap
    assert research.row_gradient_budget(0, gpu({"bytes_limit": 16 * 2**30})) == 2**30  # 1/16 of a 16 GiB GPU
    assert research.row_gradient_budget(0, gpu(None)) == 2**30  # no memory figure: 1 GiB


@pytest.mark.parametrize("sampling", ["stratified", "iid"])
def test_only_high_corruption_batch_has_zero_low_and_medium_gradients(sampling):
    process = make_process(sampling, t_min=0.75)  # every t > 0.75, so every m > 0.7
    batch = corrupted_batch(process, seed=1)
    assert bool(jnp.all(batch.mask_rate_B > 0.7))
    grads, _, rows, row_stats = project_grads(process, batch)
    metrics = aggregation.to_host_scalars(research.research_metrics(row_stats, batch, process, rows, grads))
    assert metrics["research/gradient_norm_low_corruption"] == 0.0
    assert metrics["research/gradient_norm_medium_corruption"] == 0.0
    assert metrics["research/gradient_norm_high_corruption"] == pytest.approx(
        metrics["research/gradient_norm_total"], rel=1e-6)
    assert metrics["research/gradient_norm_ratio_high_to_low"] is None
    assert metrics["research/high_corruption_count"] == 8


def test_row_constant_pearson_matches_numpy_on_random_data():
    rng = np.random.default_rng(0)
    x_B = rng.normal(size=6)
    y = 0.4 * x_B[:, None] + rng.normal(size=(6, 50))
    where = rng.random((6, 50)) < 0.6
    x_tokens = np.broadcast_to(x_B[:, None], y.shape)
    expected = np.corrcoef(x_tokens[where], y[where])[0, 1]
    row_mean = np.where(where, y, 0).sum(1) / where.sum(1)
    sums = [jnp.asarray(v, jnp.float32) for v in (where.sum(1), np.where(where, y, 0).sum(1),
                                                   np.where(where, (y - row_mean[:, None]) ** 2, 0).sum(1))]
    got = float(research.row_constant_pearson(jnp.asarray(x_B, jnp.float32), *sums))
    assert got == pytest.approx(expected, rel=1e-4)
    assert abs(expected) > 0.1  # the comparison is not of two zeros
    constant = research.row_constant_pearson(jnp.ones(6), *sums)
    assert bool(jnp.isnan(constant))  # undefined, reported as missing


def test_weight_difficulty_statistics_match_numpy():
    process = make_process()
    batch = corrupted_batch(process, seed=2)
    graphdef, params = model_parts()
    _, scores = row_losses(graphdef, params, batch, num_valid_tokens(batch))  # the step's chunked head
    got = research.weight_difficulty_metrics(research.row_statistics(scores, batch), batch)
    logits = nnx.merge(graphdef, params)(batch.noisy_BxL, batch.valid_BxL, batch.t_B)

    # Token statistics in float64, each token weighted by its sequence's unbiasing factor.
    masked = np.asarray(batch.masked_BxL)
    per_token = lambda x_B: np.broadcast_to(np.asarray(x_B, np.float64)[:, None], masked.shape)[masked]
    weight, design = per_token(batch.weight_B), per_token(batch.unbias_B)
    assert len(set(design.tolist())) > 1  # the buckets are not sampled in exact proportion: weighting matters
    probs = np.asarray(jax.nn.softmax(logits, axis=-1), np.float64)
    difficulty = (1.0 - probs.max(axis=-1))[masked]
    mean_weight = np.average(weight, weights=design)
    assert float(got["research/avg_loss_weight"]) == pytest.approx(mean_weight, rel=1e-5)
    assert mean_weight != pytest.approx(weight.mean(), rel=1e-3)  # the unweighted mean describes the design
    assert float(got["research/weight_std"]) == pytest.approx(
        np.sqrt(np.average((weight - mean_weight) ** 2, weights=design)), rel=1e-4)
    assert float(got["research/avg_prediction_difficulty"]) == pytest.approx(
        np.average(difficulty, weights=design), rel=1e-5)
    covariance = np.cov(weight, difficulty, aweights=design, ddof=0)
    assert float(got["research/weight_difficulty_correlation"]) == pytest.approx(
        covariance[0, 1] / np.sqrt(covariance[0, 0] * covariance[1, 1]), rel=1e-3, abs=1e-5)
