"""The training loop: init or restore, step, log by tier, evaluate, checkpoint, summarize.

Everything the loop does to the device is asynchronous except on the steps that log: the
tier-1 metrics are summed on the device, and a logging step's values are fetched only
after the next step has been dispatched (as in MaxText), so the host never stalls the
device. Throughput leaves out compilation, evaluation, analysis and checkpointing time.

Metric tiers: tier 1 every `training.logging_steps` (interval means), tier 2 from the
detailed variant of the step every `training.detailed_metrics_steps`, tier 3 from a
separate analysis pass every `training.attention_analysis_steps`, validation every
`training.eval_every_n_steps`. Every logged row also goes through the health monitor.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from tdlm_jax import checkpoint, compilation, generation, sharding
from tdlm_jax import config as config_lib
from tdlm_jax import optim
from tdlm_jax import step as step_lib
from tdlm_jax.data import dataset, tokenizer as tokenizer_lib
from tdlm_jax.errors import CheckpointError, ConfigError, TrainingError
from tdlm_jax.metrics import aggregation, health, writers
from tdlm_jax.model.transformer import Denoiser
from tdlm_jax.workdir import TrainedModel


@dataclasses.dataclass
class Data:
    """The run's data: a resumable training iterator and fixed validation batches."""

    train_iterator: Any
    eval_batches: list[dict[str, jax.Array]]


def build_data(config: ml_collections.ConfigDict, tok: tokenizer_lib.Tokenizer, mesh) -> Data:
    """Loads, splits, tokenizes (once, into the token cache) and packs `data.source` (see
    tdlm_jax.data.dataset); the training iterator reads windows from the cache lazily."""
    built = dataset.build_training_data(config, tok, process_index=jax.process_index(),
                                        process_count=jax.process_count())
    train_iterator, eval_batches = built.train_iterator, built.eval_batches
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
    row = {"val/loss": loss, "val/perplexity": math.exp(loss), "val/bits_per_token": loss / math.log(2)}
    if total["masked_tokens"]:  # the autoregressive baseline masks nothing
        row["val/mask_accuracy"] = total["correct_tokens"] / total["masked_tokens"]
    return row


def build_model_and_optimizer(config: ml_collections.ConfigDict, tok: tokenizer_lib.ByteTokenizer):
    """(graphdef, initial params, optimizer, learning-rate schedule) as the config defines them."""
    model_cfg = config_lib.model_config(config, vocab_size=tok.vocab_size, num_predictable=tok.text_vocab_size)
    graphdef, params = nnx.split(Denoiser(model_cfg, nnx.Rngs(config.seed)))
    tc = config.training
    lr_schedule = optim.learning_rate_schedule(tc.learning_rate, tc.num_steps, tc.warmup_steps,
                                               tc.decay_schedule, tc.min_learning_rate_ratio)
    optimizer = optim.make_optimizer(lr_schedule, weight_decay=tc.weight_decay, b1=tc.adam_b1,
                                     b2=tc.adam_b2, grad_clip_norm=tc.grad_clip_norm)
    return graphdef, params, optimizer, lr_schedule


@dataclasses.dataclass
class Run:
    """Everything built at start-up, before the first step."""

    mesh: Any
    tokenizer: tokenizer_lib.ByteTokenizer
    graphdef: Any
    data: Data
    state: step_lib.TrainState
    train_fn: Callable
    eval_fn: Callable
    analysis_fn: Callable
    eval_rng: jax.Array
    checkpointer: checkpoint.Checkpointer
    start_step: int
    is_diffusion: bool  # False for the autoregressive baseline: no tier-2/3 metrics


def initial_state(config: ml_collections.ConfigDict, params: Any, optimizer: Any, mesh: Any) -> step_lib.TrainState:
    """A fresh train state placed on the mesh: FSDP-sharded over its fsdp axis (replicated when
    that is 1), the layout a restore keeps."""
    return sharding.place_state(step_lib.init_state(params, optimizer, config.seed,
                                                    ema=config_lib.ema_decay(config) > 0), mesh)


def train_step_statics(config: ml_collections.ConfigDict, graphdef: Any, optimizer: Any, lr_schedule: Callable,
                       mask_id: int) -> dict[str, Any]:
    """The static arguments of `step.train_step` a config defines: one place for training and
    the benchmark, so the benchmark times exactly the step that trains."""
    return dict(graphdef=graphdef, process=config_lib.forward_process(config, mask_id), optimizer=optimizer,
                lr_schedule=lr_schedule, objective=config.model.kind,
                grad_accum_steps=config.training.get("grad_accum_steps", 1), ema_decay=config_lib.ema_decay(config))


def build_run(config: ml_collections.ConfigDict, workdir: str) -> Run:
    """Validates the config, builds data, model and steps, and restores the latest checkpoint."""
    config_lib.validate(config, num_devices=jax.device_count(), process_count=jax.process_count())
    mesh = sharding.make_mesh(mesh_shape=config.sharding.mesh_shape)
    tok = dataset.build_tokenizer(config.data, workdir)  # bpe:<n> trains (or reloads) it in the workdir
    data = build_data(config, tok, mesh)
    tc = config.training
    graphdef, params, optimizer, lr_schedule = build_model_and_optimizer(config, tok)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    logging.info("denoiser: %s parameters on %d device(s) of %d process(es), mesh %s", f"{num_params:,}",
                 jax.device_count(), jax.process_count(), dict(mesh.shape))
    state = initial_state(config, params, optimizer, mesh)
    static = train_step_statics(config, graphdef, optimizer, lr_schedule, tok.mask_id)
    process, objective = static["process"], static["objective"]
    checkpointer = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                           max_to_keep=tc.max_checkpoints_to_keep)
    start_step, state = restore_latest_usable(checkpointer, state, data.train_iterator)
    return Run(
        mesh=mesh, tokenizer=tok, graphdef=graphdef, data=data, state=state,
        train_fn=step_lib.jit_train_step(mesh, sharding.state_shardings(mesh, state), **static),
        eval_fn=step_lib.jit_eval_step(mesh, graphdef=graphdef, objective=objective,
                                       process=process.for_evaluation(config.data.eval_batch_size)),
        analysis_fn=step_lib.jit_analysis_step(mesh, graphdef=graphdef, process=process),
        eval_rng=jax.random.fold_in(jax.random.key(config.seed), 0x5EED),
        checkpointer=checkpointer, start_step=start_step, is_diffusion=objective == "diffusion")


def restore_latest_usable(checkpointer: checkpoint.Checkpointer, state: step_lib.TrainState, data_iterator: Any
                          ) -> tuple[int, step_lib.TrainState]:
    """(step, state) of the newest checkpoint that restores, or (0, state) if there is none.

    Newer checkpoints that cannot be read (a kill during a save, a truncated file) are moved
    aside with a warning naming them, but only once an older one has restored: if none
    restores, nothing is moved and the error is raised, so a run never starts over from
    step 0 silently.
    """
    steps = checkpointer.all_steps()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    unreadable: list[tuple[int, CheckpointError]] = []
    for step in reversed(steps):
        try:
            restored = checkpointer.restore(step, abstract, data_iterator)
        except CheckpointError as e:
            unreadable.append((step, e))
            continue
        for bad_step, error in unreadable:
            moved = checkpointer.quarantine(bad_step)
            logging.warning("checkpoint %d is unreadable (%s); moved it to %s and resumed from step %d",
                            bad_step, error, moved, step)
        logging.info("resumed from %s at step %d", checkpointer.step_directory(step), step)
        return step, restored
    if unreadable:
        raise unreadable[0][1]
    return 0, state


# Keys a resumed run may not change: they define the parameters' shapes or what the data
# iterator's saved position means. Everything else (steps, frequencies, learning rate,
# evaluation, logging) may change, and the changes are logged.
STRUCTURAL_KEYS = ("model.", "data.", "training.batch_size", "seed")
# Keys under those prefixes that change how the run computes or reads, not what it computes:
# evaluation size, input workers and cache location, attention kernel, rematerialization.
CHANGEABLE_KEYS = ("data.eval_batch_size", "data.num_eval_batches", "data.worker_count",
                   "data.prefetch_buffer_size", "data.cache_dir", "model.attention_impl", "model.remat",
                   "model.remat_policy")


def check_config_change(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Compares the config with the one the workdir's run saved; refuses structural changes."""
    path = os.path.join(workdir, "config.json")
    checkpoints = os.path.join(workdir, "checkpoints")
    if not os.path.exists(path) or not os.path.isdir(checkpoints) or not any(n.isdigit() for n in os.listdir(checkpoints)):
        return  # nothing to resume, so nothing to contradict
    with open(path) as f:
        saved = _flatten(json.load(f))
    current = _flatten(json.loads(config.to_json_best_effort()))
    changed = {k: (saved.get(k), current.get(k)) for k in sorted(saved.keys() | current.keys())
               if saved.get(k) != current.get(k)}
    if not changed:
        return
    described = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
    structural = [k for k in changed if k.startswith(STRUCTURAL_KEYS) and k not in CHANGEABLE_KEYS]
    if structural and not config.training.get("allow_config_change", False):
        raise ConfigError(f"config error: resuming {workdir} with a different {', '.join(structural)} "
                          f"({described}): use a new --workdir, or --config.training.allow_config_change=true")
    logging.warning("resuming %s with a changed config: %s", workdir, described)


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class MetricLog:
    """Writes metric rows, passes each through the health monitor, and measures throughput.

    Rows whose values are still on the device are deferred: `flush` fetches them, which the
    loop calls right after dispatching the next step so the fetch overlaps its compute.
    """

    def __init__(self, writer: writers.MetricWriter, monitor: health.HealthMonitor, tokens_per_step: int,
                 start_step: int):
        self.writer, self.monitor, self.tokens_per_step = writer, monitor, tokens_per_step
        self.deferred: list[tuple[int, dict, bool]] = []
        self.last_step, self.last_time = start_step, time.perf_counter()
        self.excluded_seconds = 0.0  # compilation, evaluation, analysis, checkpointing
        self.last_train_loss: float | None = None
        self.consecutive_skips = 0  # as of the last fetched interval

    def write(self, step: int, row: dict[str, float | None]) -> None:
        self.writer.write_scalars(step, row)
        self.monitor.observe(step, row)

    def defer(self, step: int, device_values: dict, is_interval: bool) -> None:
        self.deferred.append((step, device_values, is_interval))

    def flush(self) -> None:
        for step, device_values, is_interval in self.deferred:
            fetched = jax.device_get(device_values)
            if is_interval:
                row = aggregation.interval_means(fetched)
                row["train/tokens_per_second"] = self._throughput(step)
                self.last_train_loss = row["train/loss"]
                self.consecutive_skips = int(row["train/consecutive_skipped_steps"])
            else:
                row = aggregation.to_host_scalars(fetched)
            self.write(step, row)
        self.deferred.clear()

    def exclude(self, seconds: float) -> None:
        self.excluded_seconds += seconds

    def _throughput(self, step: int) -> float | None:
        now = time.perf_counter()
        seconds = now - self.last_time - self.excluded_seconds
        steps = step - self.last_step
        self.last_step, self.last_time, self.excluded_seconds = step, now, 0.0
        return steps * self.tokens_per_step / seconds if seconds > 0 and steps > 0 else None


def eval_samples(config: ml_collections.ConfigDict, run: Run, params: Any, step: int) -> dict[str, str]:
    """A few samples from the current parameters, with a fixed seed so evals are comparable."""
    sc = config.sampling
    trained = TrainedModel(config=config, tokenizer=run.tokenizer, graphdef=run.graphdef, params=params, step=step)
    texts, _ = generation.sample_texts(trained, num_samples=sc.num_samples_at_eval, steps=sc.steps,
                                       method=sc.method, prompt=sc.prompt, seed=config.seed)
    return {f"samples/{i}": text for i, text in enumerate(texts)}


def _every(step: int, period: int, last: int) -> bool:
    return step % period == 0 or step == last


def _synced_time(state: step_lib.TrainState) -> float:
    """The time once the device has finished all work queued so far."""
    jax.block_until_ready(state.step)
    return time.perf_counter()


def run_loop(config: ml_collections.ConfigDict, run: Run, log: MetricLog, best_val: float,
             preemption: "Preemption") -> tuple[step_lib.TrainState, float]:
    """Steps from the restored step to `training.num_steps`, or until a SIGTERM; returns the
    state and the best val/loss."""
    tc = config.training
    state = run.state
    names = aggregation.TIER1_NAMES if run.is_diffusion else aggregation.TRAIN_NAMES
    interval = aggregation.empty_interval(names)
    aggregation.accumulate(interval, {k: jnp.zeros(()) for k in names})  # compile now
    compiled: set[bool] = set()
    recompiles = compilation.RecompileCheck("train_step")  # warns if it compiles more than once per variant
    for step in range(run.start_step + 1, tc.num_steps + 1):
        batch = sharding.global_batch(next(run.data.train_iterator), run.mesh)
        if run.is_diffusion and step % tc.attention_analysis_steps == 0:  # tier 3, on this step's inputs
            tic = _synced_time(state)
            rng = step_lib.step_rng(state.rng, state.step)
            log.defer(step, run.analysis_fn(state.params, batch["tokens"], batch["valid"], rng), False)
            log.exclude(_synced_time(state) - tic)
        detailed = run.is_diffusion and step % tc.detailed_metrics_steps == 0
        tic = _synced_time(state) if detailed not in compiled else None  # a first call compiles
        state, metrics = run.train_fn(state, batch["tokens"], batch["valid"], detailed=detailed)
        if tic is not None:
            log.exclude(_synced_time(state) - tic)
            compiled.add(detailed)
        recompiles.check(len(compiled))
        log.flush()  # earlier rows: their fetch overlaps this step's compute
        if log.consecutive_skips >= tc.max_consecutive_nonfinite:
            stop_after_nonfinite(run, state, step, log.consecutive_skips)
        interval = aggregation.accumulate(interval, {k: metrics[k] for k in names})
        if _every(step, tc.logging_steps, tc.num_steps):
            log.defer(step, interval, True)
            interval = aggregation.empty_interval(names)
        if detailed:
            log.defer(step, {k: v for k, v in metrics.items() if k.startswith("research/")}, False)
        if _every(step, tc.eval_every_n_steps, tc.num_steps):
            log.flush()
            tic = _synced_time(state)
            val = evaluate(run.eval_fn, state.eval_params(), run.data.eval_batches, run.eval_rng)
            log.write(step, val)
            best_val = min(best_val, val["val/loss"])
            if run.is_diffusion and config.sampling.num_samples_at_eval:
                log.writer.write_texts(step, eval_samples(config, run, state.eval_params(), step))
            log.exclude(time.perf_counter() - tic)
        run.state = state  # what an interruption may save
        preempted = preemption.reached(step)  # the same on every host of a multi-host job
        if _every(step, tc.checkpoint_every_n_steps, tc.num_steps) or preempted:
            log.flush()  # every row up to this step is on disk before its checkpoint
            tic = _synced_time(state)
            run.checkpointer.save(step, state, run.data.train_iterator)
            log.exclude(time.perf_counter() - tic)
        if preempted:
            logging.warning("SIGTERM: saved a checkpoint at step %d; run the same command to resume", step)
            break
    log.flush()
    return state, best_val


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float | None]:
    """Trains (or resumes) the run in `workdir` and returns its summary."""
    wall_start = time.time()
    ensure_writable(workdir)
    check_config_change(config, workdir)
    # Compiled steps are kept on disk, so a resumed run loads them instead of recompiling.
    compilation.enable_persistent_cache(compilation.cache_dir(config, workdir))
    run = build_run(config, workdir)
    primary = jax.process_index() == 0
    writer = writers.create_default_writer(workdir, wandb_project=config.logging.wandb_project,
                                           wandb_entity=config.logging.wandb_entity, config=config.to_dict(),
                                           resume_step=run.start_step)
    if primary and run.start_step:
        writers.drop_rows_after(os.path.join(workdir, "alerts.jsonl"), run.start_step)
    if primary:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    writer.write_hparams(config.to_dict())
    monitor = health.HealthMonitor(health.thresholds_from_config(config.health), writer,
                                   os.path.join(workdir, "alerts.jsonl") if primary else None)
    log = MetricLog(writer, monitor, config.training.batch_size * config.data.seq_len, run.start_step)
    try:
        with Preemption() as preemption:
            state, best_val = run_loop(config, run, log, _best_logged_val_loss(workdir, run.start_step), preemption)
    except KeyboardInterrupt:
        _save_on_interrupt(run)
        raise
    except OSError as e:  # a full disk or a vanished workdir while writing metrics
        _close_quietly(writer)
        raise CheckpointError(f"could not write to {workdir} ({e.strerror or e}): free disk space or "
                              "fix permissions, then run the same command to resume from the last "
                              "checkpoint") from e
    except BaseException:
        _close_quietly(writer)  # flush what can be flushed; the error that stopped training wins
        raise
    finally:
        run.checkpointer.close()
        run.data.train_iterator.close()  # stops grain's worker processes, if any
    if preemption.requested:
        writer.close()
        return {"preempted_at_step": int(state.step)}

    summary = {
        "summary/training_time_hours": (time.time() - wall_start) / 3600.0,
        "summary/total_steps": float(int(state.step)),
        "summary/final_loss": log.last_train_loss,
        "summary/best_val_loss": best_val if math.isfinite(best_val) else None,
        **monitor.summary_scalars(),
    }
    writer.write_scalars(int(state.step), summary)
    writer.close()
    if primary:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def stop_after_nonfinite(run: Run, state: step_lib.TrainState, step: int, skips: int) -> None:
    """Saves the state (whose parameters are the last good ones: skipped steps leave them
    unchanged) and stops: a run whose every batch diverges is not going to recover."""
    run.checkpointer.save(step, state, run.data.train_iterator)
    run.checkpointer.wait_until_finished()
    raise TrainingError(
        f"stopped at step {step} after {skips} consecutive non-finite losses or gradients "
        f"(training.max_consecutive_nonfinite); the last good parameters are in checkpoint {step}: "
        "check the data and lower training.learning_rate, then resume")


class Preemption:
    """While active, SIGTERM (a preemption notice) makes `reached(step)` true at a step: the
    loop finishes that step, saves a checkpoint, flushes the writers and returns.

    A multi-host job must save and stop at the same step on every host, or orbax's save
    waits forever for the hosts that went on. There, JAX's preemption sync manager (started
    by jax.distributed.initialize) catches SIGTERM itself, tells every host, and
    `reached_preemption_sync_point` becomes true at one step they all agree on; it costs no
    host sync on the steps before a notice. A single process just sets a flag. A multi-host
    job whose sync manager is turned off (jax_enable_preemption_service) leaves SIGTERM to
    kill the process: the job then fails and resumes from its last regular checkpoint,
    instead of hanging in a save that only one host started.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous = None
        self._synced = jax.distributed.is_initialized() and _preemption_service_running()
        self._handles_sigterm = self._synced or jax.process_count() == 1
        if not self._handles_sigterm:
            logging.warning("jax_enable_preemption_service is off: a SIGTERM stops this multi-host job without "
                            "a final checkpoint; it resumes from the last one")

    def __enter__(self) -> "Preemption":
        # A Python handler would replace the sync manager's, which then never hears of SIGTERM.
        if (not self._synced and self._handles_sigterm
                and threading.current_thread() is threading.main_thread()):  # signals go to the main thread
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step`; on every host, call it once per step."""
        if self._synced and multihost_utils.reached_preemption_sync_point(step):
            self.requested = True
        return self.requested

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True


def _preemption_service_running() -> bool:
    """Whether jax.distributed started its preemption sync manager (jax_enable_preemption_service)."""
    from jax._src import distributed as jax_distributed  # the manager has no public accessor

    return getattr(jax_distributed.global_state, "preemption_sync_manager", None) is not None


# The last two are written first (tokenizer_info.json by build_run, the compilation cache before it).
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoints", "tokenizer_info.json", compilation.CACHE_SUBDIR)


def ensure_writable(workdir: str) -> None:
    """A clear error now, rather than a traceback at the first checkpoint or metric write,
    and never a run written into a directory that holds something else (e.g. --workdir=.)."""
    # Hidden files are not "other files": every host of a job runs this at once, and another
    # host's write probe or half-written record (.tokenizer_info.json.*.tmp) may be there.
    others = [n for n in os.listdir(workdir) if not n.startswith(".")] if os.path.isdir(workdir) else []
    if others and not any(os.path.exists(os.path.join(workdir, name)) for name in RUN_FILES):
        raise CheckpointError(f"workdir {workdir} holds other files and no tdlm_jax run: pass a new or empty "
                              "--workdir (the default is runs/<config name>)")
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test.{jax.process_index()}")  # hosts may share the workdir
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(f"workdir {workdir} is not writable ({e.strerror}): free disk space or fix "
                              "permissions, or pass another --workdir")


def _close_quietly(writer: writers.MetricWriter) -> None:
    try:
        writer.close()
    except Exception as e:  # e.g. the full disk that is already being reported
        logging.warning("could not close the metric writers: %s", e)


def _save_on_interrupt(run: Run) -> None:
    """Ctrl-C: keep the work since the last checkpoint, if the last completed state is intact."""
    state = run.state
    if state.step.is_deleted():  # interrupted inside a step, after its input was donated
        logging.warning("interrupted during a step; resume from checkpoint %s", run.checkpointer.latest_step())
        return
    step = int(state.step)
    if step > (run.checkpointer.latest_step() or 0):
        run.checkpointer.save(step, state, run.data.train_iterator)
    logging.warning("interrupted at step %d; checkpoint saved, run the same command to resume", step)


def _best_logged_val_loss(workdir: str, up_to_step: int) -> float:
    """The best val/loss already logged by earlier runs of this workdir, up to the resume step."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not up_to_step or not os.path.exists(path):
        return math.inf
    values = [row["val/loss"] for row in writers.read_jsonl(path)
              if row.get("val/loss") is not None and row["step"] <= up_to_step]
    return min(values, default=math.inf)
