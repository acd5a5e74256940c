"""Command line: `python -m tdlm_jax.bench --config=configs/base.py [--mode=train|tiers|data|memory]`.

Runs the config's real train step on random tokens and prints (`tdlm_jax.training.benchmark`):
- `train` (the default): step time, tokens per second, model FLOPs per token and MFU;
- `tiers`: the cost of the metric tiers as ratios to a bare step;
- `data`: the input pipeline's tokens per second next to the train step's consumption;
- `memory`: the memory per device of every program a run compiles before its first step
  (ordinary and detailed train steps, evaluation, the tier-3 analysis), without training.
Variants are timed round-robin, so compare the ratios of one run. Errors a user can cause
print one line and exit with status 2.
"""

from __future__ import annotations

import sys
import tempfile
from typing import Any, Mapping

import jax
from absl import app, flags
from ml_collections import config_flags

from tdlm_jax.errors import TdlmError
from tdlm_jax.training import programs
from tdlm_jax.training.benchmark import MODES, Setup, build_setup, run_data, run_memory, run_tiers, run_train


def describe(setup: Setup) -> str:
    config, device = setup.config, jax.devices()[0]
    return (f"batch {config.training.batch_size} x {config.data.seq_len}, model d={config.model.d_model} "
            f"layers={config.model.num_layers} heads={config.model.num_heads} mlp={config.model.mlp_dim} "
            f"vocab={setup.model_cfg.vocab_size} {config.model.dtype}; {jax.device_count()} {device.platform} "
            f"device(s) ({device.device_kind})")


def print_train(r: Mapping[str, Any]) -> None:
    print(f"  step time          {1000 * r['step_seconds']:10.2f} ms  (median of repeats)")
    print(f"  tokens/s           {r['tokens_per_second']:10.0f}  ({r['tokens_per_step']} tokens/step)")
    print(f"  FLOPs/token        {r['flops_per_token']:10.4g}  = 6·N + attention: N = {r['matmul_params']:,} "
          f"matmul params (blocks + head, no embedding), attention {r['attention_flops_per_token']:.4g}")
    if r["xla_flops_per_token"]:
        print(f"  XLA FLOPs/token    {r['xla_flops_per_token']:10.4g}  (XLA's cost analysis of the compiled "
              "step, all devices: elementwise work and the optimizer included)")
    print(f"  model FLOP/s       {r['model_flops_per_second'] / 1e9:10.2f} GFLOP/s")
    print(f"  peak               {r['peak_flops_per_second'] / 1e9:10.2f} GFLOP/s  ({r['peak_source']})")
    print(f"  MFU                {100 * r['mfu']:10.1f} %  (median step against the best matmul)")
    if r["mfu_paired_median"] is not None:
        print(f"  MFU, paired        {100 * r['mfu_paired_median']:10.1f} %  (median over repeats of each repeat's "
              "step against the matmul timed after it)")


def print_tiers(r: Mapping[str, float]) -> None:
    for name in ("bare", "ordinary", "detailed", "analysis"):
        if f"{name}_seconds" in r:
            print(f"  {name:<9} {1000 * r[f'{name}_seconds']:10.2f} ms/call")
    print(f"  tier 1 overhead   ordinary / bare = {r['tier1_ratio']:.3f}")
    if "tier2_ratio" in r:
        print(f"  tier 2 cost       detailed / bare = {r['tier2_ratio']:.3f}")
        print(f"  tier 3 cost       analysis / bare = {r['tier3_ratio']:.3f}")


def print_memory(r: Mapping[str, Any]) -> None:
    for line in programs.memory_table(r["programs"], r["capacity"], r["source"]):
        print(line)


def print_data(r: Mapping[str, Any]) -> None:
    print(f"  pipeline           {r['pipeline_tokens_per_second']:12.0f} tokens/s")
    print(f"  train step         {r['step_tokens_per_second']:12.0f} tokens/s")
    print(f"  pipeline / step    {r['pipeline_to_step_ratio']:12.2f}  (below 1: the input pipeline limits training)")


_CONFIG = config_flags.DEFINE_config_file("config", "configs/base.py", "Config whose shapes to benchmark.")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to measure.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed calls per variant and repeat.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Repeats per variant; the median is reported.")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Per-device peak TFLOP/s to use instead of the table or a measurement.")
_BATCHES = flags.DEFINE_integer("num_batches", 50, "data mode: pipeline batches to time.")
_WORKDIR = flags.DEFINE_string("tokenizer_workdir", "", "data mode: where a bpe:<n> tokenizer is (or gets) trained; "
                               "default a temporary directory.")


def main(argv: list[str]) -> None:
    del argv
    try:
        config = _CONFIG.value
        setup = build_setup(config)
        print(f"config {config_flags.get_config_filename(flags.FLAGS['config'])}: {describe(setup)}")
        if _MODE.value == "train":
            print_train(run_train(setup, steps=_STEPS.value, repeats=_REPEATS.value, peak_tflops=_PEAK.value))
        elif _MODE.value == "tiers":
            print_tiers(run_tiers(setup, steps=_STEPS.value, repeats=_REPEATS.value))
        elif _MODE.value == "memory":
            print_memory(run_memory(setup))
        else:
            with tempfile.TemporaryDirectory() as tmp:
                print_data(run_data(setup, steps=_STEPS.value, repeats=_REPEATS.value,
                                    num_batches=_BATCHES.value, workdir=_WORKDIR.value or tmp))
    except TdlmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
