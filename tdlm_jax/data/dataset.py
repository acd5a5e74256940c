"""From a config's `data.*` to a run's tokenizer and its train / validation windows.

The train / validation split is deterministic, and made before any shuffling:
  - a source of several documents holds out its last `data.val_fraction` of documents
    (at least one; documents are in sorted-file, then in-file order);
  - a source of one document (the built-in Shakespeare, or a single text file with
    `data.txt_documents=file`) holds out the last `val_fraction` of its tokens;
  - an `hf:` dataset uses its own validation split if it has one, else holds out row i of its
    stream when floor((i + 1)·val_fraction) > floor(i·val_fraction): one row in every
    1/val_fraction, evenly spaced, which needs no stream length (`tdlm_jax.data.hf_source`).
Every document is tokenized and followed by EOS, once per source and tokenizer, into the token
cache (`tdlm_jax.data.cache`); windows (`data.packing`, see `pipeline.pack`) are cut from it
when read.

The tokenizer's special ids are recorded in <workdir>/tokenizer_info.json, so sampling and
evaluation rebuild exactly the tokenizer the run trained with, and notice if it changed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Iterable

import ml_collections
import numpy as np

from tdlm_jax.data import cache, documents, hf_source, pipeline
from tdlm_jax.data.tokenizer import Tokenizer, get_tokenizer, identity
from tdlm_jax.errors import DataError

TOKENIZER_INFO = "tokenizer_info.json"
Windows = tuple[np.ndarray, np.ndarray]  # (tokens int32[N, L], valid bool[N, L])


def load_source_documents(data: ml_collections.ConfigDict) -> list[str]:
    """The documents of `data.source` (older configs lack the newer keys: defaults apply)."""
    return documents.load_documents(data.source, txt_documents=data.get("txt_documents", "file"),
                                    text_field=data.get("text_field", "text"))


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train, validation) documents: the last `val_fraction` of them, at least one, held out.

    Raises:
        DataError: if val_fraction is outside (0, 1) or there are too few documents.
    """
    _check_val_fraction(val_fraction)
    num_val = max(1, int(round(len(docs) * val_fraction)))
    if len(docs) - num_val < 1:
        raise DataError(f"the source has {len(docs)} documents, too few to hold out val_fraction={val_fraction} "
                        "and keep one for training: add documents or lower --config.data.val_fraction")
    return docs[:-num_val], docs[-num_val:]


def training_texts(data: ml_collections.ConfigDict) -> Iterable[str]:
    """The training side of the split, as text: what a `bpe:<n>` tokenizer is trained on.

    A single document is cut at the same fraction of its characters that the token split
    holds out of its tokens (approximately the same place), so validation text stays unseen.
    An `hf:` stream is read as it is trained on, never held in memory whole.
    """
    if hf_source.is_hf_source(data.source):
        return hf_source.training_documents(data.source, text_field=data.get("text_field", "text"),
                                            val_fraction=data.val_fraction,
                                            max_documents=int(data.get("hf_max_documents", 0)))
    docs = load_source_documents(data)
    if len(docs) == 1:
        _check_val_fraction(data.val_fraction)
        return [docs[0][: int(len(docs[0]) * (1.0 - data.val_fraction))]]
    return split_documents(docs, data.val_fraction)[0]


def split_windows(data: ml_collections.ConfigDict, tok: Tokenizer) -> dict[str, Windows]:
    """{"train": windows, "val": windows} of a config's data as arrays, split as the module says.

    Reads the token cache (building it if needed); materializes every window, so training
    uses `training_windows` instead.
    """
    return {split: source.rows() for split, source in training_windows(data, tok).items()}


def training_windows(data: ml_collections.ConfigDict, tok: Tokenizer,
                     token_cache: cache.TokenCache | None = None) -> dict[str, pipeline.StreamWindows]:
    """{"train": windows, "val": windows} cut lazily from the token cache (opened or built now).

    Raises:
        DataError: as for the source and tokenizer, or if a single document's split leaves
            either side shorter than seq_len.
    """
    token_cache = token_cache or cache.open_or_build(data, tok)
    if token_cache.meta["split_by"] == "tokens":  # one document, split by tokens
        sizes = token_cache.train.num_tokens, token_cache.val.num_tokens
        if min(sizes) < data.seq_len:
            raise DataError(f"text of {sum(sizes)} tokens is too short for seq_len={data.seq_len} and "
                            f"val_fraction={data.val_fraction} (train {sizes[0]}, validation {sizes[1]} tokens; "
                            "each needs >= seq_len): use a longer text, a smaller --config.data.seq_len, or a "
                            "val_fraction closer to 0.5")
    packing = data.get("packing", "wrap")
    return {"train": pipeline.StreamWindows(token_cache.train, data.seq_len, tok.pad_id, packing),
            "val": pipeline.StreamWindows(token_cache.val, data.seq_len, tok.pad_id, packing)}


@dataclasses.dataclass
class TrainingData:
    """What training reads: the host's batch iterator and the fixed validation batches."""

    train_iterator: pipeline.TrainIterator
    eval_batches: list[pipeline.Batch]  # host arrays of the global eval batch size
    token_cache: cache.TokenCache
    num_train_windows: int


def build_training_data(config: ml_collections.ConfigDict, tok: Tokenizer, *, process_index: int = 0,
                        process_count: int = 1) -> TrainingData:
    """The training iterator and validation batches exactly as `tdlm_jax.training.setup` uses them."""
    data = config.data
    token_cache = cache.open_or_build(data, tok)
    splits = training_windows(data, tok, token_cache)
    check_enough_for_a_batch(splits["train"], config.training.batch_size, data.seq_len)
    # A validation loss measured on a fraction of a window, or on nothing, would read as a number.
    if token_cache.val.num_tokens < data.seq_len:
        raise DataError(f"the validation split of {data.source} has {token_cache.val.num_tokens} tokens, fewer than "
                        f"one window of seq_len={data.seq_len}: raise --config.data.val_fraction, add documents, or "
                        "lower --config.data.seq_len")
    train_iterator = pipeline.train_iterator(
        splits["train"], global_batch_size=config.training.batch_size, seed=config.seed,
        process_index=process_index, process_count=process_count, worker_count=int(data.get("worker_count", 0)),
        prefetch_buffer_size=int(data.get("prefetch_buffer_size", 1)))
    eval_batches = pipeline.eval_batches_from_source(splits["val"], batch_size=data.eval_batch_size,
                                                     num_batches=data.num_eval_batches, pad_id=tok.pad_id)
    return TrainingData(train_iterator, eval_batches, token_cache, len(splits["train"]))


def check_enough_for_a_batch(train: Windows | pipeline.StreamWindows, batch_size: int, seq_len: int) -> None:
    """Refuses a training split smaller than one global batch (it would repeat rows within a step)."""
    num_windows = len(train[0]) if isinstance(train, tuple) else len(train)
    if num_windows < batch_size:
        raise DataError(f"the training split has {num_windows} windows of seq_len={seq_len}, fewer than one "
                        f"batch of {batch_size}: use more data, or a smaller --config.training.batch_size "
                        "or --config.data.seq_len")


def build_tokenizer(data: ml_collections.ConfigDict, workdir: str) -> Tokenizer:
    """The run's tokenizer: trained now for a new `bpe:<n>` run, recorded in the workdir."""
    tok = get_tokenizer(data.tokenizer, workdir=workdir, training_text=lambda: training_texts(data))
    _check_or_write_info(workdir, tok)
    return tok


def load_tokenizer(workdir: str, name: str) -> Tokenizer:
    """The tokenizer a finished (or running) run used, for sampling and evaluation."""
    tok = get_tokenizer(name, workdir=workdir)
    _check_or_write_info(workdir, tok, write=False)
    return tok


def _check_or_write_info(workdir: str, tok: Tokenizer, write: bool = True) -> None:
    """Compares the tokenizer with the workdir's record, or writes the record if there is none."""
    path = os.path.join(workdir, TOKENIZER_INFO)
    current = identity(tok)
    if os.path.isfile(path):
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{path} is unreadable ({e}): delete it to record the tokenizer again") from None
        if saved != current:
            raise DataError(f"tokenizer {tok.name!r} now gives {current}, but {path} recorded {saved}: restore "
                            "the tokenizer the run used, or use a new --workdir")
    elif write:
        # Via a temporary file and a rename: every host of a multi-host job writes this record
        # at start-up, and none may read another's half-written file.
        os.makedirs(workdir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=workdir, prefix=f".{TOKENIZER_INFO}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(current, f, indent=2)
        os.replace(tmp, path)


def _check_val_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}: set --config.data.val_fraction to e.g. 0.05")
