"""Documents: a source's text as a list of documents, whatever the file format.

`data.source` is 'shakespeare' (one document: the 38 plays joined) or a path or glob of
files, read in sorted order, each by its extension:
    .jsonl     one document per line, from the string field `data.text_field`
    .parquet   one document per row, from the string column `data.text_field`
    otherwise  text: one document per file (`data.txt_documents=file`) or per block
               separated by blank lines (`data.txt_documents=paragraph`)
Invalid UTF-8 is replaced with U+FFFD and counted in a warning; empty documents in JSONL
and Parquet are skipped; every other problem is a one-line DataError naming the file.

The token cache reads a source as a stream of pieces (`source_pieces`), so no file and no
document is ever whole in memory: a one-line corpus larger than RAM still tokenizes. A piece
ends just before a space that follows a non-space character, where every tokenizer we ship
(byte, gpt2, bpe:<n>, SentencePiece's whitespace splitting) starts a new token anyway, so the
pieces' ids joined are the document's ids. A stretch of MAX_PIECE_CHARS without such a space
is cut after its last non-space character.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

from tdlm_jax.data import sources
from tdlm_jax.errors import DataError

TXT_DOCUMENTS = ("file", "paragraph")
MAX_PIECE_CHARS = 1 << 18
Piece = tuple[str, bool]  # (text, whether it is its document's last piece)
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_PARQUET_BATCH_ROWS = 1024
_FIELD_FIX = "set --config.data.text_field to the field that holds the text"


def load_documents(source: str, *, txt_documents: str = "file", text_field: str = "text") -> list[str]:
    """Returns the documents of `source`, in a deterministic order (see the module docstring).

    Raises:
        DataError: if no file matches, a file is unreadable or empty, or a record is bad.
    """
    return list(joined(source_pieces(source, txt_documents=txt_documents, text_field=text_field)))


def source_pieces(source: str, *, txt_documents: str = "file", text_field: str = "text") -> Iterator[Piece]:
    """The documents of `source` as pieces (see the module docstring), one file at a time."""
    if source == sources.SHAKESPEARE:
        yield from document_pieces(sources.shakespeare_text())
        return
    for path in sources.resolve_paths(source):
        yield from file_pieces(path, txt_documents=txt_documents, text_field=text_field)


def file_pieces(path: str, *, txt_documents: str = "file", text_field: str = "text") -> Iterator[Piece]:
    """The documents of one file, by its extension, as pieces."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".jsonl":
        pieces = _jsonl_pieces(path, text_field)
    elif ext == ".parquet":
        pieces = _parquet_pieces(path, text_field)
    elif txt_documents == "paragraph":
        pieces = _paragraph_pieces(sources.read_utf8_blocks(path))
    else:
        pieces = _whole_text_pieces(sources.read_utf8_blocks(path))
    empty = True
    for piece in pieces:
        empty = False
        yield piece
    if empty:
        raise DataError(f"data file {path!r} is empty (no non-blank documents): "
                        "remove it from --config.data.source or fill it")


def joined(pieces: Iterable[Piece]) -> Iterator[str]:
    """Whole documents from their pieces."""
    parts: list[str] = []
    for text, last in pieces:
        parts.append(text)
        if last:
            yield "".join(parts)
            parts = []


def document_pieces(text: str) -> Iterator[Piece]:
    """One document held in memory, as pieces of at most MAX_PIECE_CHARS."""
    start = 0
    while len(text) - start > MAX_PIECE_CHARS:
        cut = _cut(text, start, start + MAX_PIECE_CHARS)
        yield text[start:cut], False
        start = cut
    yield text[start:], True


def _cut(text: str, start: int, end: int) -> int:
    """Where to end a piece that starts at `start` and may not pass `end` (see the docstring)."""
    cut = text.rfind(" ", start + 1, end)
    while cut > start and text[cut - 1].isspace():
        cut = text.rfind(" ", start + 1, cut)
    if cut > start:
        return cut
    cut = end  # no space after a word: end after a non-space, so a paragraph break stays whole
    while cut > start + 1 and text[cut - 1].isspace():
        cut -= 1
    return cut


def _split_full_pieces(buffer: str) -> tuple[list[str], str]:
    """(the full-size pieces at the front of `buffer`, the rest, which is not longer than one)."""
    pieces, start = [], 0
    while len(buffer) - start > MAX_PIECE_CHARS:
        cut = _cut(buffer, start, start + MAX_PIECE_CHARS)
        pieces.append(buffer[start:cut])
        start = cut
    return pieces, buffer[start:]


def _whole_text_pieces(blocks: Iterable[str]) -> Iterator[Piece]:
    """A text file as one document (none if it is blank), from its decoded blocks."""
    rest, seen_text = "", False
    for block in blocks:
        pieces, rest = _split_full_pieces(rest + block)
        for piece in pieces:
            seen_text = seen_text or not piece.isspace()
            yield piece, False
    if seen_text or rest.strip():
        yield rest, True


def _paragraph_pieces(blocks: Iterable[str]) -> Iterator[Piece]:
    """A text file's blank-line-separated blocks, each stripped of its newlines, as documents."""
    rest, is_open = "", False  # is_open: the paragraph in `rest` has pieces out already
    for block in blocks:
        *complete, rest = _PARAGRAPH_BREAK.split(rest + block)
        for paragraph in complete:
            yield from _finish_paragraph(paragraph, is_open)
            is_open = False
        pieces, rest = _split_full_pieces(rest)
        for piece in pieces:
            yield (piece if is_open else piece.lstrip("\n")), False
            is_open = True
    yield from _finish_paragraph(rest, is_open)


def _finish_paragraph(text: str, is_open: bool) -> Iterator[Piece]:
    if is_open:
        yield text.rstrip("\n"), True
    elif text.strip():
        yield text.strip("\n"), True


def _jsonl_pieces(path: str, text_field: str) -> Iterator[Piece]:
    """The `text_field` strings of a JSON Lines file, read line by line; blank lines are allowed."""
    number = 0
    for line in _lines(sources.read_utf8_blocks(path)):
        number += 1
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"data file {path!r} line {number} is not JSON ({e.msg}): fix or remove that line") from None
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise DataError(f"data file {path!r} line {number} has no string field {text_field!r}: {_FIELD_FIX}")
        if text.strip():
            yield from document_pieces(text)


def _lines(blocks: Iterable[str]) -> Iterator[str]:
    """The lines of decoded text blocks, split at "\\n" only (JSON allows a raw U+2028 in a string)."""
    rest = ""
    for block in blocks:
        *complete, rest = (rest + block).split("\n")
        yield from complete
    if rest:
        yield rest


def _parquet_pieces(path: str, text_field: str) -> Iterator[Piece]:
    """The non-empty strings of column `text_field` of a Parquet file, a batch of rows at a time."""
    for column in _parquet_batches(path, text_field):
        for text in column:
            if isinstance(text, str) and text.strip():
                yield from document_pieces(text)


def _parquet_batches(path: str, text_field: str) -> Iterator[list[Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path!r} needs pyarrow: pip install 'tdlm_jax[parquet]'") from None
    try:
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        if text_field not in names:
            raise DataError(f"data file {path!r} has no column {text_field!r} (columns: "
                            f"{', '.join(names)}): {_FIELD_FIX}")
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[text_field]):
            yield batch.column(0).to_pylist()
    except DataError:
        raise
    except Exception as e:  # pyarrow raises several error types for corrupt files
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"data file {path!r} is not a readable Parquet file ({reason}): "
                        "rewrite it, or remove it from --config.data.source") from None
