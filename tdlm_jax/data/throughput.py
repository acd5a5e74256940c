"""How fast the training input pipeline serves batches, measured on the real pipeline.

`pipeline_tokens_per_second` is what `python -m tdlm_jax.bench --mode=data` reports next to
the train step's consumption: the issue asks for the pipeline to deliver at least 10× what
the step consumes, so the input is never the bottleneck.
"""

from __future__ import annotations

import time
from typing import Any

import ml_collections

from tdlm_jax.data import dataset


def pipeline_tokens_per_second(config: ml_collections.ConfigDict, *, num_batches: int, workdir: str
                               ) -> dict[str, Any]:
    """Builds the training data exactly as `tdlm_jax.training.setup` does, then times `num_batches` batches.

    The tokenizer comes from `dataset.build_tokenizer` (a `bpe:<n>` one is trained into, or
    reloaded from, `workdir`), the token cache is opened or built (`data.cache_dir`), and the
    iterator is `dataset.build_training_data`'s, with the config's `data.worker_count` and
    `data.prefetch_buffer_size`, on one process (so its batches are the global batch). The
    timed part is only `next()` on the iterator: the cache build and the first batch (which
    starts the worker processes) are timed separately and excluded.

    Args:
        config: a full config (e.g. configs/base.py's), validated by the caller.
        num_batches: batches to time, after the first (untimed) one; must be >= 1.
        workdir: the tokenizer's directory (tokenizer_info.json is written there, as in training).

    Returns:
        A dict with
          "tokens_per_second": float, num_batches · rows · seq_len / "seconds" (padding
              positions included, as in train/tokens_per_second);
          "batches_per_second": float;
          "seconds": float, wall time of the timed batches;
          "num_batches": int; "tokens_per_batch": int, rows · seq_len of one batch;
          "first_batch_seconds": float, the untimed first batch (worker start-up included);
          "cache_seconds": float, opening (hit) or building (miss) the token cache;
          "cache_hit": bool; "cache_directory": str;
          "num_train_windows": int, windows in the training split;
          "worker_count": int; "prefetch_buffer_size": int.

    Raises:
        ValueError: if num_batches < 1.
        DataError: as training would, for an unusable source or tokenizer.
    """
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    tok = dataset.build_tokenizer(config.data, workdir)
    data = dataset.build_training_data(config, tok)
    iterator = data.train_iterator
    try:
        tic = time.perf_counter()
        first = next(iterator)
        first_batch_seconds = time.perf_counter() - tic
        tokens_per_batch = int(first["tokens"].size)
        tic = time.perf_counter()
        for _ in range(num_batches):
            next(iterator)
        seconds = time.perf_counter() - tic
    finally:
        iterator.close()
    return {
        "tokens_per_second": num_batches * tokens_per_batch / max(seconds, 1e-9),
        "batches_per_second": num_batches / max(seconds, 1e-9),
        "seconds": seconds,
        "num_batches": num_batches,
        "tokens_per_batch": tokens_per_batch,
        "first_batch_seconds": first_batch_seconds,
        "cache_seconds": data.token_cache.seconds,
        "cache_hit": not data.token_cache.built,
        "cache_directory": data.token_cache.directory,
        "num_train_windows": data.num_train_windows,
        "worker_count": iterator.worker_count,
        "prefetch_buffer_size": iterator.prefetch_buffer_size,
    }
