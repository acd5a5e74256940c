"""The token cache: a source is tokenized once, into memory-mapped files that later runs reuse.

A cache entry is the directory <cache_dir>/<source>.<tokenizer>.<key>/ holding
    train.bin, val.bin       the split's token stream: every document's ids followed by EOS,
                             flat, uint16 when the vocabulary fits (<= 65536 ids), else uint32
    train_offsets.npy, ...   int64[num_docs + 1]: document d is stream[offsets[d]:offsets[d + 1]]
                             (`data.packing=pad` gives each document its own window)
    meta.json                what was tokenized, the counts, the dtype and the largest id
`key` hashes everything that determines the tokens: the format version, the source (file paths,
sizes and modification times; the built-in corpus's files; or the `hf:` name, config, revision
and row cap), the tokenizer (its special ids and a SHA-256 of its files), `data.text_field`,
`data.txt_documents` and `data.val_fraction` (the split is stored, not recomputed). Windows
are cut when read (`tdlm_jax.data.pipeline.StreamWindows`), so runs that differ in seq_len,
packing, batch size or model share one entry, and training reads only the pages it touches:
a corpus larger than RAM trains.

An entry is built in a temporary directory and renamed into place only when complete (files
fsynced, meta.json last), so a kill mid-build never leaves an entry that is later trusted; the
next build removes the temporaries of builds that died. An entry that fails its checks on
opening (unreadable meta.json, a missing or truncated file) is rebuilt with a warning.

`data.cache_dir` = "" means $TDLM_CACHE_DIR, else $XDG_CACHE_HOME/tdlm_jax/tokens (by default
~/.cache/tdlm_jax/tokens): one cache outside any workdir, so that every run and sweep over the
same data tokenizes it once. A changed Hub dataset is not noticed (its files are not listed
without network, and a resume must work offline): delete its entry to tokenize it again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import time
from array import array
from collections.abc import Iterable, Iterator
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from tdlm_jax.data import documents, hf_source
from tdlm_jax.data.cache_key import ENV_DIR, FORMAT_VERSION, cache_identity, cache_root, entry_directory
from tdlm_jax.data.tokenizer import Tokenizer
from tdlm_jax.errors import DataError

SPLITS = ("train", "val")
_FLUSH_TOKENS = 1 << 22  # tokens buffered per write (16 MB of int32)
_BATCH_DOCS, _BATCH_CHARS = 1024, 1 << 20  # documents (pieces) and characters per encode_batch call, at most


class TokenStream:
    """One split's flat token stream and document offsets, memory-mapped on first use.

    Pickles without its data (grain worker processes map the files again), so passing it to a
    worker copies a few paths, not the corpus.
    """

    def __init__(self, directory: str, split: str, dtype: str, num_tokens: int, num_docs: int):
        self.tokens_path = os.path.join(directory, f"{split}.bin")
        self.offsets_path = os.path.join(directory, f"{split}_offsets.npy")
        self.dtype = np.dtype(dtype)
        self.num_tokens, self.num_docs = int(num_tokens), int(num_docs)
        self._tokens: np.ndarray | None = None
        self._offsets: np.ndarray | None = None

    @property
    def tokens(self) -> np.ndarray:
        """The stream, uint16 or uint32 [num_tokens] (read-only memory map)."""
        if self._tokens is None:
            self._tokens = (np.memmap(self.tokens_path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
                            if self.num_tokens else np.zeros(0, self.dtype))  # mmap refuses empty files
        return self._tokens

    @property
    def offsets(self) -> np.ndarray:
        """int64 [num_docs + 1] document boundaries in the stream."""
        if self._offsets is None:
            self._offsets = np.load(self.offsets_path, mmap_mode="r")
        return self._offsets

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokens": None, "_offsets": None}


@dataclasses.dataclass
class TokenCache:
    """An opened cache entry."""

    directory: str
    meta: dict[str, Any]
    train: TokenStream
    val: TokenStream
    built: bool  # False when an existing entry was reused
    seconds: float  # to build it, or to open it


def open_or_build(data: ml_collections.ConfigDict, tok: Tokenizer) -> TokenCache:
    """The cache entry of `data` tokenized by `tok`: reused if it exists and is intact, else built.

    Raises:
        DataError: for an unusable source (as when reading it directly), a tokenizer that
            emits ids outside its vocabulary, or a cache directory that cannot be written.
    """
    start = time.perf_counter()
    identity = cache_identity(data, tok)
    root = cache_root(data)
    directory = entry_directory(root, data.source, tok.name, identity)
    if os.path.isdir(directory):
        try:
            cache = _open(directory, identity, tok, built=False, start=start)
            logging.info("token cache hit: %s (%s train / %s validation tokens)", directory,
                         f"{cache.train.num_tokens:,}", f"{cache.val.num_tokens:,}")
            return cache
        except _Unusable as e:
            logging.warning("token cache %s is unusable (%s); rebuilding it", directory, e)
            _discard(directory)
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the token cache directory {root} ({e.strerror}): set "
                        f"--config.data.cache_dir (or ${ENV_DIR}) to a writable directory") from None
    _build(directory, data, tok, identity)
    try:
        cache = _open(directory, identity, tok, built=True, start=start)
    except _Unusable as e:  # e.g. the disk filled up between writing and reading back
        raise DataError(f"the token cache {directory} just built is unreadable ({e}): free disk space, delete "
                        "it, or set --config.data.cache_dir elsewhere") from None
    logging.info("token cache built: tokenized %s with %s in %.1f s into %s (%s train / %s validation tokens)",
                 data.source, tok.name, cache.seconds, directory, f"{cache.train.num_tokens:,}",
                 f"{cache.val.num_tokens:,}")
    return cache


class _Unusable(Exception):
    """A cache entry that fails its checks."""


def _open(directory: str, identity: dict[str, Any], tok: Tokenizer, *, built: bool, start: float) -> TokenCache:
    """Opens and checks an entry: the metadata, and every file's size against it (cheap)."""
    try:
        with open(os.path.join(directory, "meta.json")) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT_VERSION or meta.get("identity") != json.loads(json.dumps(identity)):
            raise _Unusable("meta.json describes other data")
        streams = {}
        for split in SPLITS:
            counts = meta["splits"][split]
            stream = TokenStream(directory, split, meta["dtype"], counts["num_tokens"], counts["num_docs"])
            size = os.path.getsize(stream.tokens_path)
            if size != stream.num_tokens * stream.dtype.itemsize:
                raise _Unusable(f"{split}.bin has {size} bytes, not {stream.num_tokens * stream.dtype.itemsize}")
            offsets = stream.offsets
            if offsets.shape != (stream.num_docs + 1,) or offsets[0] != 0 or offsets[-1] != stream.num_tokens:
                raise _Unusable(f"{split}_offsets.npy does not match {split}.bin")
            streams[split] = stream
    except _Unusable:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:  # missing or truncated files, bad JSON
        raise _Unusable(f"{type(e).__name__}: {e}") from None
    _check_ids(meta["max_id"], tok, directory)
    return TokenCache(directory, meta, streams["train"], streams["val"], built, time.perf_counter() - start)


def _check_ids(max_id: int, tok: Tokenizer, where: str) -> None:
    if max_id >= tok.text_vocab_size:
        raise DataError(f"tokenizer {tok.name!r} produced token id {max_id} (in {where}), outside its "
                        f"{tok.text_vocab_size} text ids: the tokenizer file is broken; fix or replace "
                        "--config.data.tokenizer")


def _build(directory: str, data: ml_collections.ConfigDict, tok: Tokenizer, identity: dict[str, Any]) -> None:
    """Tokenizes the source into a temporary directory, then renames it into place."""
    _remove_dead_temporaries(directory)
    temporary = f"{directory}.tmp-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)
    try:
        os.makedirs(temporary)
        if hf_source.is_hf_source(data.source):
            counts, max_id, split_by = _write_stream_splits(temporary, data, tok, dtype)
        else:
            counts, max_id, split_by = _write_local_splits(temporary, data, tok, dtype)
        meta = {"format": FORMAT_VERSION, "identity": identity, "dtype": dtype.name, "max_id": max_id,
                "split_by": split_by, "splits": counts, "source": data.source, "tokenizer": tok.name,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _write_json(os.path.join(temporary, "meta.json"), meta)  # last: only a finished build has it
        _fsync(temporary)
        try:
            os.rename(temporary, directory)
        except OSError:
            if not os.path.isdir(directory):
                raise
            shutil.rmtree(temporary, ignore_errors=True)  # another process finished the same entry first
    except OSError as e:
        shutil.rmtree(temporary, ignore_errors=True)
        raise DataError(f"cannot write the token cache {directory} ({e.strerror or e}): free disk space, or set "
                        f"--config.data.cache_dir (or ${ENV_DIR}) to a writable directory") from None
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


class _Writer:
    """Appends documents (ids ending in EOS) to a flat token file in large writes, checking ids."""

    def __init__(self, path: str, dtype: np.dtype, tok: Tokenizer, source: str):
        self._file = open(path, "wb")
        self._dtype, self._tok, self._source = dtype, tok, source
        self.offsets = array("q", [0])
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0
        self._written = 0  # tokens added, pieces of an unfinished document included
        self.max_id = -1

    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1

    def add(self, ids: np.ndarray, ends_document: bool = True) -> None:
        """Appends a document's ids (or one piece of them; its last piece ends it)."""
        self._pending.append(ids)
        self._pending_tokens += len(ids)
        self._written += len(ids)
        if ends_document:
            self.offsets.append(self._written)
        if self._pending_tokens >= _FLUSH_TOKENS:
            self._flush()

    def close(self) -> None:
        """Writes what is buffered and syncs the file to disk."""
        try:
            self._flush()
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()

    def abort(self) -> None:
        """Closes the file without writing more (the build failed; its directory is deleted)."""
        self._file.close()

    def _flush(self) -> None:
        if not self._pending:
            return
        chunk = np.concatenate(self._pending)
        self._pending, self._pending_tokens = [], 0
        if not chunk.size:
            return
        # The one pass over every id: a broken tokenizer file is caught here, before ids that do
        # not fit the embedding (or the uint16 file) are stored.
        low, high = int(chunk.min()), int(chunk.max())
        if low < 0:
            raise DataError(f"tokenizer {self._tok.name!r} produced a negative token id ({low}) on "
                            f"data.source={self._source!r}: the tokenizer file is broken; fix or replace "
                            "--config.data.tokenizer")
        _check_ids(high, self._tok, f"data.source={self._source!r}")
        self.max_id = max(self.max_id, high)
        chunk.astype(self._dtype).tofile(self._file)


def _encoded(pieces: Iterable[tuple[str, str, bool]], tok: Tokenizer) -> Iterator[tuple[str, np.ndarray, bool]]:
    """(label, ids, ends) of (label, text, ends) document pieces, tokenized in batches; a
    document's last piece gets EOS."""
    eos = np.array([tok.eos_id], np.int32)
    encode_batch = getattr(tok, "encode_batch", None) or (lambda texts: [tok.encode(t) for t in texts])
    batch: list[tuple[str, str, bool]] = []
    chars = 0

    def flush() -> Iterator[tuple[str, np.ndarray, bool]]:
        for (label, _, ends), ids in zip(batch, encode_batch([text for _, text, _ in batch])):
            ids = np.asarray(ids, np.int32).reshape(-1)
            yield label, (np.concatenate([ids, eos]) if ends else ids), ends

    for label, text, ends in pieces:
        batch.append((label, text, ends))
        chars += len(text)
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            yield from flush()
            batch, chars = [], 0
    yield from flush()


def _save_offsets(temporary: str, split: str, offsets: np.ndarray) -> None:
    np.save(os.path.join(temporary, f"{split}_offsets.npy"), np.asarray(offsets, np.int64))


def _write_local_splits(temporary: str, data: ml_collections.ConfigDict, tok: Tokenizer, dtype: np.dtype
                        ) -> tuple[dict[str, dict[str, int]], int, str]:
    """A local source: every document into one stream, then its tail split off as validation.

    The split is `tdlm_jax.data.dataset`'s: the last val_fraction of the documents (at least
    one), or of the tokens when the source is a single document.
    """
    all_path = os.path.join(temporary, "all.bin")
    writer = _Writer(all_path, dtype, tok, data.source)
    try:
        for _, ids, ends in _encoded((("all", *piece) for piece in _local_pieces(data)), tok):
            writer.add(ids, ends)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    offsets = np.frombuffer(writer.offsets, np.int64)
    num_docs, total = len(offsets) - 1, int(offsets[-1])
    if num_docs == 1:
        num_val = int(round(total * data.val_fraction))
        cut, split_by = total - num_val, "tokens"
        train_offsets, val_offsets = np.array([0, cut]), np.array([0, num_val])
    else:
        num_val_docs = max(1, int(round(num_docs * data.val_fraction)))
        if num_docs - num_val_docs < 1:
            raise DataError(f"the source has {num_docs} documents, too few to hold out val_fraction="
                            f"{data.val_fraction} and keep one for training: add documents or lower "
                            "--config.data.val_fraction")
        cut, split_by = int(offsets[num_docs - num_val_docs]), "documents"
        train_offsets, val_offsets = offsets[: num_docs - num_val_docs + 1], offsets[num_docs - num_val_docs:] - cut
    with open(all_path, "rb") as src, open(os.path.join(temporary, "val.bin"), "wb") as dst:
        src.seek(cut * dtype.itemsize)
        shutil.copyfileobj(src, dst, 1 << 24)
        dst.flush()
        os.fsync(dst.fileno())
    os.truncate(all_path, cut * dtype.itemsize)
    os.rename(all_path, os.path.join(temporary, "train.bin"))
    _save_offsets(temporary, "train", train_offsets)
    _save_offsets(temporary, "val", val_offsets)
    counts = {"train": {"num_tokens": cut, "num_docs": len(train_offsets) - 1},
              "val": {"num_tokens": total - cut, "num_docs": len(val_offsets) - 1}}
    return counts, writer.max_id, split_by


def _write_stream_splits(temporary: str, data: ml_collections.ConfigDict, tok: Tokenizer, dtype: np.dtype
                         ) -> tuple[dict[str, dict[str, int]], int, str]:
    """An `hf:` stream: each document goes straight to its split's file (hf_source's rule)."""
    writers = {split: _Writer(os.path.join(temporary, f"{split}.bin"), dtype, tok, data.source) for split in SPLITS}
    labeled = hf_source.labeled_documents(data.source, text_field=data.get("text_field", "text"),
                                          val_fraction=data.val_fraction,
                                          max_documents=int(data.get("hf_max_documents", 0)))
    try:
        pieces = ((label, *piece) for label, doc in labeled for piece in documents.document_pieces(doc))
        for label, ids, ends in _encoded(pieces, tok):
            writers[label].add(ids, ends)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    for writer in writers.values():
        writer.close()
    for split, writer in writers.items():
        if not writer.num_docs:
            raise DataError(f"data.source={data.source!r} gave no {'validation' if split == 'val' else split} "
                            f"documents (hf_max_documents={data.get('hf_max_documents', 0)}, val_fraction="
                            f"{data.val_fraction}): raise --config.data.hf_max_documents (0 reads all) or "
                            "--config.data.val_fraction")
        _save_offsets(temporary, split, np.frombuffer(writer.offsets, np.int64))
    counts = {split: {"num_tokens": int(w.offsets[-1]), "num_docs": w.num_docs} for split, w in writers.items()}
    return counts, max(w.max_id for w in writers.values()), "stream"


def _local_pieces(data: ml_collections.ConfigDict) -> Iterator[documents.Piece]:
    """A local source's documents as pieces: no file or document is ever whole in memory."""
    return documents.source_pieces(data.source, txt_documents=data.get("txt_documents", "file"),
                                   text_field=data.get("text_field", "text"))


def _write_json(path: str, value: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _fsync(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _discard(directory: str) -> None:
    """Moves an unusable entry aside (atomically), then deletes it."""
    aside = f"{directory}.corrupt-{socket.gethostname()}-{os.getpid()}"
    try:
        os.rename(directory, aside)
    except FileNotFoundError:
        return  # another process already removed it
    except OSError as e:
        raise DataError(f"the token cache {directory} is unusable and cannot be removed ({e.strerror}): delete "
                        "it, or set --config.data.cache_dir elsewhere") from None
    shutil.rmtree(aside, ignore_errors=True)


def _remove_dead_temporaries(directory: str) -> None:
    """Deletes what killed builds of this entry on this host left behind."""
    root, name = os.path.split(directory)
    prefix = f"{name}.tmp-{socket.gethostname()}-"
    for entry in os.listdir(root) if os.path.isdir(root) else ():
        if entry.startswith(prefix) and entry[len(prefix):].isdigit() and not _alive(int(entry[len(prefix):])):
            shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
        elif entry.startswith(f"{name}.corrupt-"):
            shutil.rmtree(os.path.join(root, entry), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
