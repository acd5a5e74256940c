"""Building a run: validate the config, build data, model, optimizer and the jitted steps,
and restore the newest usable checkpoint. Nothing here steps or writes metrics.

`build_model_and_optimizer`, `initial_state` and `train_step_statics` are shared with the
benchmark and with loading a trained run, so all three build exactly the model that trains.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from tdlm_jax.data import dataset, tokenizer as tokenizer_lib
from tdlm_jax.errors import CheckpointError
from tdlm_jax.metrics import research
from tdlm_jax.model.transformer import Denoiser
from tdlm_jax.parallel import sharding
from tdlm_jax.training import checkpoint, optim
from tdlm_jax.training import config as config_lib
from tdlm_jax.training import step as step_lib

CHECKPOINTS = "checkpoints"  # the subdirectory of the workdir that holds them


@dataclasses.dataclass
class Data:
    """The run's data: a resumable training iterator and fixed validation batches."""

    train_iterator: Any
    eval_batches: list[dict[str, jax.Array]]


@dataclasses.dataclass
class Run:
    """Everything built at start-up, before the first step; it does not change while training."""

    mesh: Any
    tokenizer: tokenizer_lib.Tokenizer
    graphdef: Any
    data: Data
    initial_state: step_lib.TrainState  # restored from the latest checkpoint, or fresh
    train_fn: Callable
    eval_fn: Callable
    analysis_fn: Callable | None  # None for the autoregressive baseline: no tier 3
    eval_rng: jax.Array
    checkpointer: checkpoint.Checkpointer
    start_step: int
    log_state: dict | None  # the metric log saved with the restored checkpoint (None: fresh, or older)
    is_diffusion: bool  # False for the autoregressive baseline: no tier-2/3 metrics

    def close(self, wait: bool = True) -> None:
        """Waits for a checkpoint save in flight (unless not `wait`: a second Ctrl-C, where a
        half-written checkpoint is never trusted), and stops grain's worker processes, if any."""
        try:
            if wait:
                self.checkpointer.close()
        finally:
            self.data.train_iterator.close()


def build_data(config: ml_collections.ConfigDict, tok: tokenizer_lib.Tokenizer, mesh) -> Data:
    """Loads, splits, tokenizes (once, into the token cache) and packs `data.source` (see
    tdlm_jax.data.dataset); the training iterator reads windows from the cache lazily."""
    built = dataset.build_training_data(config, tok, process_index=jax.process_index(),
                                        process_count=jax.process_count())
    # Every host builds the same fixed validation batches; each feeds its own rows.
    rows = config.data.eval_batch_size // jax.process_count()
    first = jax.process_index() * rows
    eval_batches = [sharding.global_batch({k: v[first:first + rows] for k, v in b.items()}, mesh)
                    for b in built.eval_batches]
    return Data(train_iterator=built.train_iterator, eval_batches=eval_batches)


def build_model_and_optimizer(config: ml_collections.ConfigDict, tok: tokenizer_lib.Tokenizer):
    """(graphdef, initial params, optimizer, learning-rate schedule) as the config defines them."""
    model_cfg = config_lib.model_config(config, vocab_size=tok.vocab_size, num_predictable=tok.text_vocab_size)
    graphdef, params = nnx.split(Denoiser(model_cfg, nnx.Rngs(config.seed)))
    tc = config.training
    lr_schedule = optim.learning_rate_schedule(tc.learning_rate, tc.num_steps, tc.warmup_steps,
                                               tc.decay_schedule, tc.min_learning_rate_ratio)
    optimizer = optim.make_optimizer(lr_schedule, weight_decay=tc.weight_decay, b1=tc.adam_b1,
                                     b2=tc.adam_b2, grad_clip_norm=tc.grad_clip_norm)
    return graphdef, params, optimizer, lr_schedule


def fresh_state(config: ml_collections.ConfigDict, params: Any, optimizer: Any) -> step_lib.TrainState:
    """The state before the first step (with an EMA of the parameters when training.ema_decay > 0)."""
    adaptive = config.model.kind == "diffusion" and config.diffusion.time_sampling == "adaptive"
    return step_lib.init_state(params, optimizer, config.seed, ema=config_lib.ema_decay(config) > 0,
                               proposal_bins=config.diffusion.adaptive_bins if adaptive else 0)


def initial_state(config: ml_collections.ConfigDict, params: Any, optimizer: Any, mesh: Any) -> step_lib.TrainState:
    """A fresh train state placed on the mesh: FSDP-sharded over its fsdp axis (replicated when
    that is 1), the layout a restore keeps."""
    return sharding.place_state(fresh_state(config, params, optimizer), mesh)


def train_step_statics(config: ml_collections.ConfigDict, graphdef: Any, optimizer: Any, lr_schedule: Callable,
                       mask_id: int, mesh: Any) -> dict[str, Any]:
    """The static arguments of `step.train_step` a config defines on `mesh` (whose every
    device holds a share of the batch): one place for training and the benchmark, so the
    benchmark times exactly the step that trains."""
    grad_accum_steps = config.training.get("grad_accum_steps", 1)
    process = config_lib.forward_process(config, mask_id, microbatches=grad_accum_steps, shards=mesh.size)
    device = mesh.local_devices[0]
    row_gradient_bytes = research.row_gradient_budget(config.metrics.get("row_gradient_mb", 0), device)
    accum_unroll = step_lib.accumulation_unroll(config.training.get("grad_accum_unroll", 0), device)
    return dict(graphdef=graphdef, process=process, optimizer=optimizer, lr_schedule=lr_schedule,
                objective=config.model.kind, grad_accum_steps=grad_accum_steps, ema_decay=config_lib.ema_decay(config),
                row_gradient_bytes=row_gradient_bytes, accum_unroll=accum_unroll)


def jitted_steps(config: ml_collections.ConfigDict, mesh: Any, state: Any, static: dict[str, Any]
                 ) -> tuple[Callable, Callable, Callable | None]:
    """The run's jitted (train, eval, analysis) steps for `state`'s placement, from the
    `train_step_statics`; no analysis (None) for the autoregressive baseline. Shared with the
    benchmark, so it times and measures exactly the programs that train."""
    graphdef, process, objective = static["graphdef"], static["process"], static["objective"]
    train_fn = step_lib.jit_train_step(mesh, sharding.state_shardings(mesh, state), **static)
    eval_fn = step_lib.jit_eval_step(mesh, graphdef=graphdef, objective=objective,
                                     process=process.for_evaluation(config.data.eval_batch_size))
    analysis_fn = (step_lib.jit_analysis_step(mesh, graphdef=graphdef, process=process,
                                              max_rows=config.training.analysis_rows)
                   if objective == "diffusion" else None)
    return train_fn, eval_fn, analysis_fn


def build_run(config: ml_collections.ConfigDict, workdir: str) -> Run:
    """Builds data, model and steps of a validated config, and restores the latest checkpoint."""
    mesh = sharding.make_mesh(mesh_shape=config.sharding.mesh_shape)
    tok = dataset.build_tokenizer(config.data, workdir)  # bpe:<n> trains (or reloads) it in the workdir
    data = build_data(config, tok, mesh)
    graphdef, params, optimizer, lr_schedule = build_model_and_optimizer(config, tok)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    logging.info("denoiser: %s parameters on %d device(s) of %d process(es), mesh %s", f"{num_params:,}",
                 jax.device_count(), jax.process_count(), dict(mesh.shape))
    state = initial_state(config, params, optimizer, mesh)
    static = train_step_statics(config, graphdef, optimizer, lr_schedule, tok.mask_id, mesh)
    checkpointer = checkpoint.Checkpointer(os.path.join(workdir, CHECKPOINTS),
                                           max_to_keep=config.training.max_checkpoints_to_keep)
    start_step, state, log_state = restore_latest_usable(checkpointer, state, data.train_iterator)
    train_fn, eval_fn, analysis_fn = jitted_steps(config, mesh, state, static)
    return Run(
        mesh=mesh, tokenizer=tok, graphdef=graphdef, data=data, initial_state=state, train_fn=train_fn,
        eval_fn=eval_fn, analysis_fn=analysis_fn, eval_rng=jax.random.fold_in(jax.random.key(config.seed), 0x5EED),
        checkpointer=checkpointer, start_step=start_step, log_state=log_state,
        is_diffusion=static["objective"] == "diffusion")


def abstract_like(state: Any, sharding_of: Callable[[Any], Any]) -> Any:
    """`state` as `jax.ShapeDtypeStruct`s placed by `sharding_of(leaf)`: what a restore fills."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_of(x)), state)


def restore_latest_usable(checkpointer: checkpoint.Checkpointer, state: step_lib.TrainState, data_iterator: Any
                          ) -> tuple[int, step_lib.TrainState, dict | None]:
    """(step, state, metric-log state) of the newest checkpoint that restores, or (0, state,
    None) if there is none.

    Newer checkpoints that cannot be read (a kill during a save, a truncated file) are moved
    aside with a warning naming them, but only once an older one has restored: if none
    restores, nothing is moved and the error is raised, so a run never starts over from
    step 0 silently.
    """
    abstract = abstract_like(state, lambda x: x.sharding)
    unreadable: list[tuple[int, CheckpointError]] = []
    for step in reversed(checkpointer.all_steps()):
        try:
            restored = checkpointer.restore(step, abstract, data_iterator)
            log_state = checkpointer.restore_log(step)
        except checkpoint.ProcessCountMismatch:
            raise  # every checkpoint of the run has the same count: none would restore
        except CheckpointError as e:
            unreadable.append((step, e))
            continue
        for bad_step, error in unreadable:
            moved = checkpointer.quarantine(bad_step)
            logging.warning("checkpoint %d is unreadable (%s); moved it to %s and resumed from step %d",
                            bad_step, error, moved, step)
        logging.info("resumed from %s at step %d", checkpointer.step_directory(step), step)
        return step, restored, log_state
    if unreadable:
        raise unreadable[0][1]
    return 0, state, None
