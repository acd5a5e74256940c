"""The NELBO of a trained denoiser over a whole data split, with a standard error.

Estimator. Sequence n (v_n valid tokens) gets K times on a stratified grid,
t_{n,k} = t_min + (1 − t_min)·(k + u_{n,k})/K, k = 0..K−1, u_{n,k} ~ U[0, 1). At each, every
valid token is masked with probability 1 − α(t) (`corrupt_at_times`, the training rule)
and the masked tokens are scored with the exact ELBO weight w(t) = −α′/(1 − α), whatever
weighting the run trained with. e_n = (1/K)·Σ_k Σ_masked w·CE is an unbiased estimate of
the sequence's NELBO in nats (stratification only lowers its variance), and the NELBO per
token is R = Σ_n e_n / Σ_n v_n.

Randomness. The draws of (n, k) come from fold_in(fold_in(key(seed), n), k), so a
sequence's noise depends on its index alone: the result is the same for every batch size
and device count, and sequences are independent given the data.

Standard errors. `eval/nelbo_stderr` treats sequences as the independent units and uses
the delta method for a ratio of sums: se(R)² = Σ_n (e_n − R·v_n)² / (N(N − 1)·v̄²), v̄ the
mean of v_n. When every v_n is equal (every window of a split is full except possibly the
last) this is exactly the plain standard error of the per-token means e_n/v_n. It covers
both the Monte-Carlo noise of t and the masks and the spread between windows, i.e. it
treats the split as a sample of text. (The Monte-Carlo part alone is not reported: the
spread of a sequence's K stratified samples includes the differences between strata, so
it overstates that part, in practice beyond the total.)

Corruption curve. The same (sequence, t) samples, binned by masking rate 1 − α(t): per bin
and per corruption bucket (`metrics.bucket_edges`) the unweighted CE per masked token, the
argmax accuracy of masked tokens, and the bin's share of the NELBO (the shares add up to
`eval/nelbo`, like `research/*_corruption_loss`). No extra forward passes are needed.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from tdlm_jax.data import dataset
from tdlm_jax.diffusion.corruption import ForwardProcess, corrupt_at_times
from tdlm_jax.diffusion.loss import correct_predictions, scoring_targets, weighted_token_losses
from tdlm_jax.errors import ConfigError, DataError
from tdlm_jax.metrics.aggregation import perplexity
from tdlm_jax.model.head import scores_from_logits
from tdlm_jax.parallel import sharding
from tdlm_jax.training import config as config_lib

if TYPE_CHECKING:
    from tdlm_jax.inference.trained import TrainedModel

# (params, noisy_BxL, valid_BxL, t_B) -> float32 logits [B, L, V], −inf at unpredictable ids.
ModelFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]

BUCKET_NAMES = ("low", "medium", "high")
NUM_CURVE_BINS = 10  # equal-width masking-rate bins of the corruption curve
SPLITS = ("val", "train")


def denoiser_fn(graphdef: nnx.GraphDef) -> ModelFn:
    """The model function of a Denoiser graph: params are an argument, never jit constants."""
    def apply(params: Any, noisy_BxL: jax.Array, valid_BxL: jax.Array, t_B: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, params)(noisy_BxL, valid_BxL, t_B)
    return apply


def split_windows(config, tokenizer, split: str, max_sequences: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """All windows of a run's split, as training defines them (first `max_sequences` if set)."""
    if split not in SPLITS:
        raise ConfigError(f"--split={split!r}: must be one of {', '.join(SPLITS)}")
    if max_sequences is not None and max_sequences < 1:
        raise ConfigError(f"--max_sequences={max_sequences}: must be a positive integer (leave it out for all)")
    # Windows are cut from the memory-mapped token cache: only the ones asked for are read,
    # so a capped evaluation of a large corpus's training split stays cheap.
    return dataset.training_windows(config.data, tokenizer)[split].rows(0, max_sequences or None)


def sample_noise(key: jax.Array, seq_ids_B: jax.Array, k: jax.Array, *, t_min: float, num_t_samples: int,
                 length: int) -> tuple[jax.Array, jax.Array]:
    """Time t_B in stratum k of each sequence and the U[0, 1) draws of its masks, [B, L]."""
    def one_sequence(seq_id):
        time_key, mask_key = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, seq_id), k))
        u = jax.random.uniform(time_key, ())
        t = t_min + (1.0 - t_min) * (k + u) / num_t_samples
        return t, jax.random.uniform(mask_key, (length,))
    return jax.vmap(one_sequence)(seq_ids_B)


def sample_stats(params: Any, tokens_BxL: jax.Array, valid_BxL: jax.Array, seq_ids_B: jax.Array, k: jax.Array,
                 key: jax.Array, *, model_fn: ModelFn, process: ForwardProcess, num_t_samples: int
                 ) -> dict[str, jax.Array]:
    """Per-sequence sums of one t-sample of a batch: every value has shape [B]."""
    t_B, uniforms_BxL = sample_noise(key, seq_ids_B, k, t_min=process.t_min, num_t_samples=num_t_samples,
                                     length=tokens_BxL.shape[1])
    batch = corrupt_at_times(process, tokens_BxL, valid_BxL, t_B, uniforms_BxL)
    logits_BxLxV = model_fn(params, batch.noisy_BxL, batch.valid_BxL, batch.t_B)
    scores = scores_from_logits(logits_BxLxV, scoring_targets(batch))
    # The loss code with unit weights gives the plain CE of the masked tokens, so the curve
    # shares every detail (padding, float32 log-softmax) with the NELBO itself.
    unweighted = batch.replace(weight_B=jnp.ones_like(batch.weight_B))
    return {
        "mask_rate": batch.mask_rate_B,
        "nelbo": weighted_token_losses(scores.nll_BxL, batch).sum(axis=-1),
        "ce": weighted_token_losses(scores.nll_BxL, unweighted).sum(axis=-1),
        "masked": batch.masked_BxL.sum(axis=-1),
        "correct": correct_predictions(scores.predicted_BxL, batch).sum(axis=-1),
    }


def per_sample_stats(step_fn: Callable, params: Any, tokens_NxL: np.ndarray, valid_NxL: np.ndarray, *,
                     batch_size: int, num_t_samples: int, key: jax.Array, mesh) -> dict[str, np.ndarray]:
    """Runs `step_fn` (a jitted `sample_stats`) over every batch and t-sample: arrays [N, K].

    The final batch is filled with all-invalid rows, which contribute nothing and are dropped.
    """
    n = len(tokens_NxL)
    total = -(-n // batch_size) * batch_size
    pad = lambda x: np.concatenate([x, np.zeros((total - n,) + x.shape[1:], x.dtype)])
    rows = {"tokens": pad(np.asarray(tokens_NxL, np.int32)), "valid": pad(np.asarray(valid_NxL, bool)),
            "seq_ids": np.arange(total, dtype=np.int32)}
    local = batch_size // jax.process_count()  # each host feeds its own rows, as in build_data
    fetched, pending = [], None
    for start in range(0, total, batch_size):
        first = start + jax.process_index() * local
        batch = sharding.global_batch({name: x[first:first + local] for name, x in rows.items()}, mesh)
        current = [step_fn(params, batch["tokens"], batch["valid"], batch["seq_ids"], k, key)
                   for k in range(num_t_samples)]
        # Fetch the previous batch only now, so the device always has the next one queued,
        # while the work in flight stays bounded on a split of any size.
        if pending is not None:
            fetched.append(_fetch(pending))
        pending = current
    fetched.append(_fetch(pending))
    return {name: np.stack([np.concatenate([b[k][name] for b in fetched]) for k in range(num_t_samples)],
                           axis=1)[:n].astype(np.float64)
            for name in fetched[0][0]}


def ratio_estimate(estimates_N: np.ndarray, tokens_N: np.ndarray) -> tuple[float, float | None]:
    """R = Σ e_n / Σ v_n and its delta-method standard error (None for a single sequence)."""
    ratio = float(estimates_N.sum() / tokens_N.sum())
    n = len(estimates_N)
    if n < 2:
        return ratio, None
    residuals_N = estimates_N - ratio * tokens_N
    return ratio, float(math.sqrt((residuals_N**2).sum() / (n * (n - 1))) / tokens_N.mean())


def level_rows(stats: dict[str, np.ndarray], edges: tuple[float, ...], nelbo_denominator: float) -> list[dict]:
    """Per masking-rate interval [edges[i], edges[i+1]) (the last closed): loss, accuracy, share."""
    level_NxK = np.clip(np.searchsorted(edges, stats["mask_rate"], side="right") - 1, 0, len(edges) - 2)
    rows = []
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        inside = level_NxK == i
        masked = stats["masked"][inside].sum()
        rows.append({
            "lo": float(lo), "hi": float(hi),
            "samples": int(inside.sum()),
            "masked_tokens": int(masked),
            # An empty level's loss and accuracy are missing, never 0 (the project's rule).
            "loss": float(stats["ce"][inside].sum() / masked) if masked else None,
            "accuracy": float(stats["correct"][inside].sum() / masked) if masked else None,
            "nelbo": float(stats["nelbo"][inside].sum() / nelbo_denominator),
        })
    return rows


def summarize(stats: dict[str, np.ndarray], tokens_N: np.ndarray, bucket_edges: tuple[float, ...]) -> dict:
    """The report of a run of `per_sample_stats`: scalars `eval/*`, plus the rows of the
    buckets (also flattened into `eval/{low,medium,high}_corruption_*`) and of the curve."""
    n, k = stats["nelbo"].shape
    nelbo, stderr = ratio_estimate(stats["nelbo"].mean(axis=1), tokens_N)
    masked = stats["masked"].sum()
    result = {
        "eval/nelbo": nelbo,
        "eval/nelbo_stderr": stderr,
        "eval/bits_per_token": nelbo / math.log(2),
        "eval/perplexity_bound": perplexity(nelbo),
        "eval/mask_accuracy": float(stats["correct"].sum() / masked) if masked else None,
        "eval/num_sequences": n,
        "eval/num_tokens": int(tokens_N.sum()),
        "eval/num_t_samples": k,
    }
    denominator = k * float(tokens_N.sum())  # so each level's share is its part of eval/nelbo
    bucket_rows = level_rows(stats, bucket_edges, denominator)
    buckets = [{"name": name, **row} for name, row in zip(BUCKET_NAMES, bucket_rows)]
    for row in buckets:
        result.update({f"eval/{row['name']}_corruption_{what}": row[what]
                       for what in ("loss", "accuracy", "nelbo", "samples")})
    result["buckets"] = buckets
    result["curve"] = level_rows(stats, tuple(np.linspace(0.0, 1.0, NUM_CURVE_BINS + 1)), denominator)
    return result


def estimate(model_fn: ModelFn, params: Any, tokens_NxL: np.ndarray, valid_NxL: np.ndarray, *,
             process: ForwardProcess, num_t_samples: int, batch_size: int, seed: int = 0) -> dict:
    """The NELBO report of `model_fn` on these sequences (see the module docstring).

    `process` supplies the schedule, t_min, [MASK] id and bucket edges; its weighting is
    replaced by the exact ELBO weight. Batches are sharded over every device.
    """
    mesh = sharding.make_mesh()
    _check_sizes(len(tokens_NxL), num_t_samples, batch_size, jax.device_count())
    process = process.for_evaluation(batch_size)
    step_fn = jax.jit(functools.partial(sample_stats, model_fn=model_fn, process=process,
                                        num_t_samples=num_t_samples),
                      # Outputs stay sharded like the batch: the program then needs no collective, and
                      # XLA:CPU can deadlock when many in-flight programs wait on each other's.
                      out_shardings=sharding.batch_sharded(mesh))
    stats = per_sample_stats(step_fn, params, tokens_NxL, valid_NxL, batch_size=batch_size,
                             num_t_samples=num_t_samples, key=jax.random.key(seed), mesh=mesh)
    tokens_N = np.asarray(valid_NxL).sum(axis=1).astype(np.float64)
    return summarize(stats, tokens_N, process.bucket_edges)


def nelbo_estimate(trained: TrainedModel, tokens_NxL: np.ndarray, valid_NxL: np.ndarray, *, num_t_samples: int,
                   batch_size: int | None = None, seed: int = 0) -> dict:
    """`estimate` for a trained run, with its config's forward process.

    `batch_size` defaults to the run's `data.eval_batch_size`. Adds `eval/step`.
    """
    kind = trained.config.model.get("kind", "diffusion")
    if kind != "diffusion":
        raise ConfigError(f"model.kind={kind!r}: this run is not a masked diffusion model, "
                          "whose NELBO this evaluation measures")
    process = config_lib.forward_process(trained.config, trained.tokenizer.mask_id)
    result = estimate(denoiser_fn(trained.graphdef), trained.params, tokens_NxL, valid_NxL, process=process,
                      num_t_samples=num_t_samples, batch_size=batch_size or trained.config.data.eval_batch_size,
                      seed=seed)
    return {**result, "eval/step": trained.step}


def _fetch(tree: Any) -> Any:
    """Batch-sharded device arrays to host numpy arrays holding every host's rows."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def _check_sizes(num_sequences: int, num_t_samples: int, batch_size: int, divisor: int) -> None:
    if num_sequences < 1:
        raise DataError("no sequences to evaluate: pass at least one window")
    if num_t_samples < 1:
        raise ConfigError(f"--num_t_samples={num_t_samples}: must be a positive integer")
    if batch_size < 1 or batch_size % divisor:
        raise ConfigError(f"--batch_size={batch_size}: must be a positive multiple of {divisor}, "
                          "the number of devices, so every device gets the same rows")
