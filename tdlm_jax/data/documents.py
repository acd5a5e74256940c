"""Documents: a source's text as a list of documents, whatever the file format.

`data.source` is 'shakespeare' (one document: the 38 plays joined) or a path or glob of
files, read in sorted order, each by its extension:
    .jsonl     one document per line, from the string field `data.text_field`
    .parquet   one document per row, from the string column `data.text_field`
    otherwise  text: one document per file (`data.txt_documents=file`) or per block
               separated by blank lines (`data.txt_documents=paragraph`)
Invalid UTF-8 is replaced with U+FFFD and counted in a warning; empty documents in JSONL
and Parquet are skipped; every other problem is a one-line DataError naming the file.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from tdlm_jax.data import sources
from tdlm_jax.errors import DataError

TXT_DOCUMENTS = ("file", "paragraph")
_FIELD_FIX = "set --config.data.text_field to the field that holds the text"


def load_documents(source: str, *, txt_documents: str = "file", text_field: str = "text") -> list[str]:
    """Returns the documents of `source`, in a deterministic order (see the module docstring).

    Raises:
        DataError: if no file matches, a file is unreadable or empty, or a record is bad.
    """
    if source == sources.SHAKESPEARE:
        return [sources.shakespeare_text()]
    docs: list[str] = []
    for path in sources.resolve_paths(source):
        docs.extend(read_file_documents(path, txt_documents=txt_documents, text_field=text_field))
    return docs


def read_file_documents(path: str, *, txt_documents: str = "file", text_field: str = "text") -> list[str]:
    """The documents of one file, by its extension."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".jsonl":
        docs = jsonl_documents(path, text_field)
    elif ext == ".parquet":
        docs = parquet_documents(path, text_field)
    else:
        docs = text_documents(sources.read_utf8(path), txt_documents)
    if not docs:
        raise DataError(f"data file {path!r} is empty (no non-blank documents): "
                        "remove it from --config.data.source or fill it")
    return docs


def text_documents(text: str, txt_documents: str) -> list[str]:
    """One document (`file`), or one per blank-line-separated block (`paragraph`)."""
    if txt_documents == "paragraph":
        return [block.strip("\n") for block in re.split(r"\n[ \t]*\n", text) if block.strip()]
    return [text] if text.strip() else []


def jsonl_documents(path: str, text_field: str) -> list[str]:
    """The `text_field` strings of a JSON Lines file; blank lines are allowed."""
    docs = []
    for number, line in enumerate(sources.read_utf8(path).splitlines(), start=1):
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
            docs.append(text)
    return docs


def parquet_documents(path: str, text_field: str) -> list[str]:
    """The non-empty strings of column `text_field` of a Parquet file."""
    column = _read_parquet_column(path, text_field)
    return [text for text in column if isinstance(text, str) and text.strip()]


def _read_parquet_column(path: str, text_field: str) -> list[Any]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path!r} needs pyarrow: pip install 'tdlm_jax[parquet]'") from None
    try:
        schema = pq.read_schema(path)
        if text_field not in schema.names:
            raise DataError(f"data file {path!r} has no column {text_field!r} (columns: "
                            f"{', '.join(schema.names)}): {_FIELD_FIX}")
        return pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()
    except DataError:
        raise
    except Exception as e:  # pyarrow raises several error types for corrupt files
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"data file {path!r} is not a readable Parquet file ({reason}): "
                        "rewrite it, or remove it from --config.data.source") from None
