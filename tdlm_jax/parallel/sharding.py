"""Device mesh and placement: data parallelism, with FSDP as an option.

The mesh has two axes, `data` and `fsdp`, spanning all devices of all hosts
(`sharding.mesh_shape`, default (-1, 1): pure data parallelism). The batch is sharded over
both axes together, so every device gets its own rows. Parameters and optimizer state are
sharded over `fsdp` by `state_shardings` and replicated over `data`: with fsdp=1 that is
plain replication. XLA's partitioner (GSPMD) inserts the all-gathers of the parameters
and the reduce-scatter of the gradients, so the step code is written for the global batch
and unsharded parameters, and runs unchanged on 1 device or N.

Axis types stay Auto: Explicit axes would reject the uneven bucket slices that the
stratified sampler's tier-2 metrics take of the batch.

Devices are laid out data-major (jax.make_mesh keeps each host's devices contiguous), so
an fsdp group no larger than a host's device count stays within one host, where its
all-gathers are cheapest. Each host feeds only its own rows; `global_batch` assembles them.

When the devices span several slices (their `slice_index`: TPU slices joined over DCN, or
GPU nodes / NVLink domains), jax.make_mesh refuses them, and `hybrid_device_grid` lays the
mesh out with mesh_utils.create_hybrid_device_mesh instead: the data axis runs across the
slices (slice 0's rows first) and each fsdp group lies inside one slice, so fsdp's
all-gathers and reduce-scatters stay on the fast intra-slice links and only the
data-parallel gradient all-reduce crosses the slower network between slices. That needs
equal slices and an fsdp size dividing a slice's device count; anything else is a one-line
ConfigError naming `sharding.mesh_shape`. Devices without a `slice_index` count as one slice.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from tdlm_jax.errors import ConfigError

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MESH_AXES = (DATA_AXIS, FSDP_AXIS)
DEFAULT_MESH_SHAPE = (-1, 1)


def resolve_mesh_shape(mesh_shape: Sequence[int], num_devices: int) -> tuple[int, int]:
    """(data, fsdp) sizes for `num_devices`; one entry may be -1, meaning "the remaining devices".

    Raises ConfigError, naming `sharding.mesh_shape`, when the shape is malformed or its
    product is not the device count.
    """
    key = "sharding.mesh_shape"
    shape = tuple(mesh_shape) if isinstance(mesh_shape, (tuple, list)) else None
    if (shape is None or len(shape) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and (s > 0 or s == -1) for s in shape)
            or shape.count(-1) > 1):
        raise ConfigError(f"config error: {key}={mesh_shape!r}: must be two positive integers (data, fsdp), "
                          "one of which may be -1 for the remaining devices, e.g. (-1, 1)")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ConfigError(f"config error: {key}={mesh_shape!r}: {num_devices} devices do not divide "
                              f"into groups of {known}: use sizes whose product divides {num_devices}")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ConfigError(f"config error: {key}={mesh_shape!r}: its product {math.prod(shape)} is not the "
                          f"{num_devices} devices of this job: use sizes whose product is {num_devices}, "
                          "or -1 for one of them")
    return shape  # type: ignore[return-value]


def device_slices(devices: Sequence[Any]) -> list[list[Any]]:
    """`devices` grouped by `slice_index` (a TPU slice, a GPU node), in slice order, each in
    the order given; devices without a `slice_index` count as one slice."""
    groups: dict[Any, list[Any]] = {}
    for device in devices:
        groups.setdefault(getattr(device, "slice_index", 0), []).append(device)
    return [groups[key] for key in sorted(groups)]


def hybrid_device_grid(devices: Sequence[Any], mesh_shape: Sequence[int]) -> np.ndarray:
    """The (data, fsdp) array of `devices` for a mesh over several slices: data across the
    slices (slice 0's rows first), each fsdp group (row) inside one slice, laid out within a
    slice by its topology (mesh_utils.create_hybrid_device_mesh).

    Raises ConfigError, naming `sharding.mesh_shape`, when the slices differ in size or fsdp
    does not divide a slice's device count (when it does, data is a multiple of the slice
    count, and each slice takes data // slices rows).
    """
    devices = list(devices)
    data, fsdp = resolve_mesh_shape(mesh_shape, len(devices))
    groups = device_slices(devices)
    num_slices, sizes = len(groups), sorted({len(g) for g in groups})
    head = f"config error: sharding.mesh_shape={mesh_shape!r}: the {len(devices)} devices span {num_slices} slices"
    if len(sizes) > 1:
        raise ConfigError(f"{head} of unequal sizes {sizes}: a multi-slice mesh needs the same number of "
                          "devices in every slice (node); run on equal slices")
    per_slice = sizes[0]
    if per_slice % fsdp:
        fits = max(k for k in range(1, min(fsdp, per_slice) + 1) if per_slice % k == 0)
        raise ConfigError(f"{head} (nodes) of {per_slice} devices each, and fsdp={fsdp} does not divide "
                          f"{per_slice}: an fsdp group must lie within one slice, the data axis runs across "
                          f"them; use e.g. ({len(devices) // fits}, {fits}), i.e. (-1, {fits})")
    try:
        return mesh_utils.create_hybrid_device_mesh((data // num_slices, fsdp), (num_slices, 1), devices,
                                                    allow_split_physical_axes=True)
    except (ValueError, NotImplementedError) as e:  # a slice's topology that cannot take the shape
        first_line = (str(e).splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{head} (nodes) of {per_slice} devices each, which cannot be laid out as "
                          f"({data // num_slices}, {fsdp}) per slice ({first_line}): try another fsdp size "
                          f"dividing {per_slice}") from e


def make_mesh(devices: Sequence[jax.Device] | None = None,
              mesh_shape: Sequence[int] = DEFAULT_MESH_SHAPE) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: all devices of all hosts); over several
    slices (nodes) it is laid out by `hybrid_device_grid`."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = resolve_mesh_shape(mesh_shape, len(devices))
    axis_types = (AxisType.Auto,) * 2
    if len(device_slices(devices)) == 1:
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    return Mesh(hybrid_device_grid(devices, mesh_shape), MESH_AXES, axis_types=axis_types)


def _batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes the batch is split over; a mesh built elsewhere may have only `data`."""
    return tuple(a for a in MESH_AXES if a in mesh.axis_names)


def fsdp_size(mesh: Mesh) -> int:
    return mesh.shape.get(FSDP_AXIS, 1)


def num_batch_shards(mesh: Mesh) -> int:
    """Into how many row blocks the batch is split: the size of the data and fsdp axes together."""
    return math.prod(mesh.shape[a] for a in _batch_axes(mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the data and fsdp axes together."""
    return NamedSharding(mesh, P(_batch_axes(mesh)))


def fsdp_spec(shape: Sequence[int], fsdp: int) -> P:
    """The partition spec of one parameter-like array under FSDP over `fsdp` devices.

    The rule: an array with at least 2 dimensions is split along its largest dimension that
    `fsdp` divides (the first one on ties); vectors (norm scales), scalars (step, counts, the
    RNG key) and matrices no dimension of which `fsdp` divides stay replicated. Matrices
    hold almost all of a transformer's parameters; the rest are O(d_model), and sharding
    them would cost an all-gather's latency each to save next to no memory.
    """
    if fsdp == 1 or len(shape) < 2:
        return P()
    divisible = [i for i, size in enumerate(shape) if size % fsdp == 0]
    if not divisible:
        return P()
    axis = max(divisible, key=lambda i: (shape[i], -i))
    return P(*(FSDP_AXIS if i == axis else None for i in range(len(shape))))


def state_shardings(mesh: Mesh, tree: Any) -> Any:
    """A NamedSharding for each array leaf of `tree` (arrays or ShapeDtypeStructs): `fsdp_spec`.

    It depends only on each leaf's shape, so params, their optimizer moments, their EMA and
    their gradients, which share shapes, are all sharded alike, and the same tree of
    shardings serves `jax.device_put`, `jax.jit(out_shardings=...)` and checkpoint restore.
    """
    fsdp = fsdp_size(mesh)
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), fsdp)), tree)


def place_state(tree: Any, mesh: Mesh) -> Any:
    """Places a state or params pytree on the mesh as `state_shardings` says."""
    return jax.device_put(tree, state_shardings(mesh, tree))


def gather_params(params: Any, mesh: Mesh) -> Any:
    """Inside jit: `params` constrained to be whole on every device, i.e. FSDP's all-gather
    before use. XLA then runs the forward and backward passes data-parallel and reduce-
    scatters the gradients into the sharded optimizer update. Without it, GSPMD propagates
    the parameters' fsdp splits into the activations (sharding attention heads or d_model)
    and then has to rematerialize them in full to meet the batch-sharded layout."""
    if fsdp_size(mesh) == 1:
        return params
    return jax.lax.with_sharding_constraint(params, replicated(mesh))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a pytree whole on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each host's rows into global arrays sharded along the batch axis."""
    sharding = batch_sharded(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
