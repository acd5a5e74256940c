"""Hugging Face datasets as a source: `data.source=hf:<name>[:<config>][@<revision>]`, streamed.

`<name>` is a Hub dataset (e.g. `HuggingFaceFW/fineweb-edu:sample-10BT`) or a local directory
laid out as a dataset repo (e.g. `data/train-*.parquet`, `data/validation-*.parquet`). It is
read with `datasets.load_dataset(name, config, revision=..., streaming=True)`: nothing is
downloaded ahead, and the stream is tokenized once, into the token cache
(`tdlm_jax.data.cache`), which later runs and resumes read instead.

Documents are the string field `data.text_field` of each row, in stream order (empty rows are
skipped). `data.hf_max_documents` > 0 reads only the first that many rows of each split
(for smoke tests).

Validation: the dataset's own `validation` (or `valid`, `val`) split if it has one
(`data.val_fraction` is then unused). Otherwise row i (0-based, in stream order) of the train
split is held out when floor((i + 1)·f) > floor(i·f), f = `data.val_fraction` in exact decimal
arithmetic: one row in every 1/f, evenly spaced (f = 0.05 holds out rows 19, 39, 59, ...).
The rule needs neither the stream's length nor a shuffle, so it is the same on every run and
every host, and capping the stream keeps the same held-out rows.
"""

from __future__ import annotations

import dataclasses
import fractions
import functools
import os
from collections.abc import Iterator
from typing import Any

from tdlm_jax.errors import DataError

PREFIX = "hf:"
VALIDATION_SPLITS = ("validation", "valid", "val")
_INSTALL = "pip install 'tdlm_jax[hf]'"
_FORM = "hf:<dataset name or local directory>[:<config>][@<revision>]"


@dataclasses.dataclass(frozen=True)
class HfSource:
    """A parsed `hf:` source."""

    name: str
    config: str | None = None
    revision: str | None = None

    @property
    def is_local(self) -> bool:
        return os.path.isdir(os.path.expanduser(self.name))


def is_hf_source(source: str) -> bool:
    """Whether `data.source` names a Hugging Face dataset."""
    return isinstance(source, str) and source.startswith(PREFIX)


def parse_source(source: str) -> HfSource:
    """Splits `hf:<name>[:<config>][@<revision>]`; a local directory's path is taken whole.

    Raises:
        ValueError: if the name is empty.
    """
    rest = source[len(PREFIX):]
    if os.path.isdir(os.path.expanduser(rest)):
        return HfSource(rest)
    rest, _, revision = rest.partition("@")
    name, _, config = rest.partition(":")
    if not name.strip():
        raise ValueError(f"must have the form {_FORM}")
    return HfSource(name, config or None, revision or None)


def is_held_out(index: int, val_fraction: float) -> bool:
    """The hold-out rule of a stream without a validation split (see the module docstring)."""
    num, den = _exact(float(val_fraction))
    return (index + 1) * num // den > index * num // den


@functools.lru_cache(maxsize=8)
def _exact(val_fraction: float) -> tuple[int, int]:
    """The decimal the user wrote (0.05 is 1/20 exactly, not the binary float's neighbour)."""
    f = fractions.Fraction(repr(val_fraction))
    return f.numerator, f.denominator


def labeled_documents(source: str, *, text_field: str, val_fraction: float, max_documents: int = 0
                      ) -> Iterator[tuple[str, str]]:
    """Yields ("train" | "val", text) for every document of the stream, train split first.

    Raises:
        DataError: one line naming data.source, for a missing `datasets` package, a dataset
            that cannot be opened or read (unknown name, no network), or a missing text field.
    """
    splits = _open_splits(source)
    if "train" not in splits:
        raise DataError(f"data.source={source!r} has no 'train' split (splits: {', '.join(splits) or 'none'}): "
                        "point it at a dataset with a train split")
    val_name = next((name for name in VALIDATION_SPLITS if name in splits), None)
    for index, text in _rows(source, splits["train"], text_field, max_documents):
        held_out = val_name is None and is_held_out(index, val_fraction)
        if text is not None:
            yield ("val" if held_out else "train"), text
    if val_name is not None:
        for _, text in _rows(source, splits[val_name], text_field, max_documents):
            if text is not None:
                yield "val", text


def training_documents(source: str, *, text_field: str, val_fraction: float, max_documents: int = 0
                       ) -> Iterator[str]:
    """The training side of the stream, as text (what a `bpe:<n>` tokenizer trains on)."""
    for label, text in labeled_documents(source, text_field=text_field, val_fraction=val_fraction,
                                         max_documents=max_documents):
        if label == "train":
            yield text


def _open_splits(source: str) -> dict[str, Any]:
    """{split name: streamed IterableDataset} of the source."""
    try:
        spec = parse_source(source)
    except ValueError as e:
        raise DataError(f"data.source={source!r} {e}: set --config.data.source") from None
    try:
        import datasets
    except ImportError:
        raise DataError(f"data.source={source!r} needs the 'datasets' package: {_INSTALL}") from None
    try:
        loaded = datasets.load_dataset(os.path.expanduser(spec.name) if spec.is_local else spec.name, spec.config,
                                       revision=spec.revision, streaming=True)
    except Exception as e:  # datasets raises many types (FileNotFoundError, ConnectionError, ValueError, ...)
        raise DataError(f"data.source={source!r}: cannot open the Hugging Face dataset ({_first_line(e)}): "
                        f"{_fix(e)}") from None
    return dict(loaded) if hasattr(loaded, "keys") else {"train": loaded}


def _rows(source: str, split: Any, text_field: str, max_documents: int) -> Iterator[tuple[int, str | None]]:
    """(row index, its text or None when empty) of one streamed split, with one-line errors."""
    index = -1
    try:
        for index, row in enumerate(split):
            if max_documents and index >= max_documents:
                return
            if text_field not in row:
                raise DataError(f"data.source={source!r}: row {index} has no field {text_field!r} (fields: "
                                f"{', '.join(map(str, row))}): set --config.data.text_field to the field that "
                                "holds the text")
            text = row[text_field]
            yield index, text if isinstance(text, str) and text.strip() else None
    except DataError:
        raise
    except Exception as e:  # a network error mid-stream, a corrupt shard
        raise DataError(f"data.source={source!r}: reading the stream failed after row {index} "
                        f"({_first_line(e)}): {_fix(e)}; nothing was cached, so the next run starts over") from None


def _fix(error: BaseException) -> str:
    text = str(error)
    if "scripts are no longer supported" in text:
        return ("this dataset repo ships a loading script, which datasets>=4 no longer runs: use a "
                "parquet revision or mirror of it (hf:<name>@refs/convert/parquet, which the Hub may have "
                "converted only in part) or download its files and set --config.data.source to them")
    return (f"check the name, config and revision ({_FORM}) and the network; offline "
            "(HF_DATASETS_OFFLINE=1) only local directories and datasets already in the Hugging Face "
            "cache open")


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
