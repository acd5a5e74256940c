"""Command line: the NELBO of a trained run on a whole data split, with its standard error.

    python -m tdlm_jax.evaluate --workdir=DIR [--split=val|train] [--num_t_samples=K]
        [--batch_size=B] [--max_sequences=N] [--seed=S]

Evaluates the latest checkpoint of DIR on every window of the split (see `tdlm_jax.inference.nelbo`
for the estimator and its standard errors), prints a table, and writes the numbers to
DIR/eval_<step>.json (DIR/eval_<step>_train.json for the training split, so the two never
overwrite each other). Errors a user can cause print one line and exit with status 2.
"""

from __future__ import annotations

import json
import sys
import time

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


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # orbax logs dozens of INFO lines per restore
    # After flag parsing: importing JAX is slow and --help should not wait.
    from tdlm_jax.inference import evaluation, nelbo, trained

    workdir, split = _WORKDIR.value, _SPLIT.value
    try:
        trained_run = trained.load_trained(workdir)
        tokens_NxL, valid_NxL = nelbo.split_windows(trained_run.config, trained_run.tokenizer, split,
                                                    _MAX_SEQUENCES.value)
        tic = time.perf_counter()
        result = nelbo.nelbo_estimate(trained_run, tokens_NxL, valid_NxL, num_t_samples=_NUM_T_SAMPLES.value,
                                      batch_size=_BATCH_SIZE.value, seed=_SEED.value)
        seconds = time.perf_counter() - tic
        if _GEN_PPL_MODEL.value:
            result.update(evaluation.generative_scores(
                trained_run, _GEN_PPL_MODEL.value, num_samples=_GEN_NUM_SAMPLES.value, steps=_GEN_STEPS.value,
                sampler=_GEN_SAMPLER.value, seed=_SEED.value))
    except TdlmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(evaluation.format_report(result, workdir=workdir, split=split, seconds=seconds))
    path = evaluation.results_path(workdir, trained_run.step, split)
    with open(path, "w") as f:
        json.dump({**result, "split": split, "seed": _SEED.value, "seconds": seconds}, f, indent=2)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    app.run(main)
