"""Text generation from a trained run: the part of the sample CLI that the trainer reuses
to log samples at evaluation time (this module defines no flags, so it imports anywhere)."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from tdlm_jax.diffusion import sampling
from tdlm_jax.diffusion.sampling import resolve_sampler
from tdlm_jax.diffusion.schedules import Schedule
from tdlm_jax.errors import ConfigError
from tdlm_jax.inference.trained import TrainedModel

def make_template(prompt_ids: np.ndarray, length: int, num_samples: int, mask_id: int) -> np.ndarray:
    """[num_samples, length] int32 rows: the prompt, then masks."""
    if length < 1:
        raise ConfigError(f"the sample length must be at least 1, got {length}")
    if len(prompt_ids) > length:
        raise ConfigError(f"the prompt is {len(prompt_ids)} tokens, longer than the sample length {length}: "
                          "shorten it or raise --length")
    template = np.full((num_samples, length), mask_id, np.int32)
    template[:, :len(prompt_ids)] = prompt_ids
    return template


@functools.lru_cache(maxsize=8)
def _jitted_generate(graphdef: nnx.GraphDef, options: tuple[tuple[str, Any], ...]) -> Callable:
    """A jitted (params, rng, template) -> SampleResult; cached so repeated calls do not recompile."""

    def run(params: Any, rng: jax.Array, template_NxL: jax.Array) -> sampling.SampleResult:
        # Parameters are an argument, not a closure, so they are not baked into the program.
        return sampling.generate(nnx.merge(graphdef, params), rng, template_NxL, **dict(options))

    return jax.jit(run)


def sample_texts(trained: TrainedModel, **kwargs) -> tuple[list[str], int]:
    """`sample_tokens`, decoded: the texts and the nfe."""
    tokens_NxL, nfe = sample_tokens(trained, **kwargs)
    return [trained.tokenizer.decode(row) for row in tokens_NxL], nfe


def sample_tokens(trained: TrainedModel, *, num_samples: int, steps: int, method: str, prompt: str = "",
                  length: int | None = None, seed: int = 0, **sampling_kwargs) -> tuple[np.ndarray, int]:
    """Generates `num_samples` sequences that start with `prompt`; returns their ids and the nfe.

    Args:
        trained: the run to sample from (its config gives the schedule and time conditioning).
        num_samples: batch size.
        steps: sampling steps.
        method: a sampler name from SAMPLERS.
        prompt: text each sample starts with.
        length: tokens per sample, prompt included; default the run's data.seq_len.
        seed: random seed.
        **sampling_kwargs: temperature, top_k, top_p, block_length, sampling_dtype of
            `sampling.generate`.

    Raises:
        ConfigError: for an unknown sampler, a prompt longer than `length`, an invalid option,
            or a run that is not a diffusion model.
    """
    method, remasking = resolve_sampler(method)
    config, tok = trained.config, trained.tokenizer
    if config.model.get("kind", "diffusion") != "diffusion":
        raise ConfigError(f"the run's model.kind is {config.model.kind!r}: "
                          "only diffusion runs can be sampled here")
    if num_samples < 1:
        raise ConfigError(f"num_samples must be at least 1, got {num_samples}")
    length = config.data.seq_len if length is None else length
    template = make_template(tok.encode(prompt), length, num_samples, tok.mask_id)
    options = dict(mask_id=tok.mask_id, num_predictable=tok.text_vocab_size, steps=steps, method=method,
                   remasking=remasking, time_conditioned=bool(config.model.time_conditioning),
                   schedule=Schedule(config.diffusion.schedule, config.diffusion.polynomial_power),
                   **sampling_kwargs)
    # An invalid option raises ConfigError while `generate` is traced, before anything runs.
    # float64 draws need 64-bit types while tracing and running, and only there.
    with jax.enable_x64(options.get("sampling_dtype") == "float64"):
        result = _jitted_generate(trained.graphdef, tuple(sorted(options.items())))(
            trained.params, jax.random.key(seed), template)
        return np.asarray(jax.device_get(result.tokens_NxL)), int(result.nfe)


SEPARATOR = "=" * 20


def format_samples(texts: list[str], nfe: int) -> str:
    """One block per sample under a numbered separator line, then the nfe."""
    blocks = [f"{SEPARATOR} sample {i + 1}/{len(texts)} {SEPARATOR}\n{text}" for i, text in enumerate(texts)]
    return "\n".join(blocks) + f"\n{SEPARATOR}\nnfe: {nfe}"
