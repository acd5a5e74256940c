"""A trained run's evaluation, as `python -m tdlm_jax.evaluate` reports it: the NELBO table
(`tdlm_jax.inference.nelbo` computes it), where its numbers are saved, samples scored by a
trained autoregressive run (generative perplexity, against the data's own unigram entropy),
and the eval card that pins the protocol of every number down."""

from __future__ import annotations

import importlib.metadata
import os
import time
from typing import Any, Callable

import numpy as np

from tdlm_jax.errors import ConfigError
from tdlm_jax.inference import generation, nelbo
from tdlm_jax.inference.trained import TrainedModel, load_trained
from tdlm_jax.metrics import catalogue, jsonl
from tdlm_jax.metrics.formatting import format_number as fmt  # the project's one number formatter
from tdlm_jax.model import autoregressive
from tdlm_jax.training import config as config_lib

MISSING = "—"


def _interval(row: dict) -> str:
    """[lo, hi) of a level; the last level is closed at 1."""
    return f"[{row['lo']:.1f}, {row['hi']:.1f}{']' if row['hi'] == 1.0 else ')'}"


def level_table(rows: list[dict], label: Callable[[dict], str]) -> list[str]:
    """Lines of a per-corruption-level table (curve bins or buckets)."""
    lines = [f"  {'masking rate':<22}{'samples':>9}{'masked tok':>12}{'CE/masked':>11}{'accuracy':>10}"
             f"{'NELBO part':>12}"]
    for row in rows:
        lines.append(f"  {label(row):<22}{row['samples']:>9}{row['masked_tokens']:>12}"
                     f"{fmt(row['loss'], MISSING):>11}{fmt(row['accuracy'], MISSING):>10}{fmt(row['nelbo']):>12}")
    return lines


def format_report(result: dict, *, workdir: str, split: str, seconds: float) -> str:
    """The human-readable report: the bound, then loss and accuracy by corruption level."""
    lines = [
        f"NELBO of {workdir} at step {result['eval/step']} on the {split} split "
        f"({result['eval/num_sequences']} sequences, {result['eval/num_tokens']} tokens, "
        f"{result['eval/num_t_samples']} t-samples each, {seconds:.1f} s)",
        f"  eval/nelbo            {fmt(result['eval/nelbo'])} ± {fmt(result['eval/nelbo_stderr'], MISSING)} "
        "nats/token (± one standard error over sequences)",
        f"  eval/bits_per_token   {fmt(result['eval/bits_per_token'])}",
        f"  eval/perplexity_bound {fmt(result['eval/perplexity_bound'])}",
        f"  eval/mask_accuracy    {fmt(result['eval/mask_accuracy'], MISSING)}",
        "",
        "by masking rate 1 − α(t) (CE and accuracy over masked tokens; NELBO parts add up to eval/nelbo):",
        *level_table(result["curve"], _interval),
        "",
        "by corruption bucket:",
        *level_table(result["buckets"], lambda row: f"{row['name']} {_interval(row)}"),
    ]
    if "gen/perplexity" in result:
        lines += ["", f"{result['gen/num_samples']} samples ({result['gen/sampler']}, {result['gen/steps']} steps, "
                      f"nfe {result['gen/nfe']}, {result['card']['sampling_dtype']} draws) scored by the AR model "
                      "(float64):",
                  f"  gen/perplexity        {fmt(result['gen/perplexity'])}",
                  f"  gen/unigram_entropy   {fmt(result['gen/unigram_entropy'])} nats (the data's: "
                  f"{fmt(result['gen/data_unigram_entropy'])}; lower: more repetitive)"]
        warning = diversity_warning(result["gen/unigram_entropy"], result["gen/data_unigram_entropy"])
        lines += [f"  warning: {warning}"] if warning else []
    return "\n".join(lines)


def load_scorer(ar_workdir: str, trained: TrainedModel) -> TrainedModel:
    """The autoregressive run that scores `trained`'s samples (same tokenizer)."""
    scorer = load_trained(ar_workdir)
    if scorer.config.model.get("kind", "diffusion") != "ar":
        raise ConfigError(f"--gen_ppl_model={ar_workdir} is not an autoregressive run (model.kind must be 'ar')")
    if scorer.config.data.tokenizer != trained.config.data.tokenizer:
        raise ConfigError(f"--gen_ppl_model uses tokenizer {scorer.config.data.tokenizer!r}, this run "
                          f"{trained.config.data.tokenizer!r}: they must match")
    return scorer


def generative_scores(trained: TrainedModel, scorer: TrainedModel, *, num_samples: int, steps: int, sampler: str,
                      seed: int, sampling_dtype: str = "float64") -> dict:
    """Samples of the diffusion run, scored by a trained AR run of this project (float64),
    with the seconds their drawing took (the sampler compiled first, and not timed)."""
    options = dict(num_samples=num_samples, steps=steps, method=sampler, seed=seed, sampling_dtype=sampling_dtype)
    generation.sample_tokens(trained, **{**options, "seed": seed + 1})  # compiles; same shapes, other draws
    tic = time.perf_counter()
    tokens_NxL, nfe = generation.sample_tokens(trained, **options)
    seconds = time.perf_counter() - tic
    scores = autoregressive.generative_perplexity(scorer.model(), tokens_NxL, scorer.tokenizer.mask_id)
    return {**scores, "gen/sampler": sampler, "gen/steps": steps, "gen/nfe": nfe, "gen/scorer_step": scorer.step,
            "gen/seconds_per_sample": seconds / num_samples,
            "gen/samples": [trained.tokenizer.decode(row) for row in tokens_NxL[:SAMPLES_KEPT]]}


SAMPLES_KEPT = 3  # of each sampler's samples, kept in the results
LOW_DIVERSITY_RATIO = 0.9  # samples' unigram entropy below this share of the data's: warned


def data_unigram_entropy(trained: TrainedModel, num_sequences: int) -> float:
    """The unigram entropy (nats) of the first `num_sequences` validation windows: the value
    samples of the same size should reach."""
    tokens_NxL, valid_NxL = nelbo.split_windows(trained.config, trained.tokenizer, "val", num_sequences)
    counts = np.bincount(tokens_NxL[valid_NxL].ravel()).astype(np.float64)
    freqs = counts[counts > 0] / counts.sum()
    return float(-(freqs * np.log(freqs)).sum())


def diversity_warning(entropy: float, data_entropy: float) -> str | None:
    """The low-diversity failure that makes generative perplexity look good, in words."""
    if entropy >= LOW_DIVERSITY_RATIO * data_entropy:
        return None
    return (f"the samples' unigram entropy {fmt(entropy)} nats is well below the data's {fmt(data_entropy)}: "
            "they repeat frequent tokens, so their low generative perplexity is not quality")


def scorer_val_loss(ar_workdir: str) -> float | None:
    """The scorer run's best validation loss (summary.json), None if it has none yet."""
    summary = jsonl.read_json(os.path.join(ar_workdir, jsonl.SUMMARY_FILE)) or {}
    return summary.get(catalogue.BEST_VAL_LOSS)


VERSIONED = ("tdlm_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")


def eval_card(trained: TrainedModel, **protocol: Any) -> dict[str, Any]:
    """What pins a number down so it can be reproduced from the card alone: the checkpoint, the
    parameters used (EMA or raw), the protocol's settings and the library versions."""
    versions = {}
    for package in VERSIONED:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"checkpoint_step": trained.step, "ema": config_lib.ema_decay(trained.config) > 0,
            "sample_length": trained.config.data.seq_len, **protocol, "versions": versions}


def results_path(workdir: str, step: int, split: str) -> str:
    return os.path.join(workdir, f"eval_{step}.json" if split == "val" else f"eval_{step}_{split}.json")
