"""Command line: the NELBO of a trained run on a whole data split, with its standard error.

    python -m tdlm_jax.evaluate --workdir=DIR [--split=val|train] [--num_t_samples=K]
        [--batch_size=B] [--max_sequences=N] [--seed=S]
        [--gen_ppl_model=AR_DIR [--gen_sampler=S --gen_steps=K --gen_num_samples=N --sampling_dtype=float64]]
        [--samplers=ancestral,confidence,random_remask,first_hitting --sampler_steps=16,32,64,128,256]
        [--estimator_spread=N [--proposal_from=ADAPTIVE_DIR]]

Evaluates the latest checkpoint of DIR on every window of the split (see `tdlm_jax.inference.nelbo`
for the estimator and its standard errors), prints a table, and writes the numbers to
DIR/eval_<step>.json (DIR/eval_<step>_train.json for the training split, so the two never
overwrite each other), with the eval card that pins its protocol. --samplers adds the
speed–quality comparison (`tdlm_jax.inference.sampler_comparison`): DIR/samplers_<step>.json
and a page with its plots, DIR/samplers_<step>.html. --estimator_spread adds the training
loss estimate's spread over N fresh noise draws under each time-sampling design
(`tdlm_jax.inference.estimator_spread`). Errors a user can cause print one line and exit
with status 2.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags, logging

from tdlm_jax.errors import ConfigError, TdlmError

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
_SAMPLING_DTYPE = flags.DEFINE_string(
    "sampling_dtype", "float64", "Precision of the samples' categorical draws: float64 (float32 draws lower "
    "the effective temperature and flatter generative perplexity) or float32.")
_SAMPLERS = flags.DEFINE_string(
    "samplers", None, "Compare these samplers (comma-separated, e.g. ancestral,confidence,random_remask,"
    "first_hitting) at every --sampler_steps, scored by --gen_ppl_model; writes DIR/samplers_<step>.json "
    "and .html.")
_SAMPLER_STEPS = flags.DEFINE_string("sampler_steps", "16,32,64,128,256", "Step counts of --samplers.")
_ESTIMATOR_SPREAD = flags.DEFINE_integer(
    "estimator_spread", 0, "Also draw the training loss estimate this many times on one fixed training-sized batch "
    "of the split, with fresh noise, under iid, stratified and adaptive time sampling, and report each one's spread.")
_PROPOSAL_FROM = flags.DEFINE_string(
    "proposal_from", None, "Workdir of an adaptive run whose last logged proposal --estimator_spread uses for "
    "'adaptive' (default: this run's own, if it is adaptive).")
flags.mark_flag_as_required("workdir")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # orbax logs dozens of INFO lines per restore
    # After flag parsing: importing JAX is slow and --help should not wait.
    from tdlm_jax.inference import estimator_spread, evaluation, nelbo, sampler_comparison, trained

    workdir, split = _WORKDIR.value, _SPLIT.value
    try:
        if _SAMPLERS.value is not None:  # checked before the slow parts
            if not _GEN_PPL_MODEL.value:
                raise ConfigError("--samplers needs --gen_ppl_model, the autoregressive run that scores the samples")
            comparing = sampler_comparison.pairs(sampler_comparison.parse_list(_SAMPLERS.value, "samplers"),
                                                 sampler_comparison.parse_list(_SAMPLER_STEPS.value, "sampler_steps",
                                                                               int))
        trained_run = trained.load_trained(workdir)
        tokens_NxL, valid_NxL = nelbo.split_windows(trained_run.config, trained_run.tokenizer, split,
                                                    _MAX_SEQUENCES.value)
        tic = time.perf_counter()
        result = nelbo.nelbo_estimate(trained_run, tokens_NxL, valid_NxL, num_t_samples=_NUM_T_SAMPLES.value,
                                      batch_size=_BATCH_SIZE.value, seed=_SEED.value)
        seconds = time.perf_counter() - tic
        card = {"split": split, "num_sequences": result["eval/num_sequences"], "num_t_samples": _NUM_T_SAMPLES.value,
                "seed": _SEED.value}
        records = None
        if _GEN_PPL_MODEL.value:
            scorer = evaluation.load_scorer(_GEN_PPL_MODEL.value, trained_run)
            card.update(sampler=_GEN_SAMPLER.value, sampler_steps=_GEN_STEPS.value, gen_num_samples=_GEN_NUM_SAMPLES.value,
                        temperature=1.0, top_k=0, top_p=1.0, sampling_dtype=_SAMPLING_DTYPE.value,
                        scorer=os.path.abspath(_GEN_PPL_MODEL.value), scorer_step=scorer.step,
                        scorer_val_loss=evaluation.scorer_val_loss(_GEN_PPL_MODEL.value))
            gen = evaluation.generative_scores(trained_run, scorer, num_samples=_GEN_NUM_SAMPLES.value,
                                               steps=_GEN_STEPS.value, sampler=_GEN_SAMPLER.value, seed=_SEED.value,
                                               sampling_dtype=_SAMPLING_DTYPE.value)
            gen["gen/data_unigram_entropy"] = evaluation.data_unigram_entropy(trained_run, _GEN_NUM_SAMPLES.value)
            result.update(gen)
            if _SAMPLERS.value is not None:
                records = sampler_comparison.compare(
                    trained_run, scorer, samplers=list(dict.fromkeys(name for name, _ in comparing)),
                    steps=sorted({k for _, k in comparing}), num_samples=_GEN_NUM_SAMPLES.value, seed=_SEED.value,
                    sampling_dtype=_SAMPLING_DTYPE.value)
        spread = None
        if _ESTIMATOR_SPREAD.value > 0:
            rows = trained_run.config.training.batch_size
            spread = estimator_spread.loss_estimate_spread(
                trained_run, tokens_NxL[:rows], valid_NxL[:rows], draws=_ESTIMATOR_SPREAD.value, seed=_SEED.value,
                q_K=estimator_spread.last_logged_proposal(_PROPOSAL_FROM.value or workdir))
            result.update(spread)
        result["card"] = evaluation.eval_card(trained_run, **card)
    except TdlmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(evaluation.format_report(result, workdir=workdir, split=split, seconds=seconds))
    if spread is not None:
        print("\n" + estimator_spread.format_spread(spread))
    path = evaluation.results_path(workdir, trained_run.step, split)
    with open(path, "w") as f:
        json.dump({**result, "split": split, "seed": _SEED.value, "seconds": seconds}, f, indent=2)
    print(f"\nwrote {path}")
    if records is not None:
        write_comparison(workdir, trained_run.step, records, result["card"])


def write_comparison(workdir: str, step: int, records: list[dict], card: dict) -> None:
    """samplers_<step>.json (the records and their card) and samplers_<step>.html."""
    from tdlm_jax.analysis import sampler_page
    from tdlm_jax.inference import sampler_comparison

    print("\nsamplers (same samples, seed and scorer for each; s/sample after compilation):")
    print(sampler_comparison.format_table(records))
    json_path = sampler_comparison.results_path(workdir, step, "json")
    with open(json_path, "w") as f:
        # The card less its single-sampler settings, which the records replace.
        json.dump({"card": {k: v for k, v in card.items() if k not in ("sampler", "sampler_steps")},
                   "records": records}, f, indent=2)
    html_path = sampler_comparison.results_path(workdir, step, "html")
    with open(html_path, "w", encoding="utf-8") as f:
        f.write(sampler_page.render_page(records, card, os.path.abspath(workdir)))
    print(f"wrote {json_path} and {html_path}")


if __name__ == "__main__":
    app.run(main)
