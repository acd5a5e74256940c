"""Tokenizers: map text to integer ids and back.

Every tokenizer lays its ids out the same way, so the model and the diffusion process
never need to know which one is in use:

    [0, text_vocab_size)  ids the model may predict: the text ids, EOS among them
    mask_id               [MASK], the absorbing state of the diffusion process
    pad_id                [PAD], filler after a short document or window
    vocab_size            = pad_id + 1, the rows of the embedding table

[MASK] and [PAD] are the last two ids, outside the text vocabulary, so the denoiser's
−inf on ids ≥ text_vocab_size covers exactly them. EOS (the document separator) is a
text id, because the model must learn where documents end.

`data.tokenizer` names one of:
    byte                     256 UTF-8 byte ids, then EOS (256), [MASK] (257), [PAD] (258)
    gpt2                     the real GPT-2 BPE (50257 ids, <|endoftext|> = 50256 is EOS)
    bpe:<vocab_size>         a byte-level BPE trained on the run's training text, saved
                             as <workdir>/tokenizer.json and reused on resume
    hf:<tokenizer.json>      any Hugging Face `tokenizers` file
    sentencepiece:<.model>   a SentencePiece model
The subword tokenizers live in `tdlm_jax.data.subword` (their libraries load lazily).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import numpy as np

from tdlm_jax.data import subword
from tdlm_jax.data.id_layout import decode_with_specials, special_ids
from tdlm_jax.errors import DataError

_NUM_BYTES = 256
KINDS = ("byte", "gpt2", "bpe:<vocab_size>", "hf:<path to tokenizer.json>", "sentencepiece:<path to .model>")
MIN_BPE_VOCAB = 257  # the 256 byte symbols of a byte-level BPE, plus its EOS


class Tokenizer(Protocol):
    """What the rest of the code uses of a tokenizer."""

    name: str
    eos_id: int
    mask_id: int
    pad_id: int
    vocab_size: int
    text_vocab_size: int

    def encode(self, text: str) -> np.ndarray: ...

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]: ...

    def decode(self, ids: Iterable[int] | np.ndarray) -> str: ...


# What identifies a tokenizer's ids: recorded in <workdir>/tokenizer_info.json and in the
# token cache's key, so a changed tokenizer is noticed.
IDENTITY_FIELDS = ("name", "vocab_size", "text_vocab_size", "mask_id", "pad_id", "eos_id")


def identity(tok: Tokenizer) -> dict[str, Any]:
    """The tokenizer's `IDENTITY_FIELDS` and their values."""
    return {key: getattr(tok, key) for key in IDENTITY_FIELDS}


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 byte tokenizer: ids 0..255 are bytes, then EOS, [MASK] and [PAD]."""

    name: str = "byte"
    eos_id: int = _NUM_BYTES
    mask_id: int = _NUM_BYTES + 1
    pad_id: int = _NUM_BYTES + 2
    vocab_size: int = _NUM_BYTES + 3
    text_vocab_size: int = _NUM_BYTES + 1

    def encode(self, text: str) -> np.ndarray:
        """Returns the UTF-8 bytes of `text` as a 1-D int32 array of ids."""
        # frombuffer avoids a Python-level loop over a multi-megabyte corpus.
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """`encode` of each text (bytes need no batching to be fast)."""
        return [self.encode(text) for text in texts]

    @property
    def files(self) -> tuple[str, ...]:
        """The files that define the tokenizer: none, the byte ids are fixed."""
        return ()

    def decode(self, ids: Iterable[int] | np.ndarray, mask_str: str = "_", eos_str: str = "<|endoftext|>") -> str:
        """Turns ids back into text: [PAD] dropped, [MASK] shown as `mask_str` ("_" is
        unambiguous on the built-in Shakespeare, whose underscores are stripped), EOS as
        `eos_str`. Invalid UTF-8 (a character cut by a mask or a window edge) becomes U+FFFD.

        Raises:
            ValueError: if an id is outside [0, vocab_size).
        """
        layout = special_ids(_NUM_BYTES, None)
        return decode_with_specials(ids, layout, lambda run: run.astype(np.uint8).tobytes().decode("utf-8", "replace"),
                                    mask_str, eos_str)


def parse_name(name: str) -> tuple[str, str]:
    """Splits a `data.tokenizer` value into (kind, argument), checking its form only.

    Raises:
        ValueError: with the allowed forms, if `name` is not one of them.
    """
    kind, _, arg = name.partition(":") if isinstance(name, str) else ("", "", "")
    if kind in ("byte", "gpt2") and not arg:
        return kind, ""
    if kind == "bpe" and arg.isdigit() and int(arg) >= MIN_BPE_VOCAB:
        return kind, arg
    if kind in ("hf", "sentencepiece") and arg:
        return kind, arg
    hint = f" (bpe needs an integer vocab size >= {MIN_BPE_VOCAB})" if kind == "bpe" else ""
    raise ValueError(f"must be one of {', '.join(KINDS)}{hint}")


def get_tokenizer(name: str, *, workdir: str | None = None,
                  training_text: Callable[[], Iterable[str]] | None = None) -> Tokenizer:
    """Returns the tokenizer `name` (see the module docstring).

    Args:
        name: the `data.tokenizer` value.
        workdir: the run's directory; `bpe:<n>` keeps its trained tokenizer there.
        training_text: for `bpe:<n>` when the workdir has no tokenizer yet, a function
            returning the texts to train on (called only then).

    Raises:
        DataError: for an unknown name, a missing or unreadable tokenizer file, a missing
            library, or a `bpe:<n>` with neither a saved tokenizer nor training text.
    """
    try:
        kind, arg = parse_name(name)
    except ValueError as e:
        raise DataError(f"unknown tokenizer {name!r}: set --config.data.tokenizer; it {e}") from None
    if kind == "byte":
        return ByteTokenizer()
    if kind == "gpt2":  # subword imports `tokenizers` / `sentencepiece` only when they are used
        return subword.gpt2()
    if kind == "bpe":
        return subword.workdir_bpe(name, int(arg), workdir, training_text)
    if kind == "hf":
        return subword.from_hf_file(name, arg)
    return subword.from_sentencepiece(name, arg)
