"""Save/restore of a training-state pytree and a grain iterator position."""

import os
import subprocess
import sys
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from tdlm_jax.errors import CheckpointError
from tdlm_jax.training import checkpoint
from tdlm_jax.training.checkpoint import Checkpointer


def _state(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        # Big enough that its data file is clearly the largest in the step directory.
        "params": {"w": jnp.asarray(rng.normal(size=(64, 64)), jnp.float32),
                   "b": jnp.asarray(rng.normal(size=(64,)), jnp.float32)},
        "step": jnp.asarray(7, jnp.int32),
        "key": jax.random.key_data(jax.random.key(seed)),
    }


def _abstract(state: dict) -> dict:
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)


def _iterator():
    dataset = grain.MapDataset.range(100).shuffle(seed=0).repeat().batch(4).to_iter_dataset()
    return iter(dataset)


def _assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_state_and_iterator(tmp_path):
    state = _state()
    iterator = _iterator()
    for _ in range(3):
        next(iterator)
    with Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(7, state, iterator)
        # Keep going as training would; the saved position must not move with it.
        expected = [next(iterator) for _ in range(5)]

    with Checkpointer(str(tmp_path)) as ckpt:
        assert ckpt.latest_step() == 7
        fresh = _iterator()
        restored = ckpt.restore(7, _abstract(state), fresh)
    _assert_trees_equal(restored, state)
    assert restored["key"].dtype == jnp.uint32
    assert restored["params"]["w"].sharding.is_fully_replicated
    for want in expected:
        np.testing.assert_array_equal(next(fresh), want)


def test_restore_state_only(tmp_path):
    state = _state()
    with Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(1, state, _iterator())
        _assert_trees_equal(ckpt.restore(1, _abstract(state)), state)


def _model_state():
    """A real train state's kinds of nodes: flax Variables and optax's named states in a chain."""
    class Tiny(nnx.Module):
        def __init__(self):
            self.proj = nnx.Linear(3, 2, rngs=nnx.Rngs(0))

    _, params = nnx.split(Tiny())
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    return {"params": params, "opt_state": optimizer.init(params), "step": jnp.asarray(3, jnp.int32)}


def test_the_plain_layout_names_every_leaf_and_maps_back():
    state = _model_state()
    plain = checkpoint.to_plain(state)
    assert set(plain["params"]["proj"]) == {"kernel", "bias"}  # no flax `value` box
    np.testing.assert_array_equal(plain["params"]["proj"]["kernel"], state["params"]["proj"]["kernel"][...])
    adam = plain["opt_state"]["1"]["0"]  # the chain's positions, then ScaleByAdamState's fields
    assert set(adam) == {"count", "mu", "nu"} and set(adam["mu"]["proj"]) == {"kernel", "bias"}
    _assert_trees_equal(checkpoint.from_plain(plain, state), state)


def test_checkpoints_of_the_earlier_layout_still_restore(tmp_path):
    """Before the plain layout, the pytree itself was the item `state`."""
    state = _model_state()
    manager = ocp.CheckpointManager(str(tmp_path))
    manager.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    manager.wait_until_finished()
    with Checkpointer(str(tmp_path)) as ckpt:
        _assert_trees_equal(ckpt.restore(5, _abstract(state)), state)
        ckpt.save(6, state)
    assert "train_state" in os.listdir(tmp_path / "6") and "state" not in os.listdir(tmp_path / "6")


def test_latest_step_and_max_to_keep(tmp_path):
    with Checkpointer(str(tmp_path), max_to_keep=2) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.all_steps() == []
        for step in (10, 20, 30):
            ckpt.save(step, _state(step))
        ckpt.wait_until_finished()
        assert ckpt.latest_step() == 30
        assert ckpt.all_steps() == [20, 30]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["20", "30"]
    # A new Checkpointer sees the same steps, and the newest one holds its own state.
    with Checkpointer(str(tmp_path), max_to_keep=2) as ckpt:
        assert ckpt.all_steps() == [20, 30]
        _assert_trees_equal(ckpt.restore(30, _abstract(_state())), _state(30))


def test_saving_an_existing_step_is_a_no_op(tmp_path):
    with Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(5, _state(0))
        ckpt.save(5, _state(1))
        _assert_trees_equal(ckpt.restore(5, _abstract(_state())), _state(0))


def test_relative_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with Checkpointer("ckpt") as ckpt:
        ckpt.save(1, _state())
        assert ckpt.directory == os.path.join(str(tmp_path), "ckpt")
    assert (tmp_path / "ckpt" / "1").is_dir()


def _largest_file(directory: str) -> str:
    paths = [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]
    return max(paths, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_checkpoint_raises_checkpoint_error(tmp_path, damage):
    state = _state()
    with Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(3, state)
    path = _largest_file(str(tmp_path / "3"))
    size = os.path.getsize(path)
    with open(path, "wb") as f:
        if damage == "garbage":
            f.write(np.random.default_rng(0).bytes(size))

    with Checkpointer(str(tmp_path)) as ckpt:
        with pytest.raises(CheckpointError) as info:
            ckpt.restore(3, _abstract(state))
    message = str(info.value)
    assert "\n" not in message
    assert os.path.join(str(tmp_path), "3") in message
    assert "delete that step directory" in message
    assert info.value.__cause__ is not None


def test_missing_step_raises_checkpoint_error(tmp_path):
    with Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(1, _state())
        with pytest.raises(CheckpointError, match="could not be restored"):
            ckpt.restore(2, _abstract(_state()))


def test_shape_mismatch_raises_checkpoint_error(tmp_path):
    with Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(1, _state())
        other = _state()
        other["params"]["w"] = jnp.zeros((64, 32), jnp.float32)
        with pytest.raises(CheckpointError, match="could not be restored"):
            ckpt.restore(1, _abstract(other))


def test_missing_iterator_state_raises_checkpoint_error(tmp_path):
    with Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(1, _state())  # saved without a data iterator
        with pytest.raises(CheckpointError, match="could not be restored"):
            ckpt.restore(1, _abstract(_state()), _iterator())


def test_abstract_state_without_sharding_is_rejected(tmp_path):
    with Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(1, _state())
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state())
        with pytest.raises(ValueError, match="has no sharding"):
            ckpt.restore(1, abstract)


_FAILED_RESTORE_SCRIPT = """
import sys
import jax, jax.numpy as jnp, numpy as np
from tdlm_jax.errors import CheckpointError
from tdlm_jax.training import checkpoint
from tdlm_jax.training.checkpoint import Checkpointer

mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
state = {f"p{i}": jnp.ones((16, 16)) for i in range(10)}
abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated) for k, v in state.items()}
abstract["p0"] = jax.ShapeDtypeStruct((16, 8), jnp.float32, sharding=replicated)
with Checkpointer(sys.argv[1]) as ckpt:
    ckpt.save(1, state)
    try:
        ckpt.restore(1, abstract)
    except CheckpointError as e:
        print(e)
"""


def test_failed_restore_prints_only_the_error(tmp_path):
    # orbax abandons the other arrays' reads, which used to print pages of TensorStore
    # specs on stderr when garbage-collected; the user must see one line only.
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(
        [sys.executable, "-c", _FAILED_RESTORE_SCRIPT, str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=120, check=True,
    )
    assert "could not be restored" in result.stdout
    assert "Exception ignored" not in result.stderr
    assert "TensorStore" not in result.stderr
