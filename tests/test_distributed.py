"""The (data, fsdp) mesh, FSDP placement and the multi-host join plan.

Data-parallel and FSDP steps must compute what one device computes: the same loss, the
same metrics and the same update, step after step (so that the sharded optimizer state is
exercised too). 4-device meshes run in this process (tests/conftest.py); the 8-device ones
run in one subprocess of this file, as XLA fixes the device count when JAX starts.
"""

from __future__ import annotations

import functools
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tdlm_jax.errors import ConfigError
from tdlm_jax.parallel import distributed, sharding
from tdlm_jax.training import config as config_lib
from common import fresh_state, random_batch, train_fn

REPO = pathlib.Path(__file__).resolve().parents[1]
SCHEDULE = (False, True, False)  # ordinary, detailed, ordinary: the update after a detailed step too
# Compiling the detailed variant costs the most, so some meshes run ordinary steps only: the
# detailed variant applies the same update (test_step), so one reference serves both.
ORDINARY = (False, False, False)


def trajectory(num_devices: int, mesh_shape=(-1, 1), schedule=SCHEDULE):
    """Metrics of each step of `schedule`, the final state, and the mesh."""
    mesh, fn = train_fn(num_devices, mesh_shape=mesh_shape)
    state, metrics = fresh_state(mesh), []
    for i, detailed in enumerate(schedule):
        batch = sharding.global_batch(random_batch(seed=i), mesh)
        state, step_metrics = fn(state, batch["tokens"], batch["valid"], detailed=detailed)
        metrics.append(jax.device_get(step_metrics))
    return metrics, state, mesh


@functools.lru_cache(maxsize=None)
def one_device():
    metrics, state, _ = trajectory(1)
    return metrics, jax.device_get(state)


def assert_same_trajectory(metrics, state, reference_metrics, reference_state, schedule=SCHEDULE):
    for step, (got, expected, detailed) in enumerate(zip(metrics, reference_metrics, schedule)):
        assert got.keys() == {k for k in expected if detailed or not k.startswith("research/")}
        for name in got:
            np.testing.assert_allclose(got[name], expected[name], rtol=2e-5, atol=1e-6, err_msg=f"{name} @ {step}")
    for x, y in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(reference_state)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=2e-6)


# Device 0's shard of the tiny model's head [32, 258], embedding [258, 32], a qkv kernel's Adam
# moment [32, 96] and a norm scale [32], by fsdp size: the largest dimension the fsdp size
# divides is split (258 is divisible by 2 but not by 4); vectors stay whole.
EXPECTED_SHARDS = {
    1: {"head": (32, 258), "embed": (258, 32), "qkv_mu": (32, 96), "norm": (32,)},
    2: {"head": (32, 129), "embed": (129, 32), "qkv_mu": (32, 48), "norm": (32,)},
    4: {"head": (8, 258), "embed": (258, 8), "qkv_mu": (32, 24), "norm": (32,)},
}


def shard_shapes(state) -> dict[str, tuple]:
    """The shape of device 0's shard of a few leaves whose FSDP layout the rule fixes."""
    leaves = {"head": state.params["head"]["kernel"][...], "embed": state.params["embed"]["embedding"][...],
              "qkv_mu": state.opt_state[0].mu["blocks"][0]["attn"]["qkv"]["kernel"][...],
              "norm": state.params["final_norm"]["scale"][...]}
    return {name: x.addressable_shards[0].data.shape for name, x in leaves.items()}


@pytest.mark.parametrize("mesh_shape, schedule", [
    ((-1, 1), SCHEDULE),  # (4, 1), written as test_step compiles it
    ((1, 4), SCHEDULE),
    ((2, 2), ORDINARY),
])
def test_data_parallel_and_fsdp_steps_match_one_device(mesh_shape, schedule, eight_device_run):
    assert jax.device_count() == 4
    metrics, state, mesh = trajectory(4, mesh_shape, schedule)
    assert_same_trajectory(metrics, state, *one_device(), schedule)
    assert shard_shapes(state) == EXPECTED_SHARDS[sharding.fsdp_size(mesh)]
    assert state.step.sharding.is_fully_replicated
    assert len(state.params["head"]["kernel"][...].addressable_shards) == 4


EIGHT_DEVICE_MESHES = (((8, 1), ORDINARY), ((2, 4), SCHEDULE))


@pytest.fixture(scope="module")
def eight_device_run(tmp_path_factory):
    """The 8-device subprocess, started by the first 4-device test so that it compiles while
    the in-process tests do; `test_eight_devices_...` (the last test) collects it."""
    root = tmp_path_factory.mktemp("eight")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(REPO)}
    with open(root / "output.txt", "w+") as log:
        process = subprocess.Popen([sys.executable, __file__, str(root / "eight.npz")], env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
        yield process, root / "eight.npz", log
        if process.poll() is None:
            process.kill()
            process.wait()


def _eight_device_main(out: str) -> None:
    """Run as a script (by `eight_device_run`): trajectories on 8-device meshes, saved to `out`."""
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    arrays = {}
    for mesh_shape, schedule in EIGHT_DEVICE_MESHES:
        tag = "x".join(map(str, mesh_shape))
        metrics, state, _ = trajectory(8, mesh_shape, schedule)
        arrays[f"{tag}/metrics"] = np.array(metrics, dtype=object)
        arrays[f"{tag}/shards"] = np.array(shard_shapes(state), dtype=object)
        for i, leaf in enumerate(jax.tree.leaves(jax.device_get(state))):
            arrays[f"{tag}/leaf{i}"] = np.asarray(leaf)
    np.savez(out, **arrays)


# --- the FSDP rule and the mesh shape ---------------------------------------------------------


@pytest.mark.parametrize("shape, fsdp, expected", [
    ((32, 96), 4, P(None, "fsdp")),  # the largest divisible dimension
    ((258, 32), 4, P(None, "fsdp")),  # 258 % 4 != 0: the next largest
    ((64, 64), 4, P("fsdp", None)),  # a tie: the first
    ((2, 4, 8), 2, P(None, None, "fsdp")),
    ((6, 10), 4, P()),  # nothing divisible: replicated
    ((1024,), 4, P()),  # vectors stay whole
    ((), 4, P()),
    ((32, 96), 1, P()),  # pure data parallelism
])
def test_fsdp_spec_rule(shape, fsdp, expected):
    assert sharding.fsdp_spec(shape, fsdp) == expected


def test_state_shardings_follow_shapes_for_arrays_and_abstract_leaves():
    mesh = sharding.make_mesh(mesh_shape=(2, 2))
    tree = {"w": np.zeros((8, 6), np.float32), "b": jax.ShapeDtypeStruct((6,), np.float32), "none": None}
    shardings = sharding.state_shardings(mesh, tree)
    assert shardings["w"].spec == P("fsdp", None) and shardings["b"].spec == P() and shardings["none"] is None
    placed = sharding.place_state({"w": np.arange(48, dtype=np.float32).reshape(8, 6)}, mesh)
    assert placed["w"].addressable_shards[0].data.shape == (4, 6)
    np.testing.assert_array_equal(np.asarray(placed["w"]), np.arange(48).reshape(8, 6))
    assert sharding.batch_sharded(mesh).spec == P(("data", "fsdp")) and sharding.num_batch_shards(mesh) == 4


@pytest.mark.parametrize("shape, devices, expected", [
    ((-1, 1), 4, (4, 1)), ((2, -1), 4, (2, 2)), ((1, 4), 4, (1, 4)), ([-1, 8], 16, (2, 8)), ((1, 1), 1, (1, 1)),
])
def test_mesh_shape_resolves_minus_one_to_the_remaining_devices(shape, devices, expected):
    assert sharding.resolve_mesh_shape(shape, devices) == expected


@pytest.mark.parametrize("shape, message", [
    ((3, 1), "product 3 is not the 4 devices"),
    ((-1, 3), "do not divide into groups of 3"),
    ((-1, -1), "two positive integers"),
    ((0, 4), "two positive integers"),
    ((2, 2, 1), "two positive integers"),
    ("2,2", "two positive integers"),
    ((True, 4), "two positive integers"),
])
def test_bad_mesh_shape_is_a_one_line_config_error(shape, message):
    with pytest.raises(ConfigError, match=message) as error:
        sharding.resolve_mesh_shape(shape, 4)
    assert "sharding.mesh_shape" in str(error.value) and "\n" not in str(error.value)


def _tiny_config(**overrides):
    import runpy

    config = runpy.run_path(str(REPO / "configs" / "tiny.py"))["get_config"]()
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def test_validate_checks_the_mesh_and_the_batch_split():
    config_lib.validate(_tiny_config(**{"sharding.mesh_shape": (2, 2)}), num_devices=4)
    with pytest.raises(ConfigError, match=r"sharding.mesh_shape=\(3, 1\)"):
        config_lib.validate(_tiny_config(**{"sharding.mesh_shape": (3, 1)}), num_devices=4)
    with pytest.raises(ConfigError, match=r"does not divide over 4 devices: use a multiple of 4 \(one row block"):
        config_lib.validate(_tiny_config(**{"data.eval_batch_size": 6}), num_devices=4)
    with pytest.raises(ConfigError, match="does not divide over 2 processes"):
        config_lib.validate(_tiny_config(**{"data.eval_batch_size": 3}), num_devices=1, process_count=2)


# --- joining a multi-host job -----------------------------------------------------------------

SLURM = {"SLURM_JOB_ID": "123", "SLURM_STEP_NODELIST": "node[001-002]", "SLURM_NTASKS": "2",
         "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}


def test_a_single_process_run_does_not_initialize():
    assert distributed.plan(environ={}) is None
    assert distributed.plan(environ={"SLURM_JOB_ID": "1", "PATH": "/bin"}) is None  # sbatch shell, no srun step
    assert distributed.plan(environ={**SLURM, "SLURM_NTASKS": "1"}) is None  # a one-task srun
    assert distributed.plan(num_processes=1, environ={}) is None
    one_rank = {"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "1"}
    assert distributed.plan(environ=one_rank) is None


def test_manual_setup_from_flags_or_environment_with_flags_winning():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed.plan(environ=env) == distributed.Plan("manual", "10.0.0.1:1234", 4, 3)
    from_flags = distributed.plan(coordinator_address="localhost:99", num_processes=2, process_id=0, environ=env)
    assert from_flags == distributed.Plan("manual", "localhost:99", 2, 0)
    assert from_flags.kwargs() == {"coordinator_address": "localhost:99", "num_processes": 2, "process_id": 0,
                                   "initialization_timeout": 300}


def test_clusters_are_detected_and_left_to_jax():
    slurm = distributed.plan(environ=SLURM)
    assert slurm.source == "slurm" and slurm.kwargs() == {"initialization_timeout": 300}
    # A manual value overrides what the cluster says; the rest is still detected by JAX.
    assert distributed.plan(coordinator_address="node001:5000", environ=SLURM).kwargs()["coordinator_address"] == \
        "node001:5000"
    assert distributed.plan(environ={"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "8"}
                            ).source == "ompi"
    assert distributed.plan(environ={}, on_cloud_tpu=True).source == "tpu"
    explicit = distributed.plan(cluster_detection_method="mpi4py", environ={})
    assert explicit.kwargs() == {"cluster_detection_method": "mpi4py", "initialization_timeout": 300}


@pytest.mark.parametrize("kwargs, message", [
    ({"num_processes": 2}, r"missing --coordinator_address \(JAX_COORDINATOR_ADDRESS\), --process_id"),
    ({"coordinator_address": "h:1", "process_id": 0}, "missing --num_processes"),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, r"must be in \[0, --num_processes\)"),
    ({"coordinator_address": "h:1", "num_processes": 0, "process_id": 0}, "must be at least 1"),
    ({"coordinator_address": "localhost", "num_processes": 2, "process_id": 0}, "must be host:port"),
    ({"cluster_detection_method": "lsf"}, "must be one of slurm"),
    ({"environ": {"JAX_NUM_PROCESSES": "two"}}, "JAX_NUM_PROCESSES='two' is not an integer"),
])
def test_incomplete_or_inconsistent_manual_setup_is_a_config_error(kwargs, message):
    kwargs = {"environ": {}, **kwargs}
    with pytest.raises(ConfigError, match=message):
        distributed.plan(**kwargs)


def test_initialize_does_nothing_without_a_plan():
    distributed.initialize(None)
    assert not jax.distributed.is_initialized() and jax.process_count() == 1
    assert distributed.on_cloud_tpu() is False


def test_a_failed_join_is_a_one_line_config_error():
    jax.devices()  # the backend is up, so JAX refuses before it touches its distributed state
    expected = r"joining the multi-host job \(manual\) failed \(.*must be called before"
    with pytest.raises(ConfigError, match=expected) as e:
        distributed.initialize(distributed.Plan("manual", "localhost:1", 2, 1, initialization_timeout=1))
    assert "\n" not in str(e.value) and not jax.distributed.is_initialized()


# --- meshes over several slices (GPU nodes, TPU slices), on fake devices --------------------


class FakeDevice:
    """The attributes mesh_utils reads of a device; jax.sharding.Mesh takes these as they are
    (hashable by identity). Nothing is compiled on them."""

    def __init__(self, **attributes):
        self.__dict__.update(attributes)

    def __repr__(self):
        return f"FakeDevice({self.__dict__})"


def gpu_nodes(nodes: int, per_node: int = 8) -> list[FakeDevice]:
    """`nodes` nodes of `per_node` GPUs, one process and one slice_index per node, listed
    last node first (jax.devices() promises no order across nodes)."""
    return [FakeDevice(id=n * per_node + i, process_index=n, slice_index=n, platform="gpu",
                       device_kind="NVIDIA H100 80GB HBM3")
            for n in reversed(range(nodes)) for i in range(per_node)]


def tpu_slices(slices: int, kind: str, dims: tuple[int, int, int]) -> list[FakeDevice]:
    """`slices` TPU slices of `dims` chips (coords within each slice, one core per chip)."""
    return [FakeDevice(id=s * 100 + i, process_index=s, slice_index=s, platform="tpu", device_kind=kind,
                       coords=coords, core_on_chip=0)
            for s in range(slices)
            for i, coords in enumerate((x, y, z) for z in range(dims[2]) for y in range(dims[1]) for x in range(dims[0]))]


def ids(mesh) -> list[list[int]]:
    return [[d.id for d in row] for row in mesh.devices]


def assert_groups_within_slices(mesh, slices: int):
    """Each fsdp group (a row) lies in one slice; the data axis runs over the slices, slice 0 first."""
    rows_per_slice = mesh.shape["data"] // slices
    assert [{d.slice_index for d in row} for row in mesh.devices] == \
        [{r // rows_per_slice} for r in range(mesh.shape["data"])]
    assert mesh.axis_names == sharding.MESH_AXES and set(mesh.axis_types) == {jax.sharding.AxisType.Auto}


@pytest.mark.parametrize("mesh_shape, expected", [
    ((-1, 8), [list(range(8))]),
    ((-1, 4), [[0, 1, 2, 3], [4, 5, 6, 7]]),
    ((8, 1), [[i] for i in range(8)]),
])
def test_one_node_of_gpus_keeps_the_jax_make_mesh_layout(mesh_shape, expected):
    devices = gpu_nodes(1)[::-1]
    mesh = sharding.make_mesh(devices, mesh_shape)
    assert ids(mesh) == expected and len(sharding.device_slices(devices)) == 1
    same = jax.make_mesh(mesh.devices.shape, sharding.MESH_AXES, devices=devices)
    assert ids(same) == expected


@pytest.mark.parametrize("nodes, mesh_shape, data", [
    (2, (-1, 8), 2),  # one row per node
    (2, (-1, 4), 4),  # rows 0-1 on node 0, rows 2-3 on node 1
    (2, (-1, 1), 16),
    (4, (-1, 8), 4),
    (4, (8, 4), 8),
    (4, (-1, 2), 16),
])
def test_multi_node_gpu_mesh_runs_data_across_nodes_and_fsdp_within_one(nodes, mesh_shape, data):
    mesh = sharding.make_mesh(gpu_nodes(nodes), mesh_shape)
    fsdp = nodes * 8 // data
    assert dict(mesh.shape) == {"data": data, "fsdp": fsdp}
    # Node n holds ids 8n..8n+7: in id order, its rows come n-th, each a block of fsdp ids.
    assert ids(mesh) == np.arange(nodes * 8).reshape(data, fsdp).tolist()
    assert_groups_within_slices(mesh, nodes)


def test_two_nodes_with_fsdp_four_in_detail():
    mesh = sharding.make_mesh(gpu_nodes(2), (-1, 4))
    assert ids(mesh) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert [d.process_index for d in mesh.devices[:, 0]] == [0, 0, 1, 1]


V5E_RING = [(0, 0, 0), (1, 0, 0), (1, 1, 0), (0, 1, 0)]  # mesh_utils' ring over a 2x2 tray


@pytest.mark.parametrize("kind, dims, mesh_shape, expected", [
    # 2 slices of v5e 2x2 (v5litepod-4): each slice's chips in ring order, one row per slice.
    ("TPU v5 lite", (2, 2, 1), (-1, 4), [V5E_RING, V5E_RING]),
    ("TPU v5 lite", (2, 2, 1), (-1, 2), [V5E_RING[:2], V5E_RING[2:]] * 2),
    # 2 slices of v4 2x2x2: fsdp=4 takes an x-y plane of one slice, data its z and the slices.
    ("TPU v4", (2, 2, 2), (-1, 4), [[(x, y, z) for x in range(2) for y in range(2)] for z in range(2)] * 2),
    ("TPU v4", (2, 2, 2), (-1, 8), [[(x, y, z) for x in range(2) for y in range(2) for z in range(2)]] * 2),
])
def test_multi_slice_tpu_mesh_keeps_fsdp_groups_inside_a_slice(kind, dims, mesh_shape, expected):
    mesh = sharding.make_mesh(tpu_slices(2, kind, dims), mesh_shape)
    assert [[d.coords for d in row] for row in mesh.devices] == expected
    assert_groups_within_slices(mesh, 2)


@pytest.mark.parametrize("devices, mesh_shape, message", [
    (gpu_nodes(2), (-1, 16), r"span 2 slices \(nodes\) of 8 devices each, and fsdp=16 does not divide 8.*"
                             r"use e\.g\. \(2, 8\), i\.e\. \(-1, 8\)"),
    (gpu_nodes(2), (1, 16), r"fsdp=16 does not divide 8.*\(-1, 8\)"),
    (gpu_nodes(2, per_node=6), (-1, 4), r"2 slices \(nodes\) of 6 devices each, and fsdp=4.*\(-1, 3\)"),
    (gpu_nodes(2)[:12], (-1, 4), r"12 devices span 2 slices of unequal sizes \[4, 8\]"),
])
def test_multi_node_mesh_that_cannot_keep_fsdp_in_a_node_is_a_one_line_config_error(devices, mesh_shape, message):
    with pytest.raises(ConfigError, match=message) as error:
        sharding.make_mesh(devices, mesh_shape)
    assert f"sharding.mesh_shape={mesh_shape!r}" in str(error.value) and "\n" not in str(error.value)


def test_a_slice_topology_mesh_utils_rejects_is_a_one_line_config_error(monkeypatch):
    def refuse(*args, **kwargs):
        raise NotImplementedError("Failed to find assignment\nmore detail")

    monkeypatch.setattr(sharding.mesh_utils, "create_hybrid_device_mesh", refuse)
    with pytest.raises(ConfigError, match=r"cannot be laid out as \(2, 4\) per slice \(Failed to find assignment\)"
                       ) as error:
        sharding.make_mesh(gpu_nodes(2), (-1, 4))
    assert "sharding.mesh_shape" in str(error.value) and "\n" not in str(error.value)


def test_devices_without_a_slice_index_count_as_one_slice():
    assert sharding.device_slices(jax.devices()) == [jax.devices()]
    plain = [FakeDevice(id=i, process_index=i // 2, platform="gpu", device_kind="NVIDIA A100") for i in range(4)]
    assert sharding.device_slices(plain) == [plain]
    assert ids(sharding.make_mesh(plain, (-1, 2))) == [[0, 1], [2, 3]]
    assert [[d.id for d in group] for group in sharding.device_slices(gpu_nodes(2, per_node=2))] == [[0, 1], [2, 3]]


def test_eight_devices_data_parallel_and_fsdp_match_one_device(eight_device_run):
    """(8, 1) and (2, 4) meshes, computed by the subprocess with 8 fake devices."""
    process, out, log = eight_device_run
    process.wait(timeout=240)
    log.seek(0)
    assert process.returncode == 0, log.read()[-3000:]
    saved = np.load(out, allow_pickle=True)
    reference_metrics, reference_state = one_device()
    for mesh_shape, schedule in EIGHT_DEVICE_MESHES:
        tag = "x".join(map(str, mesh_shape))
        metrics = list(saved[f"{tag}/metrics"])
        leaves = [saved[f"{tag}/leaf{i}"] for i in range(len(jax.tree.leaves(reference_state)))]
        assert_same_trajectory(metrics, jax.tree.unflatten(jax.tree.structure(reference_state), leaves),
                               reference_metrics, reference_state, schedule)
        assert saved[f"{tag}/shards"].item() == EXPECTED_SHARDS[mesh_shape[1]]


if __name__ == "__main__":
    _eight_device_main(sys.argv[1])
