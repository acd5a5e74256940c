"""The jitted train step: device-count invariance and the detailed variant's update."""

import jax
import numpy as np
import pytest

from tdlm_jax.parallel import sharding
from tdlm_jax.training import step as step_lib
from common import BATCH, fresh_state, make_process, model_parts, random_batch, train_fn


def run_step(num_devices, detailed, sampling="stratified"):
    mesh, fn = train_fn(num_devices, sampling)
    batch = sharding.global_batch(random_batch(), mesh)
    state, metrics = fn(fresh_state(mesh), batch["tokens"], batch["valid"], detailed=detailed)
    return jax.device_get(state), jax.device_get(metrics)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize("detailed", [False, True])
def test_one_and_four_devices_give_the_same_loss_metrics_and_update(detailed):
    assert jax.device_count() == 4
    state_1, metrics_1 = run_step(1, detailed)
    state_4, metrics_4 = run_step(4, detailed)
    assert metrics_1.keys() == metrics_4.keys()
    for name in metrics_1:
        np.testing.assert_allclose(metrics_4[name], metrics_1[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert_trees_close(state_1.params, state_4.params)


def test_four_device_step_shards_the_batch_and_replicates_the_state():
    mesh, fn = train_fn(4)
    batch = sharding.global_batch(random_batch(), mesh)
    assert len(batch["tokens"].addressable_shards) == 4
    assert batch["tokens"].addressable_shards[0].data.shape == (2, random_batch()["tokens"].shape[1])
    state, _ = fn(fresh_state(mesh), batch["tokens"], batch["valid"], detailed=False)
    assert state.params["head"]["kernel"][...].sharding.is_fully_replicated


def test_jitted_steps_keep_their_names_for_compile_counts():
    """JAX reports compiles under the function's name; tdlm_jax.training.compilation counts 'train_step'."""
    mesh, fn = train_fn(1)
    assert fn.__name__ == "train_step"
    static = dict(graphdef=model_parts()[0], process=make_process())
    assert step_lib.jit_eval_step(mesh, **static).__name__ == "eval_step"
    assert step_lib.jit_analysis_step(mesh, **static, max_rows=8).__name__ == "analysis_step"


@pytest.mark.parametrize("sampling", ["stratified", "iid"])
def test_detailed_step_applies_the_same_update_as_the_ordinary_step(sampling):
    plain_state, plain = run_step(1, detailed=False, sampling=sampling)
    detailed_state, detailed = run_step(1, detailed=True, sampling=sampling)
    for name in plain:
        np.testing.assert_allclose(detailed[name], plain[name], rtol=1e-5, atol=1e-7, err_msg=name)
    assert_trees_close(plain_state.opt_state, detailed_state.opt_state)
    assert_trees_close(plain_state.params, detailed_state.params)
    assert set(detailed) - set(plain) == {k for k in detailed if k.startswith("research/")}
    assert int(detailed_state.step) == int(plain_state.step) == 1
    # The buckets partition the batch's rows: their losses add up to the step's loss.
    bucket_losses = [float(detailed[f"research/{b}_corruption_loss"]) for b in ("low", "medium", "high")]
    assert sum(bucket_losses) == pytest.approx(float(detailed["train/loss"]), rel=1e-5)
    assert sum(int(detailed[f"research/{b}_corruption_count"]) for b in ("low", "medium", "high")) == BATCH


def test_consecutive_steps_draw_different_noise_and_the_loss_falls():
    mesh, fn = train_fn(1)
    batch = sharding.global_batch(random_batch(seed=1, with_padding=False), mesh)
    state = fresh_state(mesh)
    losses, masked = [], []
    for _ in range(30):  # one fixed batch: the model can memorize it
        state, metrics = fn(state, batch["tokens"], batch["valid"], detailed=False)
        losses.append(float(metrics["train/loss"]))
        masked.append(float(metrics["metrics/total_masked_tokens"]))
    assert len(set(masked)) > 1  # the mask is redrawn every step
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3


def test_non_finite_batch_skips_the_update_and_counts_it():
    """A corrupt batch (an id outside the vocabulary embeds as NaN) must not touch the state."""
    mesh, fn = train_fn(1)
    corrupt_tokens = random_batch()
    corrupt_tokens["tokens"][0, 0] = 10_000
    bad = sharding.global_batch(corrupt_tokens, mesh)
    good = sharding.global_batch(random_batch(seed=2), mesh)
    state = fresh_state(mesh)
    before = jax.device_get(state)
    state, metrics = fn(state, bad["tokens"], bad["valid"], detailed=False)
    assert not np.isfinite(float(metrics["train/loss"]))
    assert float(metrics["train/skipped_steps"]) == 1 and int(state.step) == 1
    assert_trees_close(jax.device_get(state.params), before.params, rtol=0, atol=0)
    assert_trees_close(jax.device_get(state.opt_state), before.opt_state, rtol=0, atol=0)
    state, metrics = fn(state, good["tokens"], good["valid"], detailed=False)
    assert np.isfinite(float(metrics["train/loss"])) and float(metrics["train/skipped_steps"]) == 1
    assert not np.allclose(jax.device_get(state.params)["head"]["kernel"][...], before.params["head"]["kernel"][...])
