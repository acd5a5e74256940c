"""Command line: `python -m tdlm_jax.bench --config=configs/base.py [--mode=train|tiers|data|memory|dots]`.

Runs the config's real train step on random tokens and prints (`tdlm_jax.training.benchmark`):
- `train` (the default): step time, tokens per second, model FLOPs per token and MFU;
- `tiers`: the cost of the metric tiers as ratios to a bare step;
- `data`: the input pipeline's tokens per second next to the train step's consumption;
- `memory`: the memory per device of every program a run compiles before its first step
  (ordinary and detailed train steps, evaluation, the tier-3 analysis), without training;
- `dots`: every matmul of the ordinary step timed alone, their sum against the step, and
  both as fractions of the peak: what bounds MFU (`tdlm_jax.training.dot_bound`).
Variants are timed round-robin, so compare the ratios of one run. `--json=FILE` also
appends the figures to FILE as one JSON line (the config, its overrides, the device, the
jax version), for scripts that collect many runs. `--suite=gpu --out=DIR` runs the GPU
figures of docs/performance.md, one bench process per variant (`training.bench_suite`).
Errors a user can cause print one line and exit with status 2.
"""

from __future__ import annotations

import json
import sys
import tempfile
from typing import Any, Mapping

import jax
from absl import app, flags
from ml_collections import config_flags

from tdlm_jax.errors import ConfigError, TdlmError
from tdlm_jax.model.transformer import resolve_attention_impl
from tdlm_jax.training import bench_suite, programs
from tdlm_jax.training.dot_bound import run_dots
from tdlm_jax.training.benchmark import MODES, Setup, build_setup, run_data, run_memory, run_tiers, run_train


def describe(setup: Setup) -> str:
    config, cfg, device = setup.config, setup.model_cfg, jax.devices()[0]
    attention = resolve_attention_impl(cfg.attention_impl, cfg.dtype, cfg.head_dim, config.data.seq_len)
    return (f"batch {config.training.batch_size} x {config.data.seq_len}, model d={config.model.d_model} "
            f"layers={config.model.num_layers} heads={config.model.num_heads} mlp={config.model.mlp_dim} "
            f"vocab={cfg.vocab_size} {config.model.dtype}, {attention} attention; {jax.device_count()} "
            f"{device.platform} device(s) ({device.device_kind})")


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
    if r["matmul_flops_per_second_by_layout"]:
        best = ", ".join(f"{layout} {max(rates) / 1e9:.1f}" for layout, rates in r["matmul_flops_per_second_by_layout"].items())
        print(f"  matmul layouts     {best} GFLOP/s  (best repeat of each)")
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


def print_dots(r: Mapping[str, Any]) -> None:
    for row in r["dots"]:
        print(f"  {row['count']:5d} x {1000 * row['seconds']:8.3f} ms  {row['flops_per_second'] / 1e9:8.1f} GFLOP/s  "
              f"{row['dot']}")
    print(f"  matmuls alone      {1000 * r['dots_alone_seconds']:10.2f} ms/step  "
          f"({100 * r['dots_alone_fraction_of_peak']:.1f} % of the peak: the MFU of a step that ran only "
          "these, one after another)")
    print(f"  the step           {1000 * r['step_seconds']:10.2f} ms  "
          f"(its matmuls at {100 * r['step_dot_fraction_of_peak']:.1f} % of the peak; "
          f"matmuls alone / step = {r['dots_alone_seconds'] / r['step_seconds']:.3f}; above 1, XLA "
          "overlaps independent ops)")
    print(f"  peak               {r['peak_flops_per_second'] / 1e9:10.2f} GFLOP/s  ({r['peak_source']})")


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
_JSON = flags.DEFINE_string("json", "", "Also append the figures to this file as one JSON line.")
_SUITE = flags.DEFINE_enum("suite", None, ["gpu"], "gpu: the GPU figures of docs/performance.md, one bench process "
                           "per variant (training.bench_suite), into --out; --config defaults to owt_gpt2_small.")
_OUT = flags.DEFINE_string("out", "", "suite: the folder for log.txt, figures.jsonl, figures.md and env.txt.")
_BUDGET = flags.DEFINE_float("budget_s", 450.0, "suite: seconds for all its runs together.")
_SUITE_RUNS = flags.DEFINE_list("suite_runs", [], "suite: only these runs (default all: "
                                + ", ".join(name for name, _, _ in bench_suite.RUNS) + ").")
_WHEELS = flags.DEFINE_string("fetch_wheels", "", "Download the wheels the GPU machine lacks "
                              "(bench_suite.CARRIED, for its jax 0.11) into this folder, and stop.")


def json_record(setup: Setup, mode: str, figures: Mapping[str, Any]) -> dict[str, Any]:
    """What `--json` appends: the figures and what they were measured on."""
    if mode == "memory":  # compiled programs are not data: keep the table the command prints
        figures = {"table": programs.memory_table(figures["programs"], figures["capacity"], figures["source"])}
    device = jax.devices()[0]
    return {"config": config_flags.get_config_filename(flags.FLAGS["config"]),
            "overrides": [a for a in sys.argv[1:] if a.startswith("--config.")], "mode": mode,
            "setup": describe(setup), "platform": device.platform, "device_kind": device.device_kind,
            "device_count": jax.device_count(), "jax": jax.__version__, "figures": dict(figures)}


def append_json(path: str, record: Mapping[str, Any]) -> None:
    plain = lambda x: x.item() if hasattr(x, "item") else str(x)  # numpy and jax scalars; anything else as text
    with open(path, "a") as f:
        f.write(json.dumps(record, default=plain) + "\n")


def run_suite() -> None:
    """`--suite=gpu`: the suite in processes of its own; this one never touches the GPU."""
    if not _OUT.value:
        raise ConfigError("--suite=gpu needs --out=DIR, the folder its figures go to")
    unknown = set(_SUITE_RUNS.value) - {name for name, _, _ in bench_suite.RUNS}
    if unknown:
        raise ConfigError(f"--suite_runs: no run named {', '.join(sorted(unknown))}: "
                          f"choose from {', '.join(name for name, _, _ in bench_suite.RUNS)}")
    config = flags.FLAGS["config"]
    print("\n".join(bench_suite.run_suite(
        _OUT.value, budget=_BUDGET.value, only=_SUITE_RUNS.value,
        config=config_flags.get_config_filename(config) if config.present else bench_suite.DEFAULT_CONFIG,
        overrides=[a for a in sys.argv[1:] if a.startswith("--config.")])))


def main(argv: list[str]) -> None:
    del argv
    try:
        if _WHEELS.value:
            return bench_suite.fetch_wheels(_WHEELS.value)
        if _SUITE.value:
            return run_suite()
        config = _CONFIG.value
        setup = build_setup(config)
        print(f"config {config_flags.get_config_filename(flags.FLAGS['config'])}: {describe(setup)}")
        if _MODE.value == "train":
            figures = run_train(setup, steps=_STEPS.value, repeats=_REPEATS.value, peak_tflops=_PEAK.value)
            print_train(figures)
        elif _MODE.value == "tiers":
            figures = run_tiers(setup, steps=_STEPS.value, repeats=_REPEATS.value)
            print_tiers(figures)
        elif _MODE.value == "memory":
            figures = run_memory(setup)
            print_memory(figures)
        elif _MODE.value == "dots":
            figures = run_dots(setup, steps=_STEPS.value, repeats=_REPEATS.value, peak_tflops=_PEAK.value)
            print_dots(figures)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                figures = run_data(setup, steps=_STEPS.value, repeats=_REPEATS.value,
                                   num_batches=_BATCHES.value, workdir=_WORKDIR.value or tmp)
            print_data(figures)
        if _JSON.value:
            append_json(_JSON.value, json_record(setup, _MODE.value, figures))
    except TdlmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
