"""Every program a run will use, compiled before its first step, and its memory checked.

A train step that does not fit should fail at start-up, not hours in: the detailed variant
first runs at step `training.detailed_metrics_steps`, evaluation at `eval_every_n_steps`
and the tier-3 analysis at `attention_analysis_steps` (10,000 on a long run). So at
start-up every variant the run will call is lowered and compiled ahead of time
(`jax.jit(...).lower(...).compile()`; the persistent compilation cache makes this cheap on
a resume), XLA's `memory_analysis()` of each is read, and the loop then calls those very
compiled programs: nothing compiles later.

A variant's need per device is what XLA assigns its program (arguments + outputs +
temporaries − the donated buffers outputs reuse) plus the rest of the train state, which
stays in memory while it runs (evaluation and the analysis take only the parameters). The
capacity is the device allocator's limit (`memory_stats()['bytes_limit']`); a CPU device
reports none, and gets the host's RAM shared by its local devices.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections

from tdlm_jax.errors import TrainingError
from tdlm_jax.metrics.formatting import byte_size
from tdlm_jax.parallel import sharding

TRAIN, DETAILED, EVAL, ANALYSIS = "train", "detailed", "eval", "analysis"
LABELS = {TRAIN: "the train step", DETAILED: "the train step with tier-2 metrics", EVAL: "evaluation",
          ANALYSIS: "the tier-3 analysis"}
# What lowers a variant's memory, for the one-line error when it does not fit.
TRAIN_STEP_FIX = ("lower training.batch_size or data.seq_len, raise training.grad_accum_steps (with "
                  "training.grad_accum_unroll=1), or set model.remat=true")
FIXES = {
    TRAIN: TRAIN_STEP_FIX,
    DETAILED: TRAIN_STEP_FIX + " (under iid or adaptive time sampling, also metrics.row_gradient_mb)",
    EVAL: "lower data.eval_batch_size",
    ANALYSIS: "lower training.analysis_rows",
}


@dataclasses.dataclass(frozen=True)
class MemoryUse:
    """Bytes per device of one compiled program, as XLA assigned them."""

    arguments: int
    outputs: int
    temporaries: int
    aliased: int  # outputs written into donated arguments: counted once
    resident: int  # the train state not among the arguments, in memory while the program runs

    @property
    def total(self) -> int:
        return self.resident + self.arguments + self.outputs + self.temporaries - self.aliased


@dataclasses.dataclass
class Program:
    name: str  # TRAIN, DETAILED, EVAL or ANALYSIS
    compiled: Callable  # a jax.stages.Compiled: call it with the jitted function's non-static arguments
    memory: MemoryUse | None  # None where the backend gives no memory analysis

    @property
    def label(self) -> str:
        return LABELS[self.name]


def per_device_bytes(tree: Any) -> int:
    """Bytes of the arrays (or ShapeDtypeStructs with shardings) of `tree` on one device."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def memory_use(compiled: Any, resident: int) -> MemoryUse | None:
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return MemoryUse(arguments=stats.argument_size_in_bytes, outputs=stats.output_size_in_bytes,
                     temporaries=stats.temp_size_in_bytes, aliased=stats.alias_size_in_bytes, resident=resident)


def device_capacity(device: jax.Device) -> tuple[int | None, str]:
    """(usable bytes per device, where the figure comes from); (None, why) if unknown."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.device_kind}, its allocator's limit"
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None, f"{device.device_kind} reports no memory limit"
    local = max(1, jax.local_device_count())
    shared = f" shared by {local} devices" if local > 1 else ""
    return ram // local, f"host RAM{shared}"


def variants_used(config: ml_collections.ConfigDict, start_step: int, is_diffusion: bool) -> list[str]:
    """The variants steps start_step + 1 … num_steps call (evaluation always: the last step evaluates)."""
    tc, steps = config.training, range(start_step + 1, config.training.num_steps + 1)
    fires = lambda period: any(step % period == 0 for step in steps)
    used = [TRAIN] if any(step % tc.detailed_metrics_steps for step in steps) or not is_diffusion else []
    if is_diffusion and fires(tc.detailed_metrics_steps):
        used.append(DETAILED)
    if steps:
        used.append(EVAL)
    if is_diffusion and fires(tc.attention_analysis_steps):
        used.append(ANALYSIS)
    return used


def batch_spec(rows: int, seq_len: int, mesh: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """The abstract global batch of `rows` × `seq_len`, sharded as `sharding.global_batch` places it."""
    placed = sharding.batch_sharded(mesh)
    return {"tokens": jax.ShapeDtypeStruct((rows, seq_len), jnp.int32, sharding=placed),
            "valid": jax.ShapeDtypeStruct((rows, seq_len), jnp.bool_, sharding=placed)}


def compile_programs(config: ml_collections.ConfigDict, mesh: Any, state: Any, *, train_fn: Callable,
                     eval_fn: Callable | None, analysis_fn: Callable | None, variants: Iterable[str],
                     announce: Callable[[str], Any]) -> dict[str, Program]:
    """Lowers and compiles `variants` of the run's jitted steps for its shapes, each inside
    `announce(label)` (a context manager: the console's "compiling …" lines)."""
    train = batch_spec(config.training.batch_size, config.data.seq_len, mesh)
    evaluation = batch_spec(config.data.eval_batch_size, config.data.seq_len, mesh)
    key = jax.random.key(0)
    state_bytes = per_device_bytes(state)
    lowerings = {
        TRAIN: lambda: (train_fn.lower(state, train["tokens"], train["valid"], detailed=False), 0),
        DETAILED: lambda: (train_fn.lower(state, train["tokens"], train["valid"], detailed=True), 0),
        EVAL: lambda: (eval_fn.lower(state.eval_params(), evaluation["tokens"], evaluation["valid"], key),
                       state_bytes - per_device_bytes(state.eval_params())),
        ANALYSIS: lambda: (analysis_fn.lower(state.params, train["tokens"], train["valid"], key, state.time_proposal,
                                             state.step),
                           state_bytes - per_device_bytes(state.params)),
    }
    programs = {}
    for name in variants:
        with announce(LABELS[name]):
            lowered, resident = lowerings[name]()
            compiled = lowered.compile()
        programs[name] = Program(name, compiled, memory_use(compiled, resident))
    return programs


def check_fits(programs: Iterable[Program], capacity: int | None, source: str) -> None:
    """Raises TrainingError, in one line naming the variant, its bytes, the capacity and the
    fix, for the first program that needs more than `capacity` bytes per device."""
    if capacity is None:
        return
    for program in programs:
        if program.memory is not None and program.memory.total > capacity:
            raise TrainingError(
                f"out of memory before step 1: {program.label} needs {byte_size(program.memory.total)} per device "
                f"and the device has {byte_size(capacity)} ({source}): {FIXES[program.name]}")


def memory_table(programs: Iterable[Program], capacity: int | None, source: str) -> list[str]:
    """The per-variant memory, one line each, for the start-up log and `bench --mode=memory`."""
    lines = [f"memory per device ({source}: {byte_size(capacity) if capacity else 'unknown'}):",
             f"  {'program':<38}{'total':>10}{'arguments':>11}{'outputs':>10}{'temporaries':>13}{'rest of state':>15}"
             + ("  of device" if capacity else "")]
    for p in programs:
        if p.memory is None:
            lines.append(f"  {p.label:<38}{'(no memory analysis on this backend)':>40}")
            continue
        m = p.memory
        share = f"  {100 * m.total / capacity:.0f}%" if capacity else ""
        lines.append(f"  {p.label:<38}{byte_size(m.total):>10}{byte_size(m.arguments):>11}{byte_size(m.outputs):>10}"
                     f"{byte_size(m.temporaries):>13}{byte_size(m.resident):>15}{share}")
    return lines
