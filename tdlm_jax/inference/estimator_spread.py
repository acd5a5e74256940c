"""How noisy is the training loss under each time-sampling design, at a fixed checkpoint?

`evaluate --estimator_spread=N` draws the training loss estimate (the run's weighting, the
NELBO estimate the gradient follows) N times on one fixed training-sized batch with the
checkpoint's parameters, with fresh noise each time (times, masks, and the rows' order,
which decides the row each stratum gets), under `iid`,
`stratified` and `adaptive` time sampling, and reports each design's mean and standard
deviation. All three estimate the same quantity (the means agree within their errors);
the standard deviations say how much each design's estimate wanders. `adaptive` needs a
proposal: the last one the run logged (research/time_proposal/bin_*, an adaptive run), or
the last one of the run named by `--proposal_from`.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tdlm_jax.diffusion.corruption import corrupt
from tdlm_jax.diffusion.loss import batch_scores, num_valid_tokens, weighted_token_losses
from tdlm_jax.metrics import catalogue, jsonl
from tdlm_jax.training import config as config_lib

DESIGNS = ("iid", "stratified", "adaptive")
DRAWS_PER_CALL = 8  # draws vmapped in one compiled call


def last_logged_proposal(workdir: str) -> np.ndarray | None:
    """q of the last research row of a run that logged one (an adaptive run), else None."""
    proposals = [q for r in jsonl.read(os.path.join(workdir, jsonl.METRICS_FILE)) if (q := catalogue.time_proposal(r))]
    return np.asarray(proposals[-1], np.float32) if proposals else None


def loss_estimate_spread(trained, tokens_BxL: np.ndarray, valid_BxL: np.ndarray, *, draws: int, seed: int,
                         q_K: np.ndarray | None) -> dict[str, float]:
    """{estimator_spread/<design>_mean, _std, _draws} for each design (adaptive only with `q_K`)."""
    # The stratified layout the run trained with: aligned to its microbatches (one device's
    # layout; a batch that does not split into them is laid out row by row).
    base = config_lib.forward_process(trained.config, trained.tokenizer.mask_id,
                                      microbatches=trained.config.training.get("grad_accum_steps", 1))
    base = dataclasses.replace(base, batch_size=tokens_BxL.shape[0])
    model_params, graphdef = trained.params, trained.graphdef
    tokens, valid = jnp.asarray(tokens_BxL), jnp.asarray(valid_BxL)
    out: dict[str, float] = {}
    for design in DESIGNS:
        if design == "adaptive" and q_K is None:
            continue
        process = dataclasses.replace(base, time_sampling=design,
                                      adaptive_bins=len(q_K) if q_K is not None else base.adaptive_bins)
        q = jnp.asarray(q_K) if design == "adaptive" else None

        def estimate(key, process=process, q=q):
            # The batch's rows in a fresh order each draw, as real batches come: a fixed row-to-stratum
            # assignment would make each design estimate its own conditional mean of this batch.
            order = jax.random.permutation(jax.random.fold_in(key, 1), tokens.shape[0])
            batch = corrupt(process, key, tokens[order], valid[order], q)
            scores = batch_scores(nnx.merge(graphdef, model_params), batch)
            return weighted_token_losses(scores.nll_BxL, batch).sum() / num_valid_tokens(batch)

        fn = jax.jit(jax.vmap(estimate))
        keys = jax.random.split(jax.random.key(seed), math.ceil(draws / DRAWS_PER_CALL) * DRAWS_PER_CALL)
        values = np.concatenate([np.asarray(fn(keys[i:i + DRAWS_PER_CALL]), np.float64)
                                 for i in range(0, len(keys), DRAWS_PER_CALL)])[:draws]
        out[f"estimator_spread/{design}_mean"] = float(values.mean())
        out[f"estimator_spread/{design}_std"] = float(values.std(ddof=1))
        out[f"estimator_spread/{design}_draws"] = draws
    return out


def format_spread(result: dict[str, float]) -> str:
    """The designs' rows: mean ± its standard error, and the standard deviation of one draw."""
    lines = ["training loss estimate over fresh noise draws (one fixed batch, the checkpoint's parameters):",
             f"  {'design':<12}{'mean':>10}{'± s.e.':>9}{'std':>10}"]
    for design in DESIGNS:
        if f"estimator_spread/{design}_std" not in result:
            continue
        std, n = result[f"estimator_spread/{design}_std"], result[f"estimator_spread/{design}_draws"]
        lines.append(f"  {design:<12}{result[f'estimator_spread/{design}_mean']:>10.4f}{std / math.sqrt(n):>9.4f}"
                     f"{std:>10.4f}")
    if "estimator_spread/adaptive_std" not in result:
        lines.append("  adaptive    (no proposal: the run is not adaptive; pass --proposal_from=AN_ADAPTIVE_RUN)")
    return "\n".join(lines)
