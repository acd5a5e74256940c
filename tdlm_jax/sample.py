"""Command line: `python -m tdlm_jax.sample --workdir=DIR [--sampler=confidence] [--prompt=TEXT] ...`.

Restores the latest checkpoint of a run and prints decoded samples, one block per sample,
then the number of denoiser calls (nfe). The parameters are the ones the run evaluated
with: the EMA of the weights when it kept one (training.ema_decay > 0), else the raw
weights. `tdlm_jax.inference.generation` holds the reusable part. Errors a user can cause
print one line and exit with status 2.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from tdlm_jax.data.dataset import load_tokenizer
from tdlm_jax.diffusion.sampling import SAMPLERS, resolve_sampler
from tdlm_jax.errors import TdlmError
from tdlm_jax.inference.generation import format_samples, make_template, sample_texts
from tdlm_jax.inference.trained import load_config, load_trained

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by tdlm_jax.main; its latest "
                               "checkpoint is used (its EMA weights when the run kept them).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 8, "Number of samples, generated as one batch.")
_STEPS = flags.DEFINE_integer("steps", 128, "Sampling steps (split evenly over blocks with --block_length).")
# A string, not an enum, so that a bad name is a one-line error like every other user error.
# The default is the sampler with the best measured quality on base.py (README, Sampling).
_SAMPLER = flags.DEFINE_string("sampler", "ancestral", f"One of {', '.join(SAMPLERS)}: MDLM ancestral "
                               "sampling, LLaDA low-confidence remasking, LLaDA random remasking, or the "
                               "first-hitting sampler (exact infinite-step ancestral, one call per mask).")
_PROMPT = flags.DEFINE_string("prompt", "", "Text every sample starts with.")
_LENGTH = flags.DEFINE_integer("length", None, "Sample length in tokens, prompt included. Default: the "
                               "run's data.seq_len; longer works (RoPE) but is beyond what the model saw.")
_BLOCK_LENGTH = flags.DEFINE_integer("block_length", None, "Semi-autoregressive block length (LLaDA); "
                                     "default: all positions at once.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Softmax temperature; 0 is argmax.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens; 0 disables.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass; 1 disables.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_SAMPLING_DTYPE = flags.DEFINE_string("sampling_dtype", "float32", "Precision of the categorical draws: float32, "
                                      "or float64 (what tdlm_jax.evaluate's generative perplexity uses).")
flags.mark_flag_as_required("workdir")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # orbax logs dozens of INFO lines per restore
    try:
        # Check the request against the run's config before the slow restore.
        resolve_sampler(_SAMPLER.value)
        config = load_config(_WORKDIR.value)
        tok = load_tokenizer(_WORKDIR.value, config.data.tokenizer)
        length = config.data.seq_len if _LENGTH.value is None else _LENGTH.value
        make_template(tok.encode(_PROMPT.value), length, 1, tok.mask_id)
        trained = load_trained(_WORKDIR.value)
        texts, nfe = sample_texts(
            trained, num_samples=_NUM_SAMPLES.value, steps=_STEPS.value, method=_SAMPLER.value,
            prompt=_PROMPT.value, length=_LENGTH.value, seed=_SEED.value, temperature=_TEMPERATURE.value,
            top_k=_TOP_K.value, top_p=_TOP_P.value, block_length=_BLOCK_LENGTH.value,
            sampling_dtype=_SAMPLING_DTYPE.value)
    except TdlmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{_SAMPLER.value} sampling, checkpoint step {trained.step}, {_STEPS.value} steps")
    print(format_samples(texts, nfe))


if __name__ == "__main__":
    app.run(main)
