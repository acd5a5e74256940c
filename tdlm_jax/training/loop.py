"""The training loop: step, log by tier, evaluate, checkpoint, summarize.

`train` builds the run (`tdlm_jax.training.setup`), prepares the workdir
(`tdlm_jax.training.rundir`) and steps from the restored step to `training.num_steps`. The
loop carries one `RunState`: the train state, the data position that goes with it, and the
metric log (rows not yet written, and the health monitor's history). `commit` is the one
place that makes it durable: rows first, then the checkpoint, so every row up to a
checkpoint's step is on disk before the checkpoint is.

Everything the loop does to the device is asynchronous except on the steps that log (see
`tdlm_jax.training.metric_log`). Metric tiers: tier 1 every `training.logging_steps`
(interval means), tier 2 from the detailed variant of the step every
`training.detailed_metrics_steps`, tier 3 from a separate analysis pass every
`training.attention_analysis_steps`, validation every `training.eval_every_n_steps`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from typing import Any, Callable

import jax
import ml_collections
from absl import logging

from tdlm_jax.errors import CheckpointError, TrainingError
from tdlm_jax.inference import generation
from tdlm_jax.inference.trained import TrainedModel
from tdlm_jax.metrics import health, run_writer
from tdlm_jax.metrics import catalogue as names
from tdlm_jax.metrics.aggregation import perplexity
from tdlm_jax.metrics.console import Console
from tdlm_jax.metrics.jsonl import SAMPLES_FILE
from tdlm_jax.metrics.health_thresholds import thresholds_from_config
from tdlm_jax.metrics.writers import MetricWriter
from tdlm_jax.parallel import sharding
from tdlm_jax.training import compilation, programs, rundir, setup
from tdlm_jax.training import config as config_lib
from tdlm_jax.training import step as step_lib
from tdlm_jax.training.metric_log import MetricLog
from tdlm_jax.training.preemption import CTRL_C, Preemption, stopped_at_once


@dataclasses.dataclass
class RunState:
    """What the loop carries from one step to the next; `commit` makes it durable."""

    train_state: step_lib.TrainState
    step: int  # the steps `train_state` has taken (a host copy: reading it never syncs)
    data_position: dict[str, Any]  # the data iterator's state after the batches of those steps
    log: MetricLog  # the rows not yet written, and the health monitor

    def advance(self, train_state: step_lib.TrainState, step: int, data_position: dict[str, Any]) -> None:
        """The state after `step`, with the position of the data it consumed."""
        self.train_state, self.step, self.data_position = train_state, step, data_position


def commit(run: setup.Run, state: RunState) -> None:
    """Writes the pending rows, then starts the checkpoint of the state's step: the train state,
    its data position and the metric log (the open interval, the health monitor)."""
    state.log.flush()
    state.log.writer.flush()  # every row up to this step durable before its checkpoint
    iterator = run.data.train_iterator
    if iterator.get_state() != state.data_position:  # stopped between reading a batch and its step
        iterator.set_state(state.data_position)
    run.checkpointer.save(state.step, state.train_state, iterator, log_state=state.log.state_dict())


def evaluate(eval_fn: Callable, params: Any, batches: list[dict], rng: jax.Array) -> dict[str, float | None]:
    """Validation NELBO pooled over the fixed batches, with a fixed key per batch.

    val/loss is Σ w·CE / Σ valid tokens over all batches (nats per token), so successive
    evaluations of the same parameters give the same number.
    """
    sums = [eval_fn(params, b["tokens"], b["valid"], jax.random.fold_in(rng, i)) for i, b in enumerate(batches)]
    total = {k: sum(float(s[k]) for s in jax.device_get(sums)) for k in sums[0]}
    loss = total["nelbo_sum"] / max(total["valid_tokens"], 1.0)
    row = {names.VAL_LOSS: loss, names.VAL_PERPLEXITY: perplexity(loss), names.VAL_BITS_PER_TOKEN: loss / math.log(2)}
    if total["masked_tokens"]:  # the autoregressive baseline masks nothing
        row[names.VAL_MASK_ACCURACY] = total["correct_tokens"] / total["masked_tokens"]
    return row


def eval_samples(config: ml_collections.ConfigDict, run: setup.Run, params: Any, step: int) -> list[dict[str, Any]]:
    """A few samples from the current parameters, with a fixed seed so evals are comparable:
    samples.jsonl's rows, less the step."""
    sc, prompt = config.sampling, config_lib.eval_prompt(config)
    trained = TrainedModel(config=config, tokenizer=run.tokenizer, graphdef=run.graphdef, params=params, step=step)
    texts, nfe = generation.sample_texts(trained, num_samples=sc.num_samples_at_eval, steps=sc.steps,
                                         method=sc.method, prompt=prompt, seed=config.seed)
    return [{"index": i, "sampler": sc.method, "steps": sc.steps, "prompt": prompt, "nfe": nfe, "text": text}
            for i, text in enumerate(texts)]


def _every(step: int, period: int, last: int) -> bool:
    return step % period == 0 or step == last


def _synced_time(state: step_lib.TrainState) -> float:
    """The time once the device has finished all work queued so far."""
    jax.block_until_ready(state.step)
    return time.perf_counter()


def _timed_commit(run: setup.Run, state: RunState) -> None:
    """`commit`, its time left out of the throughput."""
    tic = _synced_time(state.train_state)
    commit(run, state)
    state.log.exclude(time.perf_counter() - tic)


def _first_call(console: Console, seen: set[str], label: str) -> contextlib.AbstractContextManager:
    """The console's "compiling <label>…" the first time `label` runs (it compiles, or loads
    from the persistent cache, then); nothing after."""
    if label in seen:
        return contextlib.nullcontext()
    seen.add(label)
    return console.compiling(label)


def run_loop(config: ml_collections.ConfigDict, run: setup.Run, state: RunState, preemption: Preemption,
             console: Console, compiled: dict[str, programs.Program]) -> None:
    """Steps `state` from its step to `training.num_steps`, or until a SIGTERM or Ctrl-C,
    calling the `compiled` programs (`programs.compile_programs`): nothing compiles here
    but the sampler."""
    tc = config.training
    log, iterator = state.log, run.data.train_iterator
    first_calls: set[str] = set()
    for step in range(state.step + 1, tc.num_steps + 1):
        batch = sharding.global_batch(next(iterator), run.mesh)
        position, train_state = iterator.get_state(), state.train_state
        if run.is_diffusion and step % tc.attention_analysis_steps == 0:  # tier 3, on this step's inputs
            tic = _synced_time(train_state)
            rng = step_lib.step_rng(train_state.rng, train_state.step)
            log.defer(step, compiled[programs.ANALYSIS].compiled(train_state.params, batch["tokens"], batch["valid"],
                                                                 rng, train_state.time_proposal, train_state.step))
            log.exclude(_synced_time(train_state) - tic)
        detailed = run.is_diffusion and step % tc.detailed_metrics_steps == 0
        train_step = compiled[programs.DETAILED if detailed else programs.TRAIN].compiled
        train_state, metrics = train_step(train_state, batch["tokens"], batch["valid"])
        state.advance(train_state, step, position)
        console.advance(step)
        log.flush()  # earlier rows: their fetch overlaps this step's compute
        if log.consecutive_skips >= tc.max_consecutive_nonfinite:
            stop_after_nonfinite(run, state)
        log.add_step(metrics)
        if _every(step, tc.logging_steps, tc.num_steps):
            log.close_interval(step)
        if detailed:
            log.defer(step, {k: v for k, v in metrics.items() if names.tier_of(k) == names.TIER2})
        if _every(step, tc.eval_every_n_steps, tc.num_steps):
            log.flush()
            tic = _synced_time(train_state)
            log.write(step, evaluate(compiled[programs.EVAL].compiled, train_state.eval_params(),
                                     run.data.eval_batches, run.eval_rng))
            if run.is_diffusion and config.sampling.num_samples_at_eval:
                with _first_call(console, first_calls, "the sampler"):
                    samples = eval_samples(config, run, train_state.eval_params(), step)
                log.write_samples(step, samples)
            log.exclude(time.perf_counter() - tic)
        committed = _every(step, tc.checkpoint_every_n_steps, tc.num_steps)
        if committed:
            _timed_commit(run, state)
        # After the regular commit, so a stop requested during its save needs no second one.
        preempted = preemption.reached(step)  # the same on every host of a multi-host job
        if preempted and not committed:
            _timed_commit(run, state)
        if preempted:
            logging.warning("%s: saved a checkpoint at step %d; run the same command to resume",
                            preemption.reason, step)
            break
    log.flush()


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float | None]:
    """Trains (or resumes) the run in `workdir` and returns its summary, or where it stopped:
    {"preempted_at_step": N} after a SIGTERM, {"interrupted_at_step": N} after a Ctrl-C, and
    {"finished_at_step": N} for a run that had already finished, which is left untouched."""
    wall_start = time.time()
    # Before anything touches the workdir: a config error leaves no trace.
    config_lib.validate(config, num_devices=jax.device_count(), process_count=jax.process_count())
    sharding.make_mesh(mesh_shape=config.sharding.mesh_shape)  # a shape the nodes cannot take fails here
    rundir.ensure_writable(workdir)
    with rundir.locked(workdir):  # one writer per workdir, held until the run's files are closed
        write_config = rundir.check_config_change(config, workdir)
        # Compiled steps are kept on disk, so a resumed run loads them instead of recompiling.
        compilation.enable_persistent_cache(compilation.cache_dir(config, workdir))
        run = setup.build_run(config, workdir)
        try:
            finished = rundir.is_finished(workdir, run.start_step, config.training.num_steps)
        except BaseException:
            run.close()
            raise
        if finished:
            run.close()
            return {"finished_at_step": run.start_step}
        return _train(config, workdir, run, write_config, wall_start)


def _train(config: ml_collections.ConfigDict, workdir: str, run: setup.Run, write_config: bool,
           wall_start: float) -> dict[str, float | None]:
    primary = jax.process_index() == 0
    if primary:
        rundir.start(workdir, config, run.start_step, write_config)
    # Other processes' consoles show no bar and log at WARNING (tdlm_jax.main): only problems.
    console = Console(config.training.num_steps, run.start_step, terminal=None if primary else False)
    writer = run_writer.create_default_writer(workdir, wandb_project=config.logging.wandb_project,
                                              wandb_entity=config.logging.wandb_entity, config=config.to_dict(),
                                              console=console)
    writer.write_hparams(config.to_dict())
    monitor = health.HealthMonitor(thresholds_from_config(config.health), writer,
                                   os.path.join(workdir, rundir.ALERTS_FILE) if primary else None)
    interval_names = names.TIER1_STEP_NAMES if run.is_diffusion else names.TRAIN_STEP_NAMES
    log = MetricLog(writer, monitor, interval_names, config.training.batch_size * config.data.seq_len,
                    run.start_step, rundir.best_logged_val_loss(workdir, run.start_step),
                    samples_path=os.path.join(workdir, SAMPLES_FILE) if primary else None)
    if run.log_state is not None:
        log.load_state_dict(run.log_state)
    state = RunState(run.initial_state, run.start_step, run.data.train_iterator.get_state(), log)
    stop_now = False
    try:
        tic = time.perf_counter()
        compiled = compile_and_check(config, run, console)
        log.exclude(time.perf_counter() - tic)
        with Preemption(stopped_at_once(workdir)) as preemption:
            run_loop(config, run, state, preemption, console, compiled)
    except KeyboardInterrupt:  # a Ctrl-C Preemption does not count (compiling, multi-host): stop without saving
        stop_now = True
        _close_quietly(writer)
        raise
    except OSError as e:  # a full disk or a vanished workdir while writing metrics
        _close_quietly(writer)
        raise CheckpointError(f"could not write to {workdir} ({e.strerror or e}): free disk space or "
                              "fix permissions, then run the same command to resume from the last "
                              "checkpoint") from e
    except jax.errors.JaxRuntimeError as e:
        _close_quietly(writer)
        if "RESOURCE_EXHAUSTED" in str(e) or "Out of memory" in str(e):  # XLA's two spellings
            raise TrainingError(f"out of memory on {jax.devices()[0].device_kind} "
                                f"({str(e).strip().splitlines()[0][:160]}): {programs.TRAIN_STEP_FIX}") from e
        raise
    except BaseException:
        _close_quietly(writer)  # flush what can be flushed; the error that stopped training wins
        raise
    finally:
        run.close(wait=not stop_now)  # waits for a save in flight; stops grain's worker processes
    if preemption.requested:
        writer.close()
        key = "interrupted_at_step" if preemption.reason == CTRL_C else "preempted_at_step"
        return {key: state.step}
    summary = {
        names.TRAINING_TIME_HOURS: (time.time() - wall_start) / 3600.0,
        names.TOTAL_STEPS: float(state.step),
        names.FINAL_LOSS: log.last_train_loss,
        names.BEST_VAL_LOSS: log.best_val_loss if math.isfinite(log.best_val_loss) else None,
        **monitor.summary_scalars(),
    }
    writer.write_scalars(state.step, summary)
    writer.close()
    if primary:
        rundir.write_summary(workdir, summary)
    return summary


def compile_and_check(config: ml_collections.ConfigDict, run: setup.Run, console: Console
                      ) -> dict[str, programs.Program]:
    """Compiles every program the run's steps will call, logs each one's memory per device,
    and stops with one line (TrainingError) if one does not fit (`tdlm_jax.training.programs`)."""
    variants = programs.variants_used(config, run.start_step, run.is_diffusion)
    compiled = programs.compile_programs(config, run.mesh, run.initial_state, train_fn=run.train_fn,
                                         eval_fn=run.eval_fn, analysis_fn=run.analysis_fn, variants=variants,
                                         announce=console.compiling)
    capacity, source = programs.device_capacity(jax.local_devices()[0])
    logging.info("\n".join(programs.memory_table(compiled.values(), capacity, source)))
    programs.check_fits(compiled.values(), capacity, source)
    return compiled


def stop_after_nonfinite(run: setup.Run, state: RunState) -> None:
    """Commits the state (whose parameters are the last good ones: skipped steps leave them
    unchanged) and stops: a run whose every batch diverges is not going to recover."""
    commit(run, state)
    run.checkpointer.wait_until_finished()
    raise TrainingError(
        f"stopped at step {state.step} after {state.log.consecutive_skips} consecutive non-finite losses or "
        f"gradients (training.max_consecutive_nonfinite); the last good parameters are in checkpoint "
        f"{state.step}: check the data and lower training.learning_rate, then resume")


def _close_quietly(writer: MetricWriter) -> None:
    try:
        writer.close()
    except Exception as e:  # e.g. the full disk that is already being reported
        logging.warning("could not close the metric writers: %s", e)
