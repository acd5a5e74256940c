"""The step-time benchmark behind `python -m tdlm_jax.bench`.

Runs the config's real train step on random tokens (only shapes matter for speed, so no
data is read) and prints:
- `train` (the default): step time, tokens per second, model FLOPs per token
  (`tdlm_jax.model.flops`: 6·N + 12·layers·seq·d_model) and MFU against a stated peak;
- `tiers`: the cost of the metric tiers as ratios to a bare step (the train step with every
  output but the new state discarded, so XLA removes the metrics): tier 1 (the ordinary
  step), tier 2 (the detailed variant) and tier 3 (the analysis pass);
- `data`: the input pipeline's tokens per second next to the train step's consumption.

Methodology: every timed function is compiled and run once before timing. Then the
variants are timed round-robin, `--steps` calls at a time, `--repeats` times, so that drift
in the machine's speed (other processes) touches every variant alike; a step's time is the
median over repeats. The peak is a dense bf16 figure from a table of known accelerators
(`DEVICE_PEAKS`, × the device count); on CPU, and on an unknown accelerator, it is a
jitted large matmul in two layouts (`MATMUL_LAYOUTS`) timed in the same round-robin as the
step (the best layout and repeat), so MFU compares two numbers measured under the same load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tdlm_jax.data import throughput
from tdlm_jax.data import tokenizer as tokenizer_lib
from tdlm_jax.errors import ConfigError
from tdlm_jax.model import flops as flops_lib
from tdlm_jax.parallel import sharding
from tdlm_jax.training import config as config_lib
from tdlm_jax.training import programs
from tdlm_jax.training import step as step_lib
from tdlm_jax.training.setup import build_model_and_optimizer, initial_state, jitted_steps, train_step_statics

MODES = ("train", "tiers", "data", "memory", "dots")

# Dense (no sparsity) bf16 peak FLOP/s per device, from the vendors' datasheets: NVIDIA's
# tensor-core figures "with sparsity" halved; Google Cloud's per-chip TPU figures (a jax
# device is one chip from v4 on). Matched in order against jax's `device_kind`, lowercased.
DEVICE_PEAKS: tuple[tuple[str, str, float], ...] = (
    (r"h100.*pcie", "NVIDIA H100 PCIe", 756e12),
    (r"h800.*pcie", "NVIDIA H800 PCIe", 756e12),  # before the bare h800 (SXM) entry, as for the H100
    (r"h100.*nvl", "NVIDIA H100 NVL", 835e12),
    (r"h200.*nvl", "NVIDIA H200 NVL", 835e12),
    (r"gh200", "NVIDIA GH200", 989e12),
    (r"h100", "NVIDIA H100 SXM", 989e12),
    (r"h800", "NVIDIA H800 SXM", 989e12),
    (r"h200", "NVIDIA H200 SXM", 989e12),
    (r"a100|a800", "NVIDIA A100", 312e12),
    (r"l40s", "NVIDIA L40S", 362e12),
    (r"\bl4\b", "NVIDIA L4", 121e12),
    (r"tpu v4", "TPU v4", 275e12),
    (r"tpu v5 ?lite|tpu v5e", "TPU v5e", 197e12),
    (r"tpu v5p?$", "TPU v5p", 459e12),
    (r"tpu v6 ?lite|tpu v6e|trillium", "TPU v6e", 918e12),
)


def known_peak(device_kind: str) -> tuple[str, float] | None:
    """(name, dense bf16 FLOP/s) of a device kind in `DEVICE_PEAKS`, or None if unknown."""
    kind = device_kind.strip().lower()
    for pattern, name, peak in DEVICE_PEAKS:
        if re.search(pattern, kind):
            return name, peak
    return None


@dataclasses.dataclass(frozen=True)
class Peak:
    """The FLOP/s that MFU is a fraction of, and where it comes from."""

    flops_per_second: float  # for the whole job: per-device peak × device count
    source: str


# The peak's matmul, in two layouts of the same size³ product: XLA:CPU (jax 0.10–0.12) hands
# `a @ b` to YNNPACK and `aᵀ @ b` (contracting both operands' first axis) to Eigen, and Eigen
# ran the 2048³ float32 product 3–10 % faster on the 2-core EPYC of docs/performance.md.
# The machine's peak is the faster of the two, so MFU is never taken against the slower one.
MATMUL_LAYOUTS = {"a @ b": ((1,), (0,)), "aT @ b": ((0,), (0,))}


def layout_product(a: jax.Array, b: jax.Array, layout: str) -> jax.Array:
    """`a @ b` or `aᵀ @ b`, as `layout` names it."""
    return jax.lax.dot_general(a, b, (MATMUL_LAYOUTS[layout], ((), ())))


def matmul_fn(size: int, dtype: Any, chain: int, layout: str = "a @ b"
              ) -> tuple[Callable[[], jax.Array], float]:
    """(a zero-argument callable running `chain` dependent size³ matmuls in `layout`
    (a `MATMUL_LAYOUTS` key), its FLOPs).

    The matmuls are chained inside one jitted loop so that accelerator launch overhead is
    amortized; the matrix is scaled by 1/√size so the chain neither overflows nor vanishes.
    """
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (size, size), jnp.float32).astype(dtype)
    b = (jax.random.normal(key_b, (size, size), jnp.float32) / np.sqrt(size)).astype(dtype)

    @jax.jit
    def run(a, b):
        return jax.lax.fori_loop(0, chain, lambda _, x: layout_product(x, b, layout), a)

    return (lambda: run(a, b)), 2.0 * size ** 3 * chain


def peak_for_device(device: jax.Device, num_devices: int, measured: Callable[[], float] | None,
                    override_tflops: float = 0.0) -> Peak:
    """The job's peak: an override, else the table's bf16 peak × devices (GPU/TPU), else the
    `measured` matmul FLOP/s (CPU: the whole machine, however many fake devices it has).

    Raises ConfigError for an unknown accelerator when nothing was measured.
    """
    if override_tflops > 0:
        return Peak(override_tflops * 1e12 * num_devices, f"--peak_tflops={override_tflops:g} per device")
    if device.platform != "cpu":
        known = known_peak(device.device_kind)
        if known is not None:
            name, peak = known
            return Peak(peak * num_devices, f"{name} dense bf16 peak {peak / 1e12:g} TFLOP/s × {num_devices} "
                                            "device(s), from the datasheet table in tdlm_jax/training/benchmark.py")
    if measured is None:
        raise ConfigError(f"unknown device {device.device_kind!r} and no measured peak: pass --peak_tflops")
    what = "f32" if device.platform == "cpu" else "bf16"
    note = "" if device.platform == "cpu" else f" (device {device.device_kind!r} is not in the table)"
    scale = 1 if device.platform == "cpu" else num_devices
    return Peak(measured() * scale, f"measured {what} matmul on this machine, best layout and repeat{note}")


def time_round_robin(variants: Mapping[str, Callable[[], Any]], *, steps: int, repeats: int
                     ) -> dict[str, list[float]]:
    """Seconds per call of each variant, one entry per repeat.

    Every variant is called (compiled, warmed up) once first. Then, repeat by repeat, each
    variant is called `steps` times in a row and timed until the device has finished all of
    them, in a fixed rotation, so that drift in the machine's speed touches every variant alike.
    """
    for fn in variants.values():
        _block(fn())
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            _block([fn() for _ in range(steps)])
            seconds[name].append((time.perf_counter() - start) / steps)
    return seconds


def _block(outputs: Any) -> None:
    """Waits for every output still alive: a donated state's earlier versions are deleted,
    and the live last one depends on them all."""
    jax.block_until_ready([x for x in jax.tree.leaves(outputs) if not x.is_deleted()])


@dataclasses.dataclass
class Setup:
    """The config's model, steps and a random batch, placed as the training code places them."""

    config: ml_collections.ConfigDict
    model_cfg: Any
    tokens_per_step: int
    tokens: jax.Array
    valid: jax.Array
    state: Any  # the current TrainState; the step donates it, so variants replace it
    train_fn: Callable
    bare_fn: Callable
    eval_fn: Callable
    analysis_fn: Callable | None  # None for the autoregressive baseline (no tier 3)
    is_diffusion: bool
    mesh: Any

    def step(self, fn: Callable, **kwargs) -> Callable[[], Any]:
        """A variant that advances `state` by one step of `fn` and returns the new state."""
        def run():
            result = fn(self.state, self.tokens, self.valid, **kwargs)
            self.state = result[0] if isinstance(result, tuple) else result
            return self.state
        return run

    def analysis(self) -> Callable[[], Any]:
        rng = step_lib.step_rng(self.state.rng, self.state.step)
        return lambda: self.analysis_fn(self.state.params, self.tokens, self.valid, rng, self.state.time_proposal,
                                        self.state.step)


def shape_tokenizer(name: str) -> Any:
    """A tokenizer, or for `bpe:<n>` (trained per run) its id layout: only sizes matter here."""
    kind, arg = tokenizer_lib.parse_name(name)
    if kind == "bpe":  # 256 bytes, EOS and merges up to n ids, then [MASK] and [PAD]
        return tokenizer_lib.special_ids(int(arg), eos_id=256)
    return tokenizer_lib.get_tokenizer(name)


def build_setup(config: ml_collections.ConfigDict, seed: int = 0) -> Setup:
    """Builds the config's train, bare and analysis steps the way `training.setup.build_run` does."""
    config_lib.validate(config, num_devices=jax.device_count(), process_count=jax.process_count())
    mesh = sharding.make_mesh(mesh_shape=config.sharding.mesh_shape)
    tok = shape_tokenizer(config.data.tokenizer)
    graphdef, params, optimizer, lr_schedule = build_model_and_optimizer(config, tok)
    model_cfg = config_lib.model_config(config, vocab_size=tok.vocab_size, num_predictable=tok.text_vocab_size)
    state = initial_state(config, params, optimizer, mesh)
    state_shardings = sharding.state_shardings(mesh, state)
    tc = config.training
    static = train_step_statics(config, graphdef, optimizer, lr_schedule, tok.mask_id, mesh)
    train_fn, eval_fn, analysis_fn = jitted_steps(config, mesh, state, static)
    bare_fn = jax.jit(lambda s, t, v: step_lib.train_step(s, t, v, detailed=False, **static)[0],
                      donate_argnums=(0,), out_shardings=state_shardings)
    is_diffusion = config.model.kind == "diffusion"
    rng = np.random.default_rng(seed)
    shape = (tc.batch_size, config.data.seq_len)
    rows = tc.batch_size // jax.process_count()  # each host feeds its own rows
    local = {"tokens": rng.integers(0, tok.text_vocab_size, shape).astype(np.int32)[:rows],
             "valid": np.ones(shape, bool)[:rows]}
    batch = sharding.global_batch(local, mesh)
    return Setup(config=config, model_cfg=model_cfg, tokens_per_step=shape[0] * shape[1], tokens=batch["tokens"],
                 valid=batch["valid"], state=state, train_fn=train_fn, bare_fn=bare_fn, eval_fn=eval_fn,
                 analysis_fn=analysis_fn, is_diffusion=is_diffusion, mesh=mesh)


def default_matmul(platform: str) -> tuple[int, Any, int]:
    """(size, dtype, chain) of the peak-measuring matmul: f32 on CPU, bf16 on accelerators."""
    return (2048, jnp.float32, 1) if platform == "cpu" else (8192, jnp.bfloat16, 8)


@dataclasses.dataclass(frozen=True)
class Timed:
    """Seconds per call of each variant and repeat, and the peak they are measured against."""

    seconds: dict[str, list[float]]
    peak: Peak
    rates_by_layout: dict[str, list[float]] | None  # the matmul's FLOP/s per repeat, where measured
    matmul_rates: list[float] | None  # per repeat, the faster layout's


def time_against_peak(variants: Mapping[str, Callable[[], Any]], *, steps: int, repeats: int,
                      peak_tflops: float = 0.0, matmul: tuple[int, Any, int] | None = None) -> Timed:
    """Times `variants` round-robin and, unless the peak is known, the matmul in every layout
    beside them: each repeat's matmul rate is its faster layout's, the peak the best repeat's."""
    device = jax.devices()[0]
    needs_measure = peak_tflops <= 0 and (device.platform == "cpu" or known_peak(device.device_kind) is None)
    variants = dict(variants)
    if needs_measure:
        size, dtype, chain = matmul or default_matmul(device.platform)
        for layout in MATMUL_LAYOUTS:
            variants[layout], matmul_flops = matmul_fn(size, dtype, chain, layout)
    seconds = time_round_robin(variants, steps=steps, repeats=repeats)
    if not needs_measure:
        return Timed(seconds, peak_for_device(device, jax.device_count(), None, peak_tflops), None, None)
    rates_by_layout = {layout: [matmul_flops / t for t in seconds.pop(layout)] for layout in MATMUL_LAYOUTS}
    matmul_rates = [max(rates) for rates in zip(*rates_by_layout.values())]
    peak = peak_for_device(device, jax.device_count(), lambda: max(matmul_rates), peak_tflops)
    return Timed(seconds, peak, rates_by_layout, matmul_rates)


def run_train(setup: Setup, *, steps: int, repeats: int, peak_tflops: float = 0.0,
              matmul: tuple[int, Any, int] | None = None) -> dict[str, Any]:
    """Times the ordinary train step (and, unless the peak is known, a matmul beside it)."""
    timed = time_against_peak({"step": setup.step(setup.train_fn, detailed=False)}, steps=steps,
                              repeats=repeats, peak_tflops=peak_tflops, matmul=matmul)
    seconds, peak, matmul_rates = timed.seconds, timed.peak, timed.matmul_rates
    step_seconds = float(np.median(seconds["step"]))
    # On a shared machine the load drifts: the MFU of each repeat against the matmul timed
    # right after it is steadier than the median step against the best matmul.
    paired = matmul_rates if jax.devices()[0].platform == "cpu" else None  # elsewhere the peak is per device
    cfg, seq_len = setup.model_cfg, setup.config.data.seq_len
    flops_per_token = flops_lib.train_flops_per_token(cfg, seq_len)
    tokens_per_second = setup.tokens_per_step / step_seconds
    # The compiled (already cached) step's own count; XLA reports one device's program.
    compiled = setup.train_fn.lower(setup.state, setup.tokens, setup.valid, detailed=False).compile()
    xla_flops = (compiled.cost_analysis() or {}).get("flops")
    xla_flops = xla_flops * jax.device_count() if xla_flops else None
    if setup.config.training.get("grad_accum_steps", 1) > 1:
        xla_flops = None  # XLA counts the body of the accumulation loop once, not once per microbatch
    return {
        "step_seconds": step_seconds,
        "step_seconds_by_repeat": seconds["step"],
        "matmul_flops_per_second_by_repeat": matmul_rates,
        "matmul_flops_per_second_by_layout": timed.rates_by_layout,
        "tokens_per_step": setup.tokens_per_step,
        "tokens_per_second": tokens_per_second,
        "matmul_params": flops_lib.matmul_params(cfg),
        "attention_flops_per_token": 3 * flops_lib.attention_flops_per_token(cfg, seq_len),
        "flops_per_token": flops_per_token,
        "xla_flops_per_token": xla_flops / setup.tokens_per_step if xla_flops else None,  # all devices
        "model_flops_per_second": flops_per_token * tokens_per_second,
        "peak_flops_per_second": peak.flops_per_second,
        "peak_source": peak.source,
        "mfu": flops_lib.mfu(flops_per_token, tokens_per_second, peak.flops_per_second),
        "mfu_paired_median": float(np.median([
            flops_lib.mfu(flops_per_token, setup.tokens_per_step / step, matmul)
            for step, matmul in zip(seconds["step"], paired)])) if paired else None,
    }


def run_tiers(setup: Setup, *, steps: int, repeats: int) -> dict[str, float]:
    """Median seconds of the bare, ordinary (tier 1), detailed (tier 2) and analysis (tier 3)
    calls, timed round-robin, and each tier's cost as a ratio to the bare step."""
    variants = {"bare": setup.step(setup.bare_fn), "ordinary": setup.step(setup.train_fn, detailed=False)}
    if setup.is_diffusion:  # the autoregressive baseline has no tier 2 or 3
        variants["detailed"] = setup.step(setup.train_fn, detailed=True)
        variants["analysis"] = setup.analysis()
    seconds = {name: float(np.median(t)) for name, t in
               time_round_robin(variants, steps=steps, repeats=repeats).items()}
    result = {f"{name}_seconds": value for name, value in seconds.items()}
    result["tier1_ratio"] = seconds["ordinary"] / seconds["bare"]
    if setup.is_diffusion:
        result["tier2_ratio"] = seconds["detailed"] / seconds["bare"]
        result["tier3_ratio"] = seconds["analysis"] / seconds["bare"]
    return result


def run_data(setup: Setup, *, steps: int, repeats: int, num_batches: int, workdir: str) -> dict[str, Any]:
    """The input pipeline's tokens per second against the train step's consumption."""
    pipeline = throughput.pipeline_tokens_per_second(setup.config, num_batches=num_batches, workdir=workdir)
    seconds = time_round_robin({"step": setup.step(setup.train_fn, detailed=False)}, steps=steps, repeats=repeats)
    consumed = setup.tokens_per_step / float(np.median(seconds["step"]))
    produced = float(pipeline["tokens_per_second"])
    return {"pipeline": pipeline, "pipeline_tokens_per_second": produced, "step_tokens_per_second": consumed,
            "pipeline_to_step_ratio": produced / consumed}


def run_memory(setup: Setup) -> dict[str, Any]:
    """Every program a run of the config would use, compiled (not run) as the run compiles them
    before its first step (`tdlm_jax.training.programs`), and the memory XLA assigns each."""
    config = setup.config
    variants = [programs.TRAIN, programs.DETAILED, programs.EVAL, programs.ANALYSIS]
    if not setup.is_diffusion:
        variants = [programs.TRAIN, programs.EVAL]
    compiled = programs.compile_programs(config, setup.mesh, setup.state, train_fn=setup.train_fn,
                                         eval_fn=setup.eval_fn, analysis_fn=setup.analysis_fn, variants=variants,
                                         announce=lambda label: contextlib.nullcontext())
    capacity, source = programs.device_capacity(jax.devices()[0])
    return {"programs": list(compiled.values()), "capacity": capacity, "source": source}
