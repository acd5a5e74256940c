"""A seconds-long configuration for tests and smoke runs: every tier fires within 8 steps."""

import pathlib
import runpy

# Loaded by path, so this file works wherever it is run from (config files are not a package).
_base = runpy.run_path(str(pathlib.Path(__file__).with_name("base.py")))


def get_config():
    config = _base["get_config"]()
    config.data.seq_len = 32
    config.data.eval_batch_size = 8
    config.data.num_eval_batches = 2
    config.model.d_model = 32
    config.model.num_heads = 2
    config.model.num_layers = 2
    config.model.mlp_dim = 64
    config.training.num_steps = 8
    config.training.batch_size = 8
    config.training.grad_accum_steps = 1  # 8 rows are one cache-sized microbatch already
    config.training.warmup_steps = 2
    # A constant rate after warmup: the compiled steps then do not depend on num_steps (a decay
    # bakes it in), so tiny runs of any length, and their resumptions with more steps, share one
    # set of programs in a shared compilation cache. The tests run many such runs.
    config.training.decay_schedule = "constant"
    config.training.logging_steps = 2
    config.training.detailed_metrics_steps = 4
    config.training.attention_analysis_steps = 8
    config.training.eval_every_n_steps = 4
    config.training.checkpoint_every_n_steps = 4
    config.sampling.num_samples_at_eval = 1
    config.sampling.steps = 4
    return config
