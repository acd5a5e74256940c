"""The id layout every tokenizer shares: text ids, then EOS if the base vocabulary has none,
then [MASK] and [PAD] (see `tdlm_jax.data.tokenizer`), and decoding around those specials."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import numpy as np


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """The id layout of a tokenizer whose own vocabulary has `num_base_ids` ids."""

    text_vocab_size: int
    eos_id: int
    mask_id: int
    pad_id: int
    vocab_size: int


def special_ids(num_base_ids: int, eos_id: int | None) -> SpecialIds:
    """Places [MASK] and [PAD] after the base vocabulary, and EOS too if it has none."""
    if eos_id is None:
        eos_id, num_base_ids = num_base_ids, num_base_ids + 1
    return SpecialIds(text_vocab_size=num_base_ids, eos_id=eos_id, mask_id=num_base_ids,
                      pad_id=num_base_ids + 1, vocab_size=num_base_ids + 2)


def decode_with_specials(ids: Iterable[int] | np.ndarray, layout: SpecialIds, decode_run: Callable[[np.ndarray], str],
                         mask_str: str, eos_str: str) -> str:
    """Decodes `ids`, dropping [PAD] and showing each [MASK] / EOS as `mask_str` / `eos_str`.

    The text between specials is decoded run by run, so a mask never becomes part of an
    (invalid) multi-byte sequence and the base decoder never sees an id it lacks.

    Raises:
        ValueError: if an id is outside [0, vocab_size).
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= layout.vocab_size):
        raise ValueError(f"token ids must lie in [0, {layout.vocab_size}), got range [{ids.min()}, {ids.max()}]")
    ids = ids[ids != layout.pad_id]
    shown = {layout.mask_id: mask_str, layout.eos_id: eos_str}
    pieces: list[str] = []
    start = 0
    for pos in np.flatnonzero(np.isin(ids, list(shown))).tolist() + [ids.size]:
        if pos > start:
            pieces.append(decode_run(ids[start:pos]))
        if pos < ids.size:
            pieces.append(shown[int(ids[pos])])
        start = pos + 1
    return "".join(pieces)
