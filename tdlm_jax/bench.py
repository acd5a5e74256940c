"""Step-time benchmark: `python -m tdlm_jax.bench [--config=configs/base.py] [--steps=20]`.

Prints the cost of the metrics tiers as ratios of step times, on the config's model and
batch shapes (random tokens; only shapes matter for speed):
- bare: the train step with its outputs other than the new state discarded, so XLA
  removes every metric computation: loss, gradient and update only;
- ordinary: the step as it runs on most steps, with tier-1 metrics;
- detailed: the research variant, with tier-2 metrics and per-bucket gradients.
"""

from __future__ import annotations

import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from tdlm_jax import config as config_lib
from tdlm_jax import sharding
from tdlm_jax import step as step_lib
from tdlm_jax.data.tokenizer import get_tokenizer
from tdlm_jax.errors import TdlmError
from tdlm_jax.train import build_model_and_optimizer

_CONFIG = config_flags.DEFINE_config_file("config", "configs/base.py", "Config whose shapes to benchmark.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per variant and repeat.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Repeats per variant; the median is reported.")


def time_variants(variants: dict, state, batch, steps: int, repeats: int) -> dict[str, float]:
    """Median seconds per step of each variant.

    All variants are compiled first, then timed round-robin, `steps` steps at a time, so
    that drift in the machine's speed affects every variant alike.
    """
    for fn in variants.values():  # compile and warm up
        state = fn(state, batch["tokens"], batch["valid"])
    jax.block_until_ready(state)
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            for _ in range(steps):
                state = fn(state, batch["tokens"], batch["valid"])
            jax.block_until_ready(state)
            times[name].append((time.perf_counter() - start) / steps)
    return {name: float(np.median(t)) for name, t in times.items()}


def main(argv: list[str]) -> None:
    del argv
    try:
        run_benchmark(_CONFIG.value)
    except TdlmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run_benchmark(config) -> None:
    """Times the bare, ordinary and detailed steps of `config` and prints the ratios."""
    config_lib.validate(config, num_devices=jax.device_count())
    mesh = sharding.make_mesh()
    tok = get_tokenizer(config.data.tokenizer)
    graphdef, params, optimizer, schedule = build_model_and_optimizer(config, tok)
    tc = config.training
    process = config_lib.forward_process(config, tok.mask_id)
    step = step_lib.jit_train_step(mesh, graphdef=graphdef, process=process, optimizer=optimizer,
                                   lr_schedule=schedule)
    bare = jax.jit(lambda s, t, v: step_lib.train_step(s, t, v, graphdef=graphdef, process=process,
                                                         optimizer=optimizer, lr_schedule=schedule,
                                                         detailed=False)[0],
                   donate_argnums=(0,), out_shardings=sharding.replicated(mesh))
    variants = {
        "bare": bare,
        "ordinary": lambda s, t, v: step(s, t, v, detailed=False)[0],
        "detailed": lambda s, t, v: step(s, t, v, detailed=True)[0],
    }
    rng = np.random.default_rng(0)
    shape = (tc.batch_size, config.data.seq_len)
    batch = sharding.global_batch({"tokens": rng.integers(0, tok.text_vocab_size, shape).astype(np.int32),
                                   "valid": np.ones(shape, bool)}, mesh)
    state = sharding.replicate(step_lib.init_state(params, optimizer, config.seed), mesh)
    seconds = time_variants(variants, state, batch, _STEPS.value, _REPEATS.value)
    print(f"config: {config_flags.get_config_filename(flags.FLAGS['config'])}  batch {shape[0]} x {shape[1]}, "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s), time sampling "
          f"{config.diffusion.time_sampling}")
    for name, value in seconds.items():
        print(f"  {name:<9} {1000 * value:9.2f} ms/step")
    print(f"tier-1 overhead   ordinary / bare     = {seconds['ordinary'] / seconds['bare']:.3f}")
    print(f"tier-2 cost       detailed / ordinary = {seconds['detailed'] / seconds['ordinary']:.3f}")


if __name__ == "__main__":
    app.run(main)
