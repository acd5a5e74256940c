"""From a config's `data.*` to a run's tokenizer and its train / validation windows.

The train / validation split is deterministic, and made before any shuffling:
  - a source of several documents holds out its last `data.val_fraction` of documents
    (at least one; documents are in sorted-file, then in-file order);
  - a source of one document (the built-in Shakespeare, or a single text file with
    `data.txt_documents=file`) holds out the last `val_fraction` of its tokens.
Every document is tokenized and followed by EOS, then packed into windows
(`data.packing`, see `pipeline.pack`).

The tokenizer's special ids are recorded in <workdir>/tokenizer_info.json, so sampling and
evaluation rebuild exactly the tokenizer the run trained with, and notice if it changed.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import numpy as np

from tdlm_jax.data import documents, pipeline, sources
from tdlm_jax.data.tokenizer import Tokenizer, get_tokenizer
from tdlm_jax.errors import DataError

TOKENIZER_INFO = "tokenizer_info.json"
_INFO_KEYS = ("name", "vocab_size", "text_vocab_size", "mask_id", "pad_id", "eos_id")
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


def training_texts(data: ml_collections.ConfigDict) -> list[str]:
    """The training side of the split, as text: what a `bpe:<n>` tokenizer is trained on.

    A single document is cut at the same fraction of its characters that the token split
    holds out of its tokens (approximately the same place), so validation text stays unseen.
    """
    docs = load_source_documents(data)
    if len(docs) == 1:
        _check_val_fraction(data.val_fraction)
        return [docs[0][: int(len(docs[0]) * (1.0 - data.val_fraction))]]
    return split_documents(docs, data.val_fraction)[0]


def tokenize(docs: list[str], tok: Tokenizer) -> list[np.ndarray]:
    """Each document's ids followed by EOS."""
    eos = np.array([tok.eos_id], np.int32)
    return [np.concatenate([tok.encode(doc), eos]) for doc in docs]


def split_windows(data: ml_collections.ConfigDict, tok: Tokenizer) -> dict[str, Windows]:
    """{"train": windows, "val": windows} of a config's data, split as the module says."""
    docs = load_source_documents(data)
    packing = data.get("packing", "wrap")
    if len(docs) == 1:
        stream = tokenize(docs, tok)[0]
        train, val = sources.split_train_val(stream, data.val_fraction, data.seq_len)
        train_docs, val_docs = [train], [val]
    else:
        train_text, val_text = split_documents(docs, data.val_fraction)
        train_docs, val_docs = tokenize(train_text, tok), tokenize(val_text, tok)
    return {"train": pipeline.pack(train_docs, data.seq_len, tok.pad_id, packing),
            "val": pipeline.pack(val_docs, data.seq_len, tok.pad_id, packing)}


def check_enough_for_a_batch(train: Windows, batch_size: int, seq_len: int) -> None:
    """Refuses a training split smaller than one global batch (it would repeat rows within a step)."""
    if len(train[0]) < batch_size:
        raise DataError(f"the training split has {len(train[0])} windows of seq_len={seq_len}, fewer than one "
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


def tokenizer_info(tok: Tokenizer) -> dict[str, Any]:
    """What tokenizer_info.json records."""
    return {key: getattr(tok, key) for key in _INFO_KEYS}


def _check_or_write_info(workdir: str, tok: Tokenizer, write: bool = True) -> None:
    """Compares the tokenizer with the workdir's record, or writes the record if there is none."""
    path = os.path.join(workdir, TOKENIZER_INFO)
    current = tokenizer_info(tok)
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
        os.makedirs(workdir, exist_ok=True)
        with open(path, "w") as f:
            json.dump(current, f, indent=2)


def _check_val_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}: set --config.data.val_fraction to e.g. 0.05")
