"""A trained run's evaluation, as `python -m tdlm_jax.evaluate` reports it: the NELBO table
(`tdlm_jax.inference.nelbo` computes it), where its numbers are saved, and samples scored
by a trained autoregressive run (generative perplexity)."""

from __future__ import annotations

import os
from typing import Callable

from tdlm_jax.errors import ConfigError
from tdlm_jax.inference import generation
from tdlm_jax.inference.trained import TrainedModel, load_trained
from tdlm_jax.metrics.formatting import format_number as fmt  # the project's one number formatter
from tdlm_jax.model import autoregressive

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
                      f"nfe {result['gen/nfe']}) scored by the AR model (float64):",
                  f"  gen/perplexity        {fmt(result['gen/perplexity'])}",
                  f"  gen/unigram_entropy   {fmt(result['gen/unigram_entropy'])} nats (lower: more repetitive)"]
    return "\n".join(lines)


def generative_scores(trained: TrainedModel, ar_workdir: str, *, num_samples: int, steps: int, sampler: str,
                      seed: int) -> dict:
    """Samples of the diffusion run, scored by a trained AR run of this project (float64)."""
    scorer = load_trained(ar_workdir)
    if scorer.config.model.get("kind", "diffusion") != "ar":
        raise ConfigError(f"--gen_ppl_model={ar_workdir} is not an autoregressive run (model.kind must be 'ar')")
    if scorer.config.data.tokenizer != trained.config.data.tokenizer:
        raise ConfigError(f"--gen_ppl_model uses tokenizer {scorer.config.data.tokenizer!r}, this run "
                          f"{trained.config.data.tokenizer!r}: they must match")
    tokens_NxL, nfe = generation.sample_tokens(trained, num_samples=num_samples, steps=steps, method=sampler,
                                               seed=seed)
    scores = autoregressive.generative_perplexity(scorer.model(), tokens_NxL, scorer.tokenizer.mask_id)
    return {**scores, "gen/sampler": sampler, "gen/steps": steps, "gen/nfe": nfe, "gen/scorer_step": scorer.step}


def results_path(workdir: str, step: int, split: str) -> str:
    return os.path.join(workdir, f"eval_{step}.json" if split == "val" else f"eval_{step}_{split}.json")
