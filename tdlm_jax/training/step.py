"""Pure jitted train and eval steps: no I/O and no config reads inside jit.

The train step is one `jax.jit` function over global arrays: the batch is sharded over
the mesh's (data, fsdp) axes and the state is replicated, or sharded over fsdp
(`sharding.state_shardings`), so XLA inserts the gradient all-reduce (or reduce-scatter)
and the same code runs on 1 device or N. Its `detailed` argument is static and selects a
separately compiled variant that also computes the tier-2 research metrics; both variants
apply the same parameter update (see `tdlm_jax.metrics.research`).

The step's randomness is `fold_in(run key, step)`, so a resumed run draws exactly the
noise an uninterrupted one would.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from tdlm_jax.diffusion import proposal as proposal_lib
from tdlm_jax.diffusion.corruption import Corrupted, ForwardProcess, corrupt
from tdlm_jax.diffusion.loss import batch_scores, correct_predictions, num_valid_tokens, weighted_token_losses
from tdlm_jax.metrics import research
from tdlm_jax.metrics import catalogue as names
from tdlm_jax.metrics.advanced import advanced_metrics, analysed_rows, layer_attention_entropy
from tdlm_jax.metrics.tier1 import correct_rows, tier1_metrics
from tdlm_jax.model import autoregressive
from tdlm_jax.model.head import TokenScores
from tdlm_jax.parallel import sharding


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: the number of updates applied so far
    params: Any  # nnx.State of the denoiser's parameters
    opt_state: Any
    rng: jax.Array  # uint32 raw key data of the run's base key
    skipped_steps: jax.Array  # int32 scalar: updates skipped for a non-finite loss or gradient
    consecutive_skips: jax.Array  # int32 scalar: skipped updates since the last applied one
    ema_params: Any = None  # exponential moving average of `params` (training.ema_decay > 0), else None
    time_proposal: Any = None  # the adaptive time sampler's statistics (diffusion.proposal.Proposal), else None

    def eval_params(self) -> Any:
        """The parameters evaluation and sampling use: the EMA when one is kept."""
        return self.params if self.ema_params is None else self.ema_params


def init_state(params: Any, optimizer: optax.GradientTransformation, seed: int, *, ema: bool = False,
               proposal_bins: int = 0) -> TrainState:
    """A fresh state; with `ema`, the moving average starts at the initial parameters (as in MDLM);
    with `proposal_bins`, the adaptive time sampler's statistics start empty (q uniform)."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)), skipped_steps=jnp.zeros((), jnp.int32),
                      consecutive_skips=jnp.zeros((), jnp.int32),
                      ema_params=jax.tree.map(jnp.copy, params) if ema else None,
                      time_proposal=proposal_lib.initial_proposal(proposal_bins) if proposal_bins else None)


def step_rng(state_rng: jax.Array, step: jax.Array) -> jax.Array:
    """The key of one training step, a pure function of the run key and the step number."""
    return jax.random.fold_in(jax.random.wrap_key_data(state_rng), step)


def row_losses(graphdef: nnx.GraphDef, params: Any, batch: Corrupted, num_valid: jax.Array
               ) -> tuple[jax.Array, TokenScores]:
    """Each row's contribution to the NELBO, normalized by the whole batch's valid tokens.

    `num_valid` is passed in rather than computed from `batch` so that a sub-batch's rows
    keep the full batch's denominator, and bucket losses add up to the full loss.
    """
    scores = batch_scores(nnx.merge(graphdef, params), batch)
    return weighted_token_losses(scores.nll_BxL, batch).sum(axis=-1) / num_valid, scores


OBJECTIVES = ("diffusion", "ar")

# (params, row-aligned microbatch) -> (gradient, or gradients by bucket; per-row statistics float32[rows])
GradFn = Callable[[Any, Any], tuple[Any, dict[str, jax.Array]]]


def microbatches(rows: Any, num_micro: int) -> Any:
    """Splits every leaf's leading (row) axis into [num_micro, rows / num_micro].

    Microbatch j holds rows j, j + k, j + 2k, ... (k = num_micro). Taken this way, each
    device's block of a data-sharded batch splits into k local pieces, so every microbatch
    is spread over all devices and the split moves no data.
    """
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]).swapaxes(0, 1), rows)


def unsplit_rows(stacked: Any) -> Any:
    """The inverse of `microbatches`: [k, rows / k, ...] back to the original row order."""
    return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(-1, *x.shape[2:]), stacked)


# Microbatches per iteration of the accumulation loop where training.grad_accum_unroll is 0.
# On a CPU, two: the loop body then holds two independent microbatches, and XLA:CPU runs one's
# operations on the core the other's leave idle (a step's operations otherwise run one after
# another, each split over the cores). base.py's step takes 0.78–0.85 of the time for 1.8× the
# temporaries (docs/performance.md); four at a time gained less. On an accelerator, one: there
# accumulation is what keeps a batch in memory, and what the overlap gains is not measured.
CPU_ACCUMULATION_UNROLL = 2


def accumulation_unroll(configured: int, device: Any) -> int:
    """training.grad_accum_unroll, or for 0 the default of `device`'s platform (above)."""
    if configured:
        return configured
    return CPU_ACCUMULATION_UNROLL if device.platform == "cpu" else 1


def accumulate_gradients(grad_fn: GradFn, params: Any, rows: Any, num_micro: int, unroll: int = 1
                         ) -> tuple[Any, dict]:
    """Σ of `grad_fn` gradients over `num_micro` microbatches, run by a `lax.scan` `unroll`
    microbatches per iteration (`accumulation_unroll`), so at most that many microbatches'
    activations are live; per-row statistics come back in the original row order. With one
    microbatch this is just `grad_fn(params, rows)`.

    Losses are normalized by the *global* batch's token count inside `grad_fn`, so the sum
    of microbatch gradients is exactly the gradient of the one-big-batch loss. The sum is
    taken in microbatch order whatever `unroll`: unrolling changes the schedule, not the sum
    (equal to float rounding, tested).
    """
    if num_micro == 1:
        return grad_fn(params, rows)
    split = microbatches(rows, num_micro)
    first = jax.tree.map(lambda x: x[0], split)
    grads_shape, _ = jax.eval_shape(grad_fn, params, first)

    def add_microbatch(total: Any, microbatch: Any) -> tuple[Any, dict]:
        grads, stats = grad_fn(params, microbatch)
        return jax.tree.map(jnp.add, total, grads), stats

    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), grads_shape)
    grads, stats = jax.lax.scan(add_microbatch, zeros, split, unroll=unroll)
    return grads, unsplit_rows(stats)


def diffusion_grad_fn(graphdef: nnx.GraphDef, process: ForwardProcess, num_valid: jax.Array, detailed: bool,
                      num_micro: int, row_gradient_bytes: int = research.CPU_ROW_GRADIENT_BYTES) -> GradFn:
    """The gradient of a microbatch's share of the NELBO (one of `num_micro`), and its per-row statistics.

    A microbatch is {"batch": Corrupted rows, "bucket_B": their corruption buckets}. In the
    `detailed` variant the gradient is (the list of per-bucket gradients, Σ |∇L_s|² over the
    small batches s of the gradient noise scale), by `research.bucket_gradients` (holding at
    most `row_gradient_bytes` of per-row gradients where bucket membership is data): the
    small batches are the whole batch's two halves without accumulation, else the
    microbatches themselves.
    """
    row_loss_fn = functools.partial(row_losses, graphdef, num_valid=num_valid)

    def grad_fn(params: Any, micro: dict) -> tuple[Any, dict[str, jax.Array]]:
        batch = micro["batch"]
        if detailed:
            *grads, rows_B, stats = research.bucket_gradients(row_loss_fn, params, batch, process, micro["bucket_B"],
                                                              num_micro, row_gradient_bytes)
        else:
            grads, (rows_B, scores) = jax.grad(lambda p: research.summed(row_loss_fn(p, batch)), has_aux=True)(params)
            stats = {"correct_B": correct_rows(scores, batch)}
        return grads, {"loss_B": rows_B, **stats}

    return grad_fn


def ar_grad_fn(graphdef: nnx.GraphDef, mask_id: int, num_valid: jax.Array) -> GradFn:
    """The gradient of a microbatch's share of the autoregressive NLL, and its per-row losses."""
    def grad_fn(params: Any, micro: dict) -> tuple[Any, dict[str, jax.Array]]:
        loss = lambda p: research.summed(autoregressive.row_losses(
            graphdef, p, micro["tokens"], micro["valid"], mask_id, num_valid=num_valid))
        grads, (rows_B, _) = jax.grad(loss, has_aux=True)(params)
        return grads, {"loss_B": rows_B}

    return grad_fn


def train_step(state: TrainState, tokens_BxL: jax.Array, valid_BxL: jax.Array, *, graphdef: nnx.GraphDef,
               process: ForwardProcess, optimizer: optax.GradientTransformation,
               lr_schedule: Callable[[jax.Array], jax.Array], detailed: bool,
               objective: str = "diffusion", grad_accum_steps: int = 1, ema_decay: float = 0.0,
               row_gradient_bytes: int = research.CPU_ROW_GRADIENT_BYTES, accum_unroll: int = 1
               ) -> tuple[TrainState, dict]:
    """One optimizer update on a global batch; returns the new state and a dict of device scalars.

    The batch is corrupted as a whole (by `process`, whose stratified layout is aligned to
    its microbatches: the same noise whatever `grad_accum_steps` for a given process), then
    its gradient is accumulated over `grad_accum_steps` microbatches: the update equals the
    one-big-batch update, and the metrics are pooled over the global batch from per-row
    statistics. `objective` 'ar' trains the autoregressive baseline
    (`tdlm_jax.model.autoregressive`); it has no corruption, so the diffusion metrics and the
    `detailed` variant do not apply to it. `row_gradient_bytes` bounds the `detailed`
    variant's per-row gradients (metrics.row_gradient_mb, `research.row_gradient_budget`);
    `accum_unroll` is how many microbatches each iteration of the accumulation loop takes
    (training.grad_accum_unroll, `accumulation_unroll`).
    """
    if objective == "ar":
        num_valid = jnp.maximum(valid_BxL.sum(), 1).astype(jnp.float32)
        grad_fn, rows = ar_grad_fn(graphdef, process.mask_id, num_valid), {"tokens": tokens_BxL, "valid": valid_BxL}
        detailed = False
    else:
        q_K = process.proposal_probabilities(state.time_proposal, state.step) if process.adaptive else None
        batch = corrupt(process, step_rng(state.rng, state.step), tokens_BxL, valid_BxL, q_K)
        rows = {"batch": batch, "bucket_B": research.row_buckets(process, batch)}
        grad_fn = diffusion_grad_fn(graphdef, process, num_valid_tokens(batch), detailed, grad_accum_steps,
                                    row_gradient_bytes)
    grads, stats = accumulate_gradients(grad_fn, state.params, rows, grad_accum_steps, accum_unroll)
    if detailed:
        (grads_by_bucket, small_sq_sum), grads = grads, jax.tree.map(lambda *gs: sum(gs), *grads[0])

    loss, grad_norm = stats["loss_B"].sum(), optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A non-finite loss or gradient (a corrupt batch, an overflow) must not destroy the run:
    # keep the old parameters and optimizer state, count the skip, and let the step (and so
    # the data position and noise) move on. The NaN itself is still logged.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep_if_finite = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    ema_params = state.ema_params
    if ema_params is not None:
        ema_params = keep_if_finite(jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p,
                                                 ema_params, params), ema_params)
    time_proposal = state.time_proposal
    if objective == "diffusion" and process.adaptive:  # learns from this step's losses for the next steps' times
        time_proposal = keep_if_finite(process.updated_proposal(
            time_proposal, batch.t_B, research.per_token_losses(stats["loss_B"], batch), research.has_valid(batch)),
            time_proposal)
    new_state = state.replace(step=state.step + 1, params=keep_if_finite(params, state.params),
                              opt_state=keep_if_finite(opt_state, state.opt_state), ema_params=ema_params,
                              time_proposal=time_proposal,
                              skipped_steps=state.skipped_steps + jnp.where(finite, 0, 1).astype(jnp.int32),
                              consecutive_skips=jnp.where(finite, 0, state.consecutive_skips + 1).astype(jnp.int32))
    metrics = {
        names.TRAIN_LOSS: loss,
        names.LEARNING_RATE: jnp.asarray(lr_schedule(state.step), jnp.float32),
        names.GRAD_NORM: grad_norm,
        names.SKIPPED_STEPS: new_state.skipped_steps.astype(jnp.float32),
        names.CONSECUTIVE_SKIPPED_STEPS: new_state.consecutive_skips.astype(jnp.float32),
    }
    if objective == "diffusion":
        metrics.update(tier1_metrics(stats["correct_B"], batch))
        if detailed:
            metrics.update(research.research_metrics(stats, batch, process, stats["loss_B"], grads_by_bucket))
            metrics.update(research.noise_scale_metrics(research.squared_norm(grads), small_sq_sum,
                                                        num_small=max(grad_accum_steps, 2),
                                                        batch_size=tokens_BxL.shape[0]))
            if q_K is not None:  # the proposal this step drew its times from
                metrics.update({names.TIME_PROPOSAL_BIN.format(bin=k): q_K[k] for k in range(q_K.shape[0])})
    return new_state, metrics


def eval_step(params: Any, tokens_BxL: jax.Array, valid_BxL: jax.Array, rng: jax.Array, *,
              graphdef: nnx.GraphDef, process: ForwardProcess, objective: str = "diffusion") -> dict[str, jax.Array]:
    """Sums over one validation batch, to be pooled over all batches by the caller.

    For diffusion, `process` must use exact ELBO weights (`ForwardProcess.for_evaluation`)
    and `nelbo_sum` is the NELBO's numerator; for 'ar' it is the exact NLL's.
    """
    if objective == "ar":
        nll_BxL, _ = autoregressive.token_nll(graphdef, params, tokens_BxL, valid_BxL, process.mask_id)
        zero = jnp.zeros((), jnp.float32)
        return {"nelbo_sum": nll_BxL.sum(), "valid_tokens": valid_BxL.sum().astype(jnp.float32),
                "masked_tokens": zero, "correct_tokens": zero}
    batch = corrupt(process, rng, tokens_BxL, valid_BxL)
    scores = batch_scores(nnx.merge(graphdef, params), batch)
    return {
        "nelbo_sum": weighted_token_losses(scores.nll_BxL, batch).sum(),
        "valid_tokens": batch.valid_BxL.sum().astype(jnp.float32),
        # Weighted by the unbiasing factors, as the loss is: val/mask_accuracy estimates its value under U[t_min, 1].
        "masked_tokens": (batch.unbias_B[:, None] * batch.masked_BxL).sum(),
        "correct_tokens": (batch.unbias_B[:, None] * correct_predictions(scores.predicted_BxL, batch)).sum(),
    }


def _on_gathered_params(step_fn: Callable, mesh: Mesh, params_of: Callable, with_params: Callable) -> Callable:
    """`step_fn` with its parameters all-gathered first under FSDP (`sharding.gather_params`).

    The wrapper keeps `step_fn`'s name, which is what JAX reports when it compiles it (the
    compile counts of tdlm_jax.training.compilation are kept per name).
    """
    def gathered(first: Any, *args: Any, **kwargs: Any) -> Any:
        return step_fn(with_params(first, sharding.gather_params(params_of(first), mesh)), *args, **kwargs)

    name = getattr(step_fn, "__name__", None) or step_fn.func.__name__
    gathered.__name__ = gathered.__qualname__ = name
    return gathered


def _params_first(step_fn: Callable, mesh: Mesh) -> Callable:
    return _on_gathered_params(step_fn, mesh, lambda params: params, lambda _, params: params)


def jit_train_step(mesh: Mesh, state_sharding: Any = None, **static) -> Callable[..., tuple[TrainState, dict]]:
    """`train_step` jitted with donated state; call as f(state, tokens, valid, detailed=bool).

    `state_sharding` is where the new state is placed, normally `sharding.state_shardings(mesh,
    state)` (FSDP over the mesh's fsdp axis); None replicates it. It must match the input
    state's placement, or donation cannot reuse the buffers. Under FSDP the parameters are
    all-gathered for the passes (`sharding.gather_params`). Metrics come back replicated.
    """
    replicated = sharding.replicated(mesh)
    step_fn = _on_gathered_params(functools.partial(train_step, **static), mesh, lambda state: state.params,
                                  lambda state, params: state.replace(params=params))
    return jax.jit(step_fn, static_argnames=("detailed",), donate_argnums=(0,),
                   out_shardings=(state_sharding or replicated, replicated))


def jit_eval_step(mesh: Mesh, **static) -> Callable[..., dict]:
    """`eval_step` jitted; call as f(params, tokens, valid, rng) with params replicated or
    FSDP-sharded (then all-gathered for the pass). Sums come back replicated."""
    return jax.jit(_params_first(functools.partial(eval_step, **static), mesh),
                   out_shardings=sharding.replicated(mesh))


def analysis_step(params: Any, tokens_BxL: jax.Array, valid_BxL: jax.Array, rng: jax.Array,
                  time_proposal: Any = None, step: jax.Array | None = None, *,
                  graphdef: nnx.GraphDef, process: ForwardProcess, max_rows: int) -> dict[str, jax.Array]:
    """The tier-3 metrics of `max_rows` rows of one batch (`advanced.analysed_rows`): a forward
    pass that also returns the model's internals.

    The whole batch is corrupted with `rng` exactly as `train_step` corrupts it, so passing the
    step's key (`step_rng(state.rng, step)`), and under adaptive time sampling the state's
    `time_proposal` and `step`, analyses the very inputs that step trained on.
    Separate from the train step because the explicit attention it needs builds each layer's
    [rows, heads, L, L] probabilities, which the ordinary step never pays for; each layer's are
    reduced to its entropy inside the layer loop, so one layer's is the most ever held.
    """
    q_K = process.proposal_probabilities(time_proposal, step) if process.adaptive else None
    batch = corrupt(process, rng, tokens_BxL, valid_BxL, q_K)
    rows = analysed_rows(tokens_BxL.shape[0], max_rows)
    batch = jax.tree.map(lambda x: x[rows], batch)
    model = nnx.merge(graphdef, params)
    summary = functools.partial(layer_attention_entropy, valid_BxL=batch.valid_BxL)
    hidden_BxLxD, entropy_by_layer_K = model.residual_stream(batch.noisy_BxL, batch.valid_BxL, batch.t_B,
                                                             attention_summary=summary)
    return advanced_metrics(hidden_BxLxD.astype(jnp.float32), entropy_by_layer_K, batch.valid_BxL)


def jit_analysis_step(mesh: Mesh, **static) -> Callable[..., dict]:
    """`analysis_step` jitted; call as f(params, tokens, valid, rng), params replicated or
    FSDP-sharded (then all-gathered). Metrics come back replicated."""
    return jax.jit(_params_first(functools.partial(analysis_step, **static), mesh),
                   out_shardings=sharding.replicated(mesh))
