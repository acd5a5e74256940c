"""Tokenizers: map text to integer ids and back.

Only a byte-level tokenizer exists for now. Its vocabulary is the 256 UTF-8 byte
values followed by two special ids, [MASK] (the absorbing state of the diffusion
process) and [PAD] (filler at the end of a short window). The model predicts only
the first `text_vocab_size` ids: [MASK] and [PAD] are never targets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np

from tdlm_jax.errors import DataError

_NUM_BYTES = 256


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 byte tokenizer: ids 0..255 are bytes, then [MASK] and [PAD].

    Attributes:
        mask_id: id of the [MASK] token (the diffusion absorbing state).
        pad_id: id of the [PAD] token (filler after the end of the text).
        vocab_size: number of ids the embedding table needs (bytes + specials).
        text_vocab_size: number of ids the model may predict (bytes only).
    """

    mask_id: int = _NUM_BYTES
    pad_id: int = _NUM_BYTES + 1
    vocab_size: int = _NUM_BYTES + 2
    text_vocab_size: int = _NUM_BYTES

    def encode(self, text: str) -> np.ndarray:
        """Returns the UTF-8 bytes of `text` as a 1-D int32 array of ids."""
        # frombuffer avoids a Python-level loop over a multi-megabyte corpus.
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Iterable[int] | np.ndarray, mask_str: str = "_") -> str:
        """Turns ids back into text.

        [PAD] ids are dropped. Each [MASK] id is rendered as `mask_str` ("_" by
        default, which is unambiguous for the built-in Shakespeare corpus because
        its markdown underscores are stripped at load time). Byte runs between
        masks that are not valid UTF-8 (e.g. a multi-byte character cut by a
        mask or by a window edge) are decoded with errors="replace" so that
        decoding model samples never fails.

        Args:
            ids: a 1-D sequence of ids in [0, vocab_size).
            mask_str: the string shown in place of each [MASK].

        Returns:
            The decoded text.

        Raises:
            ValueError: if an id is outside [0, vocab_size).
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {self.vocab_size}), got range "
                f"[{ids.min()}, {ids.max()}]"
            )
        ids = ids[ids != self.pad_id]
        # Decode each run of bytes separately so a mask never becomes part of an
        # (invalid) multi-byte sequence.
        pieces: list[str] = []
        start = 0
        for pos in np.flatnonzero(ids == self.mask_id).tolist() + [ids.size]:
            run = ids[start:pos].astype(np.uint8).tobytes()
            pieces.append(run.decode("utf-8", errors="replace"))
            start = pos + 1
        return mask_str.join(pieces)


_TOKENIZERS = {"byte": ByteTokenizer}


def get_tokenizer(name: str) -> ByteTokenizer:
    """Returns the tokenizer called `name` (currently only "byte").

    Raises:
        DataError: if `name` is not a known tokenizer.
    """
    if name not in _TOKENIZERS:
        allowed = ", ".join(repr(n) for n in sorted(_TOKENIZERS))
        raise DataError(
            f"unknown tokenizer {name!r}: set --config.data.tokenizer to one of {allowed}"
        )
    return _TOKENIZERS[name]()
