"""Command line: the NELBO of a trained run on a whole data split, with its standard error.

    python -m tdlm_jax.evaluate --workdir=DIR [--split=val|train] [--num_t_samples=K]
        [--batch_size=B] [--max_sequences=N] [--seed=S]

Evaluates the latest checkpoint of DIR on every window of the split (see `tdlm_jax.nelbo`
for the estimator and its standard errors), prints a table, and writes the numbers to
DIR/eval_<step>.json (DIR/eval_<step>_train.json for the training split, so the two never
overwrite each other). Errors a user can cause print one line and exit with status 2.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable

from absl import app, flags, logging

from tdlm_jax.errors import TdlmError

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by tdlm_jax.main.")
_SPLIT = flags.DEFINE_enum("split", "val", ["val", "train"], "Which split of the run's text to evaluate.")
_NUM_T_SAMPLES = flags.DEFINE_integer(
    "num_t_samples", 8, "Time samples per sequence, on a stratified grid of [t_min, 1].")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "Sequences per batch, a multiple of the device count. Default: the run's "
    "data.eval_batch_size.")
_MAX_SEQUENCES = flags.DEFINE_integer(
    "max_sequences", None, "Evaluate only the first N windows of the split (quick runs). Default: all.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the times and masks; fixed, so reruns agree exactly.")
_GEN_PPL_MODEL = flags.DEFINE_string(
    "gen_ppl_model", None, "Workdir of a trained autoregressive run (configs/ar_baseline.py): also score "
    "samples of this run with it, reporting generative perplexity and the samples' unigram entropy.")
_GEN_NUM_SAMPLES = flags.DEFINE_integer("gen_num_samples", 32, "Samples to score with --gen_ppl_model.")
_GEN_STEPS = flags.DEFINE_integer("gen_steps", 128, "Sampling steps of those samples.")
_GEN_SAMPLER = flags.DEFINE_string("gen_sampler", "ancestral", "Sampler of those samples (see tdlm_jax.sample).")
flags.mark_flag_as_required("workdir")


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _interval(row: dict) -> str:
    """[lo, hi) of a level; the last level is closed at 1."""
    return f"[{row['lo']:.1f}, {row['hi']:.1f}{']' if row['hi'] == 1.0 else ')'}"


def level_table(rows: list[dict], label: Callable[[dict], str]) -> list[str]:
    """Lines of a per-corruption-level table (curve bins or buckets)."""
    lines = [f"  {'masking rate':<22}{'samples':>9}{'masked tok':>12}{'CE/masked':>11}{'accuracy':>10}"
             f"{'NELBO part':>12}"]
    for row in rows:
        lines.append(f"  {label(row):<22}{row['samples']:>9}{row['masked_tokens']:>12}"
                     f"{_fmt(row['loss'], '.4f'):>11}{_fmt(row['accuracy'], '.4f'):>10}{row['nelbo']:>12.4f}")
    return lines


def format_report(result: dict, *, workdir: str, split: str, seconds: float) -> str:
    """The human-readable report: the bound, then loss and accuracy by corruption level."""
    lines = [
        f"NELBO of {workdir} at step {result['eval/step']} on the {split} split "
        f"({result['eval/num_sequences']} sequences, {result['eval/num_tokens']} tokens, "
        f"{result['eval/num_t_samples']} t-samples each, {seconds:.1f} s)",
        f"  eval/nelbo            {result['eval/nelbo']:.4f} ± {_fmt(result['eval/nelbo_stderr'], '.4f')} "
        "nats/token (± one standard error over sequences)",
        f"  eval/bits_per_token   {result['eval/bits_per_token']:.4f}",
        f"  eval/perplexity_bound {result['eval/perplexity_bound']:.4f}",
        f"  eval/mask_accuracy    {_fmt(result['eval/mask_accuracy'], '.4f')}",
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
                  f"  gen/perplexity        {result['gen/perplexity']:.4f}",
                  f"  gen/unigram_entropy   {result['gen/unigram_entropy']:.4f} nats (low: repetitive samples)"]
    return "\n".join(lines)


def generative_scores(trained, ar_workdir: str) -> dict:
    """Samples of the diffusion run, scored by a trained AR run of this project (float64)."""
    from tdlm_jax import autoregressive, generation, workdir as workdir_lib
    from tdlm_jax.errors import ConfigError

    scorer = workdir_lib.load_trained(ar_workdir)
    if scorer.config.model.get("kind", "diffusion") != "ar":
        raise ConfigError(f"--gen_ppl_model={ar_workdir} is not an autoregressive run (model.kind must be 'ar')")
    if scorer.config.data.tokenizer != trained.config.data.tokenizer:
        raise ConfigError(f"--gen_ppl_model uses tokenizer {scorer.config.data.tokenizer!r}, this run "
                          f"{trained.config.data.tokenizer!r}: they must match")
    tokens_NxL, nfe = generation.sample_tokens(trained, num_samples=_GEN_NUM_SAMPLES.value, steps=_GEN_STEPS.value,
                                               method=_GEN_SAMPLER.value, seed=_SEED.value)
    scores = autoregressive.generative_perplexity(scorer.model(), tokens_NxL, scorer.tokenizer.mask_id)
    return {**scores, "gen/sampler": _GEN_SAMPLER.value, "gen/steps": _GEN_STEPS.value, "gen/nfe": nfe,
            "gen/scorer_step": scorer.step}


def results_path(workdir: str, step: int, split: str) -> str:
    return os.path.join(workdir, f"eval_{step}.json" if split == "val" else f"eval_{step}_{split}.json")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # orbax logs dozens of INFO lines per restore
    # After flag parsing: importing JAX is slow and --help should not wait.
    from tdlm_jax import nelbo, workdir as workdir_lib

    workdir, split = _WORKDIR.value, _SPLIT.value
    try:
        trained = workdir_lib.load_trained(workdir)
        tokens_NxL, valid_NxL = nelbo.split_windows(trained.config, trained.tokenizer, split, _MAX_SEQUENCES.value)
        tic = time.perf_counter()
        result = nelbo.nelbo_estimate(trained, tokens_NxL, valid_NxL, num_t_samples=_NUM_T_SAMPLES.value,
                                      batch_size=_BATCH_SIZE.value, seed=_SEED.value)
        seconds = time.perf_counter() - tic
        if _GEN_PPL_MODEL.value:
            result.update(generative_scores(trained, _GEN_PPL_MODEL.value))
    except TdlmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_report(result, workdir=workdir, split=split, seconds=seconds))
    path = results_path(workdir, trained.step, split)
    with open(path, "w") as f:
        json.dump({**result, "split": split, "seed": _SEED.value, "seconds": seconds}, f, indent=2)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    app.run(main)
