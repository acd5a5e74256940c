"""The training loop: init or restore, step, log by tier, evaluate, checkpoint, summarize.

Everything the loop does to the device is asynchronous except on the steps that log: the
tier-1 metrics are summed on the device, and a logging step's values are fetched only
after the next step has been dispatched (as in MaxText), so the host never stalls the
device. Throughput leaves out compilation, evaluation and checkpointing time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from tdlm_jax import checkpoint, sharding
from tdlm_jax import config as config_lib
from tdlm_jax import optim
from tdlm_jax import step as step_lib
from tdlm_jax.data import pipeline, sources, tokenizer as tokenizer_lib
from tdlm_jax.metrics import aggregation, writers
from tdlm_jax.model.transformer import Denoiser


@dataclasses.dataclass
class Data:
    """The run's data: a resumable training iterator and fixed validation batches."""

    train_iterator: Any
    eval_batches: list[dict[str, jax.Array]]


def build_data(config: ml_collections.ConfigDict, tok: tokenizer_lib.ByteTokenizer, mesh) -> Data:
    tokens = tok.encode(sources.load_text(config.data.source))
    train_tokens, val_tokens = sources.split_train_val(tokens, config.data.val_fraction, config.data.seq_len)
    train_iterator = pipeline.make_train_iterator(
        train_tokens, seq_len=config.data.seq_len, global_batch_size=config.training.batch_size,
        seed=config.seed, pad_id=tok.pad_id, process_index=jax.process_index(),
        process_count=jax.process_count())
    eval_batches = pipeline.make_eval_batches(
        val_tokens, seq_len=config.data.seq_len, batch_size=config.data.eval_batch_size,
        num_batches=config.data.num_eval_batches, pad_id=tok.pad_id)
    # Every host builds the same fixed validation batches; each feeds its own rows.
    rows = config.data.eval_batch_size // jax.process_count()
    first = jax.process_index() * rows
    eval_batches = [sharding.global_batch({k: v[first:first + rows] for k, v in b.items()}, mesh)
                    for b in eval_batches]
    return Data(train_iterator=train_iterator, eval_batches=eval_batches)


def evaluate(eval_fn: Callable, params: Any, batches: list[dict], rng: jax.Array) -> dict[str, float | None]:
    """Validation NELBO pooled over the fixed batches, with a fixed key per batch.

    val/loss is Σ w·CE / Σ valid tokens over all batches (nats per token), so successive
    evaluations of the same parameters give the same number.
    """
    sums = [eval_fn(params, b["tokens"], b["valid"], jax.random.fold_in(rng, i)) for i, b in enumerate(batches)]
    total = {k: sum(float(s[k]) for s in jax.device_get(sums)) for k in sums[0]}
    loss = total["nelbo_sum"] / max(total["valid_tokens"], 1.0)
    accuracy = total["correct_tokens"] / total["masked_tokens"] if total["masked_tokens"] else None
    return {"val/loss": loss, "val/perplexity": math.exp(loss), "val/bits_per_token": loss / math.log(2),
            "val/mask_accuracy": accuracy}


def _every(step: int, period: int, last: int) -> bool:
    return step % period == 0 or step == last


class _PendingWrites:
    """Rows whose device values are fetched one step late, after the next step is dispatched."""

    def __init__(self, writer: writers.MetricWriter, tokens_per_step: int):
        self.writer = writer
        self.tokens_per_step = tokens_per_step
        self.rows: list[tuple[int, dict, bool]] = []
        self.last_time = time.perf_counter()
        self.last_step: int | None = None
        self.excluded_seconds = 0.0
        self.last_train_loss: float | None = None

    def add(self, step: int, device_values: dict, is_interval: bool) -> None:
        self.rows.append((step, device_values, is_interval))

    def flush(self) -> None:
        for step, device_values, is_interval in self.rows:
            fetched = jax.device_get(device_values)
            if is_interval:
                row = aggregation.interval_means(fetched)
                row["train/tokens_per_second"] = self._throughput(step)
                self.last_train_loss = row["train/loss"]
            else:
                row = aggregation.to_host_scalars(fetched)
            self.writer.write_scalars(step, row)
        self.rows.clear()

    def start(self, step: int) -> None:
        self.last_step, self.last_time = step, time.perf_counter()

    def _throughput(self, step: int) -> float | None:
        now = time.perf_counter()
        seconds = now - self.last_time - self.excluded_seconds
        steps = step - self.last_step
        self.last_step, self.last_time, self.excluded_seconds = step, now, 0.0
        return steps * self.tokens_per_step / seconds if seconds > 0 and steps > 0 else None


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (or resumes) the run in `workdir` and returns its summary."""
    config_lib.validate(config, num_devices=jax.device_count(), process_count=jax.process_count())
    wall_start = time.time()
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.make_mesh()
    tok = tokenizer_lib.get_tokenizer(config.data.tokenizer)
    data = build_data(config, tok, mesh)
    tc = config.training

    model = Denoiser(config_lib.model_config(config, vocab_size=tok.vocab_size,
                                             num_predictable=tok.text_vocab_size), nnx.Rngs(config.seed))
    graphdef, params = nnx.split(model)
    lr_schedule = optim.learning_rate_schedule(tc.learning_rate, tc.num_steps, tc.warmup_steps,
                                               tc.decay_schedule, tc.min_learning_rate_ratio)
    optimizer = optim.make_optimizer(lr_schedule, weight_decay=tc.weight_decay, b1=tc.adam_b1,
                                     b2=tc.adam_b2, grad_clip_norm=tc.grad_clip_norm)
    state = sharding.replicate(step_lib.init_state(params, optimizer, config.seed), mesh)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    logging.info("denoiser: %s parameters on %d device(s)", f"{num_params:,}", jax.device_count())

    process = config_lib.forward_process(config, tok.mask_id)
    train_fn = step_lib.jit_train_step(mesh, graphdef=graphdef, process=process, optimizer=optimizer,
                                       lr_schedule=lr_schedule)
    eval_fn = step_lib.jit_eval_step(mesh, graphdef=graphdef,
                                     process=process.for_evaluation(config.data.eval_batch_size))
    eval_rng = jax.random.fold_in(jax.random.key(config.seed), 0x5EED)

    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=tc.max_checkpoints_to_keep)
    start_step = ckpt.latest_step() or 0
    if start_step:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        state = ckpt.restore(start_step, abstract, data.train_iterator)
        logging.info("resumed from %s at step %d", ckpt.step_directory(start_step), start_step)

    writer = writers.create_default_writer(workdir)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    writer.write_hparams(config.to_dict())

    best_val = _best_logged_val_loss(workdir, start_step)
    pending = _PendingWrites(writer, tc.batch_size * config.data.seq_len)
    interval = aggregation.empty_interval()
    aggregation.accumulate(interval, {k: jnp.zeros(()) for k in aggregation.TIER1_NAMES})  # compile now
    compiled: set[bool] = set()
    pending.start(start_step)
    step = start_step
    for step in range(start_step + 1, tc.num_steps + 1):
        batch = sharding.global_batch(next(data.train_iterator), mesh)
        detailed = step % tc.detailed_metrics_steps == 0
        if detailed not in compiled:  # a first call compiles: keep it out of the throughput
            tic = _synced_time(state)
            state, metrics = train_fn(state, batch["tokens"], batch["valid"], detailed=detailed)
            pending.excluded_seconds += _synced_time(state) - tic
            compiled.add(detailed)
        else:
            state, metrics = train_fn(state, batch["tokens"], batch["valid"], detailed=detailed)
        pending.flush()  # the previous step's rows: their fetch overlaps this step's compute
        interval = aggregation.accumulate(interval, {k: metrics[k] for k in aggregation.TIER1_NAMES})
        if _every(step, tc.logging_steps, tc.num_steps):
            pending.add(step, interval, is_interval=True)
            interval = aggregation.empty_interval()
        if detailed:
            pending.add(step, {k: v for k, v in metrics.items() if k.startswith("research/")}, is_interval=False)
        if _every(step, tc.eval_every_n_steps, tc.num_steps):
            pending.flush()
            tic = _synced_time(state)
            val = evaluate(eval_fn, state.params, data.eval_batches, eval_rng)
            writer.write_scalars(step, val)
            best_val = min(best_val, val["val/loss"])
            pending.excluded_seconds += time.perf_counter() - tic
        if _every(step, tc.checkpoint_every_n_steps, tc.num_steps):
            tic = _synced_time(state)
            ckpt.save(step, state, data.train_iterator)
            pending.excluded_seconds += time.perf_counter() - tic
    pending.flush()
    ckpt.close()

    summary = {
        "summary/training_time_hours": (time.time() - wall_start) / 3600.0,
        "summary/total_steps": float(step),
        "summary/final_loss": pending.last_train_loss,
        "summary/best_val_loss": best_val if math.isfinite(best_val) else None,
    }
    writer.write_scalars(step, summary)
    writer.close()
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def _synced_time(state: step_lib.TrainState) -> float:
    """The time once the device has finished all work queued so far."""
    jax.block_until_ready(state.step)
    return time.perf_counter()


def _best_logged_val_loss(workdir: str, up_to_step: int) -> float:
    """The best val/loss already logged by earlier runs of this workdir, up to the resume step."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not up_to_step or not os.path.exists(path):
        return math.inf
    values = [row["val/loss"] for row in writers.read_jsonl(path)
              if row.get("val/loss") is not None and row["step"] <= up_to_step]
    return min(values, default=math.inf)
