"""Gradient accumulation, rematerialization, bf16 compute, the parameter EMA and a padded
vocabulary: each must leave the math unchanged (or change it exactly as documented)."""

import dataclasses
import functools
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tdlm_jax.errors import ConfigError
from tdlm_jax.inference.trained import load_trained
from tdlm_jax.metrics import jsonl
from tdlm_jax.model.transformer import Denoiser
from tdlm_jax.parallel import sharding
from tdlm_jax.training import loop, setup
from tdlm_jax.training import config as config_lib
from tdlm_jax.training import step as step_lib
from common import MODEL, model_parts, make_process, optimizer_and_schedule, random_batch

from test_train import TINY


@functools.lru_cache(maxsize=None)
def step_fn(num_devices: int, grad_accum_steps: int, objective: str = "diffusion", ema_decay: float = 0.0,
            plan_for: tuple[int, int] = (1, 1), accum_unroll: int = 1):
    """The jitted step; its stratified layout is aligned to `plan_for` = (microbatches, shards)."""
    mesh = sharding.make_mesh(jax.devices()[:num_devices])
    optimizer, schedule = optimizer_and_schedule()
    process = dataclasses.replace(make_process(), microbatches=plan_for[0], shards=plan_for[1])
    return mesh, step_lib.jit_train_step(mesh, graphdef=model_parts()[0], process=process,
                                         optimizer=optimizer, lr_schedule=schedule, objective=objective,
                                         grad_accum_steps=grad_accum_steps, ema_decay=ema_decay,
                                         accum_unroll=accum_unroll)


def fresh(mesh, ema: bool = False):
    optimizer, _ = optimizer_and_schedule()
    params = jax.tree.map(lambda x: x.copy(), model_parts()[1])
    return sharding.replicate(step_lib.init_state(params, optimizer, seed=0, ema=ema), mesh)


def run_steps(num_devices, grad_accum_steps, detailed, objective="diffusion", steps=2, plan_for=(1, 1),
              accum_unroll=1):
    mesh, fn = step_fn(num_devices, grad_accum_steps, objective, plan_for=plan_for, accum_unroll=accum_unroll)
    state, history = fresh(mesh), []
    for i in range(steps):
        data = sharding.global_batch(random_batch(seed=i), mesh)
        state, metrics = fn(state, data["tokens"], data["valid"], detailed=detailed)
        history.append(jax.device_get(metrics))
    return jax.device_get(state.params), history


# Parameters after Adam steps agree to a hundredth of the learning rate (common.py: 1e-3), not to
# float rounding: Adam divides each update by √v, so where an element's moments nearly cancel, the
# gradient's rounding (its summation order, which XLA versions change) moves that update by up to
# a few thousandths of the rate (4.9e-6 in one of 2048 elements under jax 0.12.0.1). A wrong
# gradient moves updates by the whole rate; the metrics, gradient norms included, stay at rtol.
PARAM_ATOL = 1e-5


def assert_same_run(a, b, rtol=2e-5, atol=2e-6):
    params_a, history_a = a
    params_b, history_b = b
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=PARAM_ATOL), params_a, params_b)
    for row_a, row_b in zip(history_a, history_b):
        assert row_a.keys() == row_b.keys()
        for key in row_a:
            np.testing.assert_allclose(row_a[key], row_b[key], rtol=rtol, atol=atol, err_msg=key)


def test_microbatches_take_strided_rows_and_unsplit_restores_the_order():
    rows = {"x": jnp.arange(12).reshape(6, 2)}
    split = step_lib.microbatches(rows, 3)
    np.testing.assert_array_equal(split["x"][1], np.asarray(rows["x"])[1::3])
    np.testing.assert_array_equal(step_lib.unsplit_rows(split)["x"], rows["x"])


@pytest.mark.parametrize("detailed", [False, True])
def test_accumulated_update_equals_one_big_batch(detailed):
    """2 microbatches on 4 devices: same parameters, loss and tier-1/tier-2 metrics after 2 steps."""
    one = run_steps(4, 1, detailed)
    accumulated = run_steps(4, 2, detailed)
    assert_same_run(one, accumulated)
    if detailed:  # per-bucket gradients are real, distinct gradients under accumulation too
        norms = [accumulated[1][-1][f"research/gradient_norm_{b}_corruption"] for b in ("low", "medium", "high")]
        assert len(set(np.round(norms, 6))) == 3 and min(norms) > 0


def test_aligned_accumulation_takes_per_microbatch_bucket_gradients_equal_to_one_big_batch():
    """The layout aligned to 2 microbatches (8 rows: 4 slots of 2, shared 1, 2, 1): the
    accumulated detailed step takes a `jax.grad` per bucket in each microbatch, and its update
    and every metric (per-bucket gradient norms included) equal the one-big-batch step's on
    the same noise, whose layout is not aligned to one microbatch (the per-row path)."""
    process = dataclasses.replace(make_process(), microbatches=2)
    assert process.aligned_buckets(2) and not process.aligned_buckets(1)
    one = run_steps(1, 1, True, plan_for=(2, 1))
    accumulated = run_steps(1, 2, True, plan_for=(2, 1))
    assert_same_run(one, accumulated)
    norms = [accumulated[1][-1][f"research/gradient_norm_{b}_corruption"] for b in ("low", "medium", "high")]
    assert len(set(np.round(norms, 6))) == 3 and min(norms) > 0


def test_layout_aligned_to_two_shards_gives_the_same_step_on_one_device_and_two():
    """Each device's 4 rows hold the buckets 0, 1, 1, 2: the per-bucket passes slice every
    device's own rows, and the step equals the same computation on one device."""
    assert dataclasses.replace(make_process(), shards=2).aligned_buckets(1)
    assert_same_run(run_steps(1, 1, True, plan_for=(1, 2)), run_steps(2, 1, True, plan_for=(1, 2)))


def test_accumulation_over_four_microbatches_of_two_rows():
    assert_same_run(run_steps(1, 1, False), run_steps(1, 4, False))


def test_accumulate_gradients_sums_every_microbatch_in_order_whatever_the_unroll():
    """Known values: microbatch j of 6 rows in 3 holds rows j, j + 3; its "gradient" is its rows'
    sum times the parameter, so the total is Σ rows · p however many microbatches an iteration
    takes (at 2 per iteration the third is a remainder, and it must run too)."""
    rows = {"x": jnp.arange(6.0)}
    grad_fn = lambda p, micro: (p * micro["x"].sum(), {"r": micro["x"] * 10})
    for unroll in (1, 2, 3):
        total, stats = step_lib.accumulate_gradients(grad_fn, jnp.float32(2.0), rows, 3, unroll)
        assert float(total) == 2.0 * 15.0
        np.testing.assert_array_equal(stats["r"], np.arange(6.0) * 10)  # back in row order


@pytest.mark.parametrize("detailed", [False, True], ids=["ordinary", "tier 2"])
def test_unrolled_accumulation_gives_the_same_run(detailed):
    """Four microbatches three per iteration of the loop (training.grad_accum_unroll=3, a
    remainder of one) against one per iteration: the same update and metrics, and the step's
    accumulation loop does take three per iteration (else the two runs would be one program)."""
    optimizer, schedule = optimizer_and_schedule()
    data = random_batch(seed=0)
    step = functools.partial(step_lib.train_step, graphdef=model_parts()[0], process=make_process(),
                             optimizer=optimizer, lr_schedule=schedule, detailed=detailed, grad_accum_steps=4,
                             accum_unroll=3)
    state = step_lib.init_state(model_parts()[1], optimizer, seed=0)
    assert "unroll=3" in str(jax.make_jaxpr(step)(state, data["tokens"], data["valid"]))
    assert_same_run(run_steps(1, 4, detailed), run_steps(1, 4, detailed, accum_unroll=3))


def test_autoregressive_accumulation_equals_one_big_batch():
    assert_same_run(run_steps(4, 1, False, objective="ar", steps=1), run_steps(4, 2, False, objective="ar", steps=1))


def test_batch_that_does_not_split_into_microbatches_is_a_config_error():
    config = runpy.run_path(TINY)["get_config"]()
    config.training.grad_accum_steps = 3
    with pytest.raises(ConfigError, match="grad_accum_steps"):
        config_lib.validate(config, num_devices=1)


def test_ema_follows_its_recurrence_and_skips_non_finite_steps():
    decay = 0.5
    mesh, fn = step_fn(1, 1, ema_decay=decay)
    state = fresh(mesh, ema=True)
    ema = jax.device_get(state.params)
    for seed in range(2):
        data = sharding.global_batch(random_batch(seed=seed), mesh)
        state, _ = fn(state, data["tokens"], data["valid"], detailed=False)
        ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, jax.device_get(state.params))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), ema,
                 jax.device_get(state.ema_params))
    assert state.eval_params() is state.ema_params
    bad = random_batch(seed=5)
    bad["tokens"][0, 0] = 10_000  # out of the vocabulary: embeds as NaN, a non-finite loss
    data = sharding.global_batch(bad, mesh)
    before = jax.device_get(state.ema_params)
    state, metrics = fn(state, data["tokens"], data["valid"], detailed=False)
    assert int(state.skipped_steps) == 1
    jax.tree.map(np.testing.assert_array_equal, before, jax.device_get(state.ema_params))


def test_training_with_ema_evaluates_and_restores_the_ema(tmp_path):
    config = runpy.run_path(TINY)["get_config"]()
    config.training.num_steps = 4
    config.training.ema_decay = 0.9
    config.sampling.num_samples_at_eval = 0
    loop.train(config, str(tmp_path))
    run = setup.build_run(config, str(tmp_path))  # the checkpoint of step 4, raw and EMA parameters
    try:
        state = run.initial_state
        ema, raw = jax.device_get(state.ema_params), jax.device_get(state.params)
        # Sampling and evaluation commands load the EMA itself, not the raw parameters.
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(load_trained(str(tmp_path)).params), ema)
        assert any(jax.tree.leaves(jax.tree.map(lambda a, b: not np.allclose(a, b), ema, raw)))
        # The run's val/* at step 4 were computed on the EMA.
        on_ema, on_raw = (loop.evaluate(run.eval_fn, p, run.data.eval_batches, run.eval_rng)["val/loss"]
                          for p in (state.ema_params, state.params))
    finally:
        run.close()
    logged = [r["val/loss"] for r in jsonl.read(tmp_path / "metrics.jsonl") if r["step"] == 4 and "val/loss" in r]
    assert logged == [pytest.approx(on_ema, rel=1e-6)] and abs(on_ema - on_raw) > 1e-4


def tiny_model(**overrides):
    cfg = MODEL.__class__(**{**MODEL.__dict__, **overrides})
    return nnx.split(Denoiser(cfg, nnx.Rngs(0)))


def loss_and_grads(graphdef, params, dtype_of_logits=None):
    data = random_batch(seed=3)
    tokens, valid = jnp.asarray(data["tokens"]), jnp.asarray(data["valid"])

    def loss(p):
        logits = nnx.merge(graphdef, p)(tokens, valid)
        if dtype_of_logits is not None:
            assert logits.dtype == dtype_of_logits
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(log_probs, jnp.where(valid, tokens, 0)[..., None], axis=-1)[..., 0]
        return -jnp.where(valid, picked, 0.0).sum() / valid.sum()

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("policy", ["nothing_saveable", "dots_saveable"])
def test_remat_changes_memory_not_math(policy):
    graphdef, params = tiny_model()
    remat_graphdef, _ = tiny_model(remat=True, remat_policy=policy)
    loss, grads = loss_and_grads(graphdef, params)
    remat_loss, remat_grads = loss_and_grads(remat_graphdef, params)
    assert float(remat_loss) == pytest.approx(float(loss), rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, remat_grads)


def test_bf16_compute_keeps_float32_params_logits_and_loss():
    graphdef, params = tiny_model()
    bf16_graphdef, bf16_params = tiny_model(dtype="bfloat16")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bf16_params))  # master weights
    loss, _ = loss_and_grads(graphdef, params)
    bf16_loss, bf16_grads = loss_and_grads(bf16_graphdef, params, dtype_of_logits=jnp.float32)
    assert bf16_loss.dtype == jnp.float32
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(bf16_grads))
    # bf16 has 8 mantissa bits (rounding 2^-9 relative): the loss moves by rounding (measured
    # 1e-4 relative), not by a softmax or a loss in bf16.
    assert float(bf16_loss) == pytest.approx(float(loss), rel=2e-3)
    _, grads = loss_and_grads(graphdef, params)
    error = optax.tree.norm(jax.tree.map(lambda a, b: a - b, bf16_grads, grads)) / optax.tree.norm(grads)
    assert 1e-4 < float(error) < 0.03  # measured 0.0075: bf16 is really used, and only rounds


def test_the_embedding_gradient_is_summed_in_float32_under_bf16_compute():
    """8192 occurrences of one id (a batch's [MASK]s): its table row's gradient is the float32
    sum of their bf16 cotangents. Summed in bf16 (the table cast before the gather, as
    nnx.Embed does) it would be off by ~1e-2 relative."""
    graphdef, params = tiny_model(dtype="bfloat16")
    ids = jnp.full((8, 1024), 7, jnp.int32)
    cotangent = jax.random.uniform(jax.random.key(0), (8, 1024, MODEL.d_model), minval=0.5, maxval=1.5)

    def loss(p):
        embedded = nnx.merge(graphdef, p).embed_tokens(ids)
        assert embedded.dtype == jnp.bfloat16
        return (embedded * cotangent.astype(jnp.bfloat16)).astype(jnp.float32).sum()

    grad = jax.grad(loss)(params)["embed"]["embedding"][...]
    assert grad.dtype == jnp.float32
    expected = np.asarray(cotangent.astype(jnp.bfloat16), np.float64).sum(axis=(0, 1))
    np.testing.assert_allclose(np.asarray(grad[7]), expected, rtol=1e-5)
    assert float(jnp.abs(grad[8]).max()) == 0.0


def test_padded_vocabulary_never_predicts_the_padding_ids():
    config = runpy.run_path(TINY)["get_config"]()
    config.model.vocab_size = 264
    model_cfg = config_lib.model_config(config, vocab_size=259, num_predictable=257)
    assert model_cfg.vocab_size == 264
    graphdef, params = nnx.split(Denoiser(model_cfg, nnx.Rngs(0)))
    logits = nnx.merge(graphdef, params)(jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool))
    assert logits.shape[-1] == 264
    assert bool(jnp.all(jnp.isneginf(logits[..., 257:]))) and bool(jnp.all(jnp.isfinite(logits[..., :257])))
    config.model.vocab_size = 100
    with pytest.raises(ConfigError, match="model.vocab_size=100 is smaller than the 259 ids"):
        config_lib.model_config(config, vocab_size=259, num_predictable=257)
