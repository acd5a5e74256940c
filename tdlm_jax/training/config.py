"""Config validation, and the translation of a config into static objects.

The config is read here, on the host, once: the jitted steps only ever see the frozen
dataclasses built below. `validate` runs before any data is read or anything compiles, and
raises a `ConfigError` whose one-line message names the key and what is allowed.
"""

from __future__ import annotations

import difflib
import functools
import json
import numbers
import os
import runpy
from typing import Any, Callable

import ml_collections

from tdlm_jax.data import hf_source, tokenizer as tokenizer_lib
from tdlm_jax.data.documents import TXT_DOCUMENTS
from tdlm_jax.data.pipeline import PACKINGS
from tdlm_jax.diffusion.corruption import ForwardProcess, LOSS_WEIGHTINGS, TIME_SAMPLING
from tdlm_jax.diffusion.sampling import SAMPLERS
from tdlm_jax.diffusion.schedules import SCHEDULES, Schedule
from tdlm_jax.errors import ConfigError
from tdlm_jax.metrics.health_thresholds import thresholds_from_config
from tdlm_jax.metrics.writers import flatten_hparams
from tdlm_jax.model.transformer import ATTENTION_IMPLS, ModelConfig, REMAT_POLICIES
from tdlm_jax.parallel.sharding import resolve_mesh_shape
from tdlm_jax.training.optim import DECAY_SCHEDULES
from tdlm_jax.training.step import OBJECTIVES

# The config every config file starts from; it lists every key (see its comments).
BASE_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                           "configs", "base.py")
TOKENIZERS = tokenizer_lib.KINDS  # the forms data.tokenizer may take; parse_name checks one
DTYPES = ("float32", "bfloat16")
POSITIVE_INTS = (
    "data.seq_len", "data.eval_batch_size", "data.num_eval_batches", "data.prefetch_buffer_size",
    "model.d_model", "model.num_heads", "model.num_layers", "model.mlp_dim",
    "training.num_steps", "training.batch_size", "training.logging_steps",
    "training.detailed_metrics_steps", "training.attention_analysis_steps",
    "training.eval_every_n_steps", "training.checkpoint_every_n_steps",
    "training.max_checkpoints_to_keep", "training.max_consecutive_nonfinite", "sampling.steps",
    "training.grad_accum_steps", "training.analysis_rows", "diffusion.adaptive_bins",
)
CHOICES = {
    "model.kind": OBJECTIVES,
    "data.packing": PACKINGS,
    "data.txt_documents": TXT_DOCUMENTS,
    "model.dtype": DTYPES,
    "model.remat_policy": REMAT_POLICIES,
    "model.attention_impl": ATTENTION_IMPLS,
    "diffusion.schedule": SCHEDULES,
    "diffusion.time_sampling": TIME_SAMPLING,
    "diffusion.loss_weighting": LOSS_WEIGHTINGS,
    "training.decay_schedule": DECAY_SCHEDULES,
    "sampling.method": tuple(SAMPLERS),
}


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
    value = config
    for part in key.split("."):
        if part not in value:
            raise ConfigError(f"config error: {key} is missing: add it to the config file (see configs/base.py)")
        value = value[part]
    return value


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"config error: {key}={value!r}: {allowed}")


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_count(x: Any) -> bool:
    """An integer >= 0 (True and False are not counts)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_range(config, key: str, ok: Callable[[float], bool], allowed: str) -> None:
    value = _get(config, key)
    _require(_is_number(value) and ok(value), key, value, allowed)


@functools.lru_cache(maxsize=1)
def base_defaults() -> dict[str, Any]:
    """Every key of configs/base.py, dotted, with its value; empty where configs/ is absent."""
    if not os.path.isfile(BASE_CONFIG):
        return {}
    return flatten_hparams(json.loads(runpy.run_path(BASE_CONFIG)["get_config"]().to_json_best_effort()))


def known_keys() -> frozenset[str]:
    """Every key of configs/base.py, dotted; empty where the repository's configs/ is absent."""
    return frozenset(base_defaults())


def _check_known_keys(config: ml_collections.ConfigDict) -> None:
    """A key set inside a config file but read by nothing (a typo) is an error, as it is as an override."""
    known = known_keys()
    for key in sorted(flatten_hparams(config.to_dict())):
        if known and key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            suggestion = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"config error: {key} is not a config key{suggestion}; configs/base.py lists every key")


def validate(config: ml_collections.ConfigDict, *, num_devices: int, process_count: int = 1) -> None:
    """Raises ConfigError for the first invalid value; returns None if the config is usable."""
    _check_known_keys(config)
    seed = _get(config, "seed")
    _require(_is_count(seed), "seed", seed, "must be a non-negative integer")
    for key in POSITIVE_INTS:
        value = _get(config, key)
        _require(_is_count(value) and value > 0, key, value,
                 "must be a positive integer")
    for key, allowed in CHOICES.items():
        value = _get(config, key)
        _require(value in allowed, key, value, f"must be one of {', '.join(allowed)}")
    _validate_data(config)
    _check_range(config, "data.val_fraction", lambda x: 0 < x < 1, "must be in (0, 1)")
    _check_range(config, "diffusion.t_min", lambda x: 0 < x < 1, "must be in (0, 1); w(t) = 1/t diverges at 0")
    _check_range(config, "diffusion.polynomial_power", lambda x: x > 0, "must be positive")
    _check_range(config, "diffusion.weight_clip_max", lambda x: x > 0, "must be positive")
    _check_range(config, "diffusion.adaptive_floor", lambda x: 0 < x <= 1,
                 "must be in (0, 1]: every bin of the proposal needs a positive probability, or the loss is biased")
    _check_range(config, "diffusion.adaptive_decay", lambda x: 0 <= x < 1, "must be in [0, 1)")
    warmup = _get(config, "diffusion.adaptive_warmup_steps")
    _require(_is_count(warmup), "diffusion.adaptive_warmup_steps", warmup, "must be an integer >= 0")
    _check_range(config, "training.learning_rate", lambda x: x > 0, "must be positive")
    _check_range(config, "training.warmup_steps", lambda x: x >= 0 and x == int(x), "must be an integer >= 0")
    _check_range(config, "training.min_learning_rate_ratio", lambda x: 0 <= x <= 1, "must be in [0, 1]")
    _check_range(config, "training.weight_decay", lambda x: x >= 0, "must be >= 0")
    _check_range(config, "training.adam_b1", lambda x: 0 <= x < 1, "must be in [0, 1)")
    _check_range(config, "training.adam_b2", lambda x: 0 <= x < 1, "must be in [0, 1)")
    _check_range(config, "training.grad_clip_norm", lambda x: True, "must be a number (<= 0 disables clipping)")
    _check_range(config, "training.ema_decay", lambda x: 0 <= x < 1, "must be in [0, 1) (0 turns the EMA off)")
    remat = _get(config, "model.remat")
    _require(isinstance(remat, bool), "model.remat", remat, "must be true or false")
    vocab = _get(config, "model.vocab_size")
    _require(_is_count(vocab), "model.vocab_size", vocab,
             "must be 0 (the tokenizer's vocabulary) or a padded size >= it")
    accum, batch = _get(config, "training.grad_accum_steps"), _get(config, "training.batch_size")
    # (accum == 1 is the plain batch-divisibility check at the end)
    _require(accum == 1 or batch % (accum * num_devices) == 0, "training.grad_accum_steps", accum,
             f"training.batch_size={batch} must split into {accum} microbatches that divide over {num_devices} "
             f"devices: use a batch size that is a multiple of {accum * num_devices}")

    d_model, num_heads = config.model.d_model, config.model.num_heads
    _require(d_model % num_heads == 0 and (d_model // num_heads) % 2 == 0, "model.d_model", d_model,
             f"must be a multiple of 2·model.num_heads ({2 * num_heads}): RoPE rotates channel pairs of each head")
    edges = _get(config, "metrics.bucket_edges")
    _require(_valid_edges(edges), "metrics.bucket_edges", edges,
             "must be 4 increasing numbers from 0 to 1 (low, medium, high buckets), e.g. (0.0, 0.3, 0.7, 1.0)")
    unroll = _get(config, "training.grad_accum_unroll")
    _require(_is_count(unroll), "training.grad_accum_unroll", unroll,
             "must be an integer >= 0 (0: the platform's default)")
    row_mb = _get(config, "metrics.row_gradient_mb")
    _require(_is_count(row_mb), "metrics.row_gradient_mb", row_mb,
             "must be an integer >= 0 (0: the platform's default)")
    count = _get(config, "sampling.num_samples_at_eval")
    _require(_is_count(count) and count <= _get(config, "data.eval_batch_size"),
             "sampling.num_samples_at_eval", count, "must be an integer from 0 (off) to data.eval_batch_size")
    prompt = _get(config, "sampling.prompt")
    _require(isinstance(prompt, str) and len(eval_prompt(config).encode()) < _get(config, "data.seq_len"),
             "sampling.prompt", prompt, f"must be {AUTO_PROMPT!r} or a string shorter than data.seq_len bytes")
    thresholds_from_config(_get(config, "health"))  # raises ConfigError naming a bad health.* key
    # The mesh spans every device, so the batch splits into num_devices = data × fsdp row blocks,
    # and each process feeds its own share of them.
    resolve_mesh_shape(_get(config, "sharding.mesh_shape"), num_devices)
    for key in ("training.batch_size", "data.eval_batch_size"):
        size = _get(config, key)
        for count, what, why in ((num_devices, "devices", " (one row block per device of the data × fsdp mesh)"),
                                 (process_count, "processes", "")):
            _require(size % count == 0, key, size,
                     f"does not divide over {count} {what}: use a multiple of {count}{why}")


AUTO_PROMPT = "auto"
_SOURCE_PROMPTS = {"shakespeare": "ROMEO:"}  # a speaker's cue, as the plays' lines begin


def eval_prompt(config: ml_collections.ConfigDict) -> str:
    """The text samples at evaluation start with: `sampling.prompt`, where 'auto' is the built-in
    source's own kind of beginning ("ROMEO:" on Shakespeare) and none on any other source."""
    prompt = config.sampling.prompt
    return _SOURCE_PROMPTS.get(config.data.source, "") if prompt == AUTO_PROMPT else prompt


def _validate_data(config: ml_collections.ConfigDict) -> None:
    """The data.* checks that are not plain choices or positive integers."""
    name = _get(config, "data.tokenizer")
    try:
        tokenizer_lib.parse_name(name)
    except ValueError as e:
        _require(False, "data.tokenizer", name, str(e))
    field = _get(config, "data.text_field")
    _require(isinstance(field, str) and bool(field), "data.text_field", field,
             "must be the non-empty name of the JSONL field / Parquet column holding the text")
    source = _get(config, "data.source")
    _require(isinstance(source, str) and bool(source.strip()), "data.source", source,
             "must be 'shakespeare', a path or glob of .txt, .jsonl or .parquet files, or hf:<dataset name>")
    if hf_source.is_hf_source(source):
        try:
            hf_source.parse_source(source)
        except ValueError as e:
            _require(False, "data.source", source, str(e))
    for key in ("data.worker_count", "data.hf_max_documents"):  # 0 means in-process / all rows
        value = _get(config, key)
        _require(_is_count(value), key, value, "must be an integer >= 0")
    cache_dir = _get(config, "data.cache_dir")
    _require(isinstance(cache_dir, str), "data.cache_dir", cache_dir,
             "must be a directory path, or '' for $TDLM_CACHE_DIR or ~/.cache/tdlm_jax/tokens")


def _valid_edges(edges: Any) -> bool:
    try:
        values = [float(x) for x in edges]
    except (TypeError, ValueError):
        return False
    return (len(values) == 4 and values[0] == 0.0 and values[-1] == 1.0
            and all(a < b for a, b in zip(values, values[1:])))


def forward_process(config: ml_collections.ConfigDict, mask_id: int, *, microbatches: int = 1,
                    shards: int = 1) -> ForwardProcess:
    """The training forward process, planned for the global training batch; the train step
    passes its `microbatches` (training.grad_accum_steps) and the batch's `shards` (devices),
    to which the stratified bucket layout is aligned (`corruption.BucketPlan`)."""
    d = config.diffusion
    return ForwardProcess(
        schedule=Schedule(d.schedule, float(d.polynomial_power)),
        t_min=float(d.t_min),
        time_sampling=d.time_sampling,
        loss_weighting=d.loss_weighting,
        weight_clip_max=float(d.weight_clip_max),
        mask_id=mask_id,
        bucket_edges=tuple(float(x) for x in config.metrics.bucket_edges),
        batch_size=config.training.batch_size,
        adaptive_bins=d.adaptive_bins,
        adaptive_floor=float(d.adaptive_floor),
        adaptive_decay=float(d.adaptive_decay),
        adaptive_warmup_steps=d.adaptive_warmup_steps,
        microbatches=microbatches,
        shards=shards,
    )


def model_config(config: ml_collections.ConfigDict, *, vocab_size: int, num_predictable: int) -> ModelConfig:
    """The denoiser's static config for a tokenizer of `vocab_size` ids (`num_predictable` text ids).

    Raises:
        ConfigError: if `model.vocab_size` is set below the tokenizer's vocabulary.
    """
    m = config.model
    padded = m.get("vocab_size", 0)  # keys added after a run was saved take their defaults
    if padded and padded < vocab_size:
        raise ConfigError(f"config error: model.vocab_size={padded} is smaller than the {vocab_size} ids of "
                          f"tokenizer {config.data.tokenizer!r}: set --config.model.vocab_size=0 (the tokenizer's) "
                          f"or a padded size >= {vocab_size}")
    return ModelConfig(vocab_size=max(padded, vocab_size), num_predictable=num_predictable, d_model=m.d_model,
                       num_heads=m.num_heads, num_layers=m.num_layers, mlp_dim=m.mlp_dim, dtype=m.dtype,
                       time_conditioning=bool(m.time_conditioning),
                       causal=m.get("kind", "diffusion") == "ar",  # runs saved before model.kind were diffusion
                       remat=bool(m.get("remat", False)), remat_policy=m.get("remat_policy", "nothing_saveable"),
                       attention_impl=m.get("attention_impl", "auto"))


def ema_decay(config: ml_collections.ConfigDict) -> float:
    """training.ema_decay; 0 (no EMA) for runs saved before the key existed."""
    return float(config.training.get("ema_decay", 0.0))
