"""Batching: cut a token stream into windows and serve them as batches.

Every batch is a dict {"tokens": int32[B, L], "valid": bool[B, L]}; `valid` is
False at [PAD] positions, which must be excluded from the loss and metrics.

Training batches come from a grain `MapDataset` pipeline (shuffle, repeat, host shard,
batch) over a random-access window source: in-memory arrays, or `StreamWindows`, which cuts
windows from a memory-mapped token cache when they are read. `TrainIterator` serves it, in
the training process or from grain worker processes (`data.worker_count`, prefetching
`data.prefetch_buffer_size` batches each). Its state is one integer, the number of batches
served, whatever the worker count, so it is checkpointed exactly (`get_state` / `set_state`,
or `grain.checkpoint.CheckpointSave` / `CheckpointRestore` through orbax), and a run may
resume with a different worker count.
"""

from __future__ import annotations

from typing import Any, Protocol

import grain
import numpy as np
from absl import flags

from tdlm_jax.errors import DataError

Batch = dict[str, np.ndarray]

# Windows come from arrays or a memory-mapped cache (cheap copies), so reading threads would
# only contend for the GIL, and grain's default 500-element prefetch buffer would hold 500
# whole batches. Parallel reading is what worker processes (`data.worker_count`) are for;
# inside each, and with no workers, reads are plain and on demand.
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def windows(tokens: np.ndarray, seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Cuts a 1-D token stream into non-overlapping windows of `seq_len`.

    The final partial window is kept, filled with `pad_id` and marked invalid, so
    no text is dropped.

    Returns:
        (tokens_NxL int32, valid_NxL bool) with N = ceil(len(tokens) / seq_len).
    """
    _check_positive("seq_len", seq_len, "--config.data.seq_len")
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    num_windows = -(-tokens.size // seq_len)
    padded = np.full(num_windows * seq_len, pad_id, dtype=np.int32)
    padded[: tokens.size] = tokens
    valid = np.zeros(num_windows * seq_len, dtype=bool)
    valid[: tokens.size] = True
    return padded.reshape(num_windows, seq_len), valid.reshape(num_windows, seq_len)


PACKINGS = ("wrap", "pad")


def pack(docs: list[np.ndarray], seq_len: int, pad_id: int, packing: str) -> tuple[np.ndarray, np.ndarray]:
    """Turns tokenized documents (each already ending in EOS) into windows.

    `wrap` concatenates the documents and cuts the stream into `seq_len` windows across
    document boundaries (only the last window is padded). `pad` puts each document in a
    window of its own, truncated to `seq_len` and padded with `pad_id` (valid=False), so
    no window mixes documents, at the cost of padding that shows in metrics/valid_ratio.

    Returns:
        (tokens_NxL int32, valid_NxL bool).
    """
    if packing not in PACKINGS:
        raise DataError(f"data.packing={packing!r}: set --config.data.packing to one of {', '.join(PACKINGS)}")
    if packing == "wrap":
        stream = np.concatenate(docs) if docs else np.zeros(0, np.int32)
        return windows(stream, seq_len, pad_id)
    _check_positive("seq_len", seq_len, "--config.data.seq_len")
    tokens_nxl = np.full((len(docs), seq_len), pad_id, dtype=np.int32)
    valid_nxl = np.zeros((len(docs), seq_len), dtype=bool)
    for row, doc in enumerate(docs):
        n = min(len(doc), seq_len)
        tokens_nxl[row, :n] = doc[:n]
        valid_nxl[row, :n] = True
    return tokens_nxl, valid_nxl


class StreamWindows:
    """The windows of `pack`, cut from a token stream when read instead of all at once.

    `stream` has `tokens` (1-D ids, each document ending in EOS; e.g. a memory map of the
    token cache) and `offsets` (int64 [num_docs + 1] document boundaries). Window i is
        wrap: tokens[i*L : (i+1)*L], the last one padded;
        pad:  document i, truncated to L and padded;
    exactly the rows `pack` returns for the same documents. Picklable when `stream` is (grain
    worker processes get a copy that maps the files again).
    """

    def __init__(self, stream: Any, seq_len: int, pad_id: int, packing: str):
        if packing not in PACKINGS:
            raise DataError(f"data.packing={packing!r}: set --config.data.packing to one of {', '.join(PACKINGS)}")
        _check_positive("seq_len", seq_len, "--config.data.seq_len")
        self.stream, self.seq_len, self.pad_id, self.packing = stream, seq_len, pad_id, packing
        num_tokens, num_docs = len(stream.tokens), len(stream.offsets) - 1
        self._len = -(-num_tokens // seq_len) if packing == "wrap" else num_docs

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> Batch:
        if not 0 <= index < self._len:
            raise IndexError(f"window {index} of {self._len}")
        if self.packing == "wrap":
            start = index * self.seq_len
            ids = self.stream.tokens[start:start + self.seq_len]
        else:
            start, end = (int(x) for x in self.stream.offsets[index:index + 2])
            ids = self.stream.tokens[start:min(end, start + self.seq_len)]
        tokens_l = np.full(self.seq_len, self.pad_id, np.int32)
        tokens_l[: len(ids)] = ids
        valid_l = np.zeros(self.seq_len, bool)
        valid_l[: len(ids)] = True
        return {"tokens": tokens_l, "valid": valid_l}

    def rows(self, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Windows [start, stop) as arrays (tokens int32[N, L], valid bool[N, L])."""
        stop = self._len if stop is None else min(stop, self._len)
        start = min(start, stop)
        if self.packing == "wrap":  # one read of the contiguous span
            first, last = start * self.seq_len, min(stop * self.seq_len, len(self.stream.tokens))
            return windows(np.asarray(self.stream.tokens[first:last], np.int32), self.seq_len, self.pad_id)
        rows = [self[i] for i in range(start, stop)]
        if not rows:
            return np.zeros((0, self.seq_len), np.int32), np.zeros((0, self.seq_len), bool)
        return np.stack([r["tokens"] for r in rows]), np.stack([r["valid"] for r in rows])


class WindowSource(Protocol):
    """Random access to windows: what `train_iterator` shuffles and batches."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Batch: ...


def train_iterator(
    source: WindowSource,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    worker_count: int = 0,
    prefetch_buffer_size: int = 1,
) -> "TrainIterator":
    """An infinite, checkpointable iterator of this host's training batches of `source`'s windows.

    Windows are shuffled with a fresh permutation every epoch (grain's shuffle derives a
    per-epoch seed from the epoch index). The stream is cut into host-sized batches and host
    h takes every `process_count`-th one, starting at h, so at every step the hosts' batches,
    stacked in process order, are exactly the global batch a single host would see, rows in
    the same order (the stratified sampler assigns noise levels by row, so the order matters).

    Args:
        source: random access to the windows, e.g. `StreamWindows` over the token cache.
        global_batch_size: rows per step summed over all hosts.
        seed: shuffle seed (non-negative int); same seed -> same batches.
        process_index: this host's index in [0, process_count).
        process_count: number of hosts.
        worker_count: 0 reads batches in this process when they are asked for; N > 0 reads
            them in N grain worker processes (the source is pickled to each), each keeping
            `prefetch_buffer_size` batches ready. The batches are the same either way.
        prefetch_buffer_size: batches each worker process keeps ready (>= 1).

    Returns:
        A `TrainIterator` of {"tokens": int32[B_local, L], "valid": bool[B_local, L]},
        B_local = global_batch_size // process_count, supporting get_state/set_state.

    Raises:
        DataError: on an empty source, a non-positive size, a negative seed, or a
            global_batch_size not divisible by process_count.
    """
    local_batch_size = _local_batch_size(global_batch_size, process_index, process_count)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}: set --config.seed")
    if not isinstance(worker_count, (int, np.integer)) or worker_count < 0:
        raise DataError(f"worker_count must be an integer >= 0, got {worker_count!r}: set --config.data.worker_count")
    _check_positive("prefetch_buffer_size", prefetch_buffer_size, "--config.data.prefetch_buffer_size")
    if len(source) == 0:
        raise DataError(
            "the training token stream is empty: set --config.data.source to a non-empty text"
        )
    ds = (
        grain.MapDataset.source(source)
        .shuffle(seed=_grain_seed(seed))
        .repeat()  # infinite; index // num_windows is the epoch the shuffle reseeds by
    )
    # Host h's step-k rows are stream positions (k * P + h) * B_local + j: the contiguous
    # block h of global batch k, which make_array_from_process_local_data places at rows
    # h * B_local ... of the global array, as one host reading the whole batch would.
    ds = ds.batch(local_batch_size, drop_remainder=True)[process_index::process_count]
    return TrainIterator(ds, worker_count=int(worker_count), prefetch_buffer_size=int(prefetch_buffer_size))


class TrainIterator(grain.DatasetIterator):
    """Serves batch k, k + 1, ... of a batched `MapDataset`; its state is {"next_index": k}.

    The state counts batches served, so it means the same with any worker count (grain's own
    multiprocess state is per worker), and it is the state the in-process grain iterator had,
    so checkpoints written before workers existed restore. Setting it restarts the pipeline
    at that batch: the dataset is random access, so nothing is replayed.
    """

    def __init__(self, batched: grain.MapDataset, *, worker_count: int = 0, prefetch_buffer_size: int = 1):
        super().__init__()
        self._batched = batched
        self.worker_count, self.prefetch_buffer_size = worker_count, prefetch_buffer_size
        self._next_index = 0
        self._iterator: Any = None  # built on first use, so a restore does not start workers twice

    def __next__(self) -> Batch:
        if self._iterator is None:
            self._iterator = self._open()
        batch = next(self._iterator)
        self._next_index += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"next_index": self._next_index}

    def set_state(self, state: dict[str, Any]) -> None:
        index = state.get("next_index") if isinstance(state, dict) else None
        if not isinstance(index, (int, np.integer)) or index < 0:
            raise DataError(f"the checkpointed data position {state!r} is not a batch index: restore a checkpoint "
                            "written by tdlm_jax, or start a new --workdir")
        self._close_iterator()
        self._next_index = int(index)

    def close(self) -> None:
        """Stops the worker processes; call it when the run ends."""
        self._close_iterator()
        super().close()

    def _open(self) -> grain.DatasetIterator:
        ds = self._batched[self._next_index:].to_iter_dataset(_READ_OPTIONS)
        if self.worker_count:
            _ensure_absl_flags_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.worker_count,
                                                             per_worker_buffer_size=self.prefetch_buffer_size))
        return iter(ds)

    def _close_iterator(self) -> None:
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = None


def _ensure_absl_flags_parsed() -> None:
    """grain reads its absl flags when it starts workers; outside `app.run` (a notebook, pytest)
    nothing has parsed them, so their defaults are taken."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def eval_batches_from_source(source: StreamWindows, *, batch_size: int, num_batches: int | None,
                             pad_id: int) -> list[Batch]:
    """A fixed list of validation batches of consecutive windows, reading only the windows used.

    Takes the first `num_batches * batch_size` windows in order (all windows when
    `num_batches` is 0 or None, or when fewer exist). Every batch has exactly `batch_size`
    rows so the eval step compiles once: missing rows at the end are filled with pad_id and
    valid=False, contributing nothing to any metric.

    Returns:
        A list of {"tokens": int32[batch_size, L], "valid": bool[batch_size, L]}.
    """
    count = len(source) if not num_batches or num_batches < 0 else num_batches * batch_size
    return eval_batches_from_windows(*source.rows(0, count), batch_size=batch_size, num_batches=num_batches,
                                     pad_id=pad_id)


def eval_batches_from_windows(
    tokens_nxl: np.ndarray,
    valid_nxl: np.ndarray,
    *,
    batch_size: int,
    num_batches: int | None,
    pad_id: int,
) -> list[Batch]:
    """`eval_batches_from_source` over windows already cut (e.g. by `pack`)."""
    _check_positive("batch_size", batch_size, "--config.data.eval_batch_size")
    if num_batches is not None and num_batches < 0:
        raise DataError(
            f"num_batches must be >= 0 (0 means all), got {num_batches}: "
            "set --config.data.num_eval_batches"
        )
    if num_batches:
        tokens_nxl = tokens_nxl[: num_batches * batch_size]
        valid_nxl = valid_nxl[: num_batches * batch_size]
    total = -(-len(tokens_nxl) // batch_size) * batch_size
    tokens_nxl = _pad_rows(tokens_nxl, total, pad_id)
    valid_nxl = _pad_rows(valid_nxl, total, False)
    return [
        {"tokens": tokens_nxl[i : i + batch_size], "valid": valid_nxl[i : i + batch_size]}
        for i in range(0, total, batch_size)
    ]


def _grain_seed(seed: int) -> int:
    """Mixes the user seed into a 32-bit grain shuffle seed.

    grain reshuffles epoch e with seed `seed + e`, so raw seeds s and s + 1 would
    give the same permutations shifted by one epoch. Hashing decorrelates them.
    """
    return int(np.random.SeedSequence(int(seed)).generate_state(1, dtype=np.uint32)[0])


def _local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
    """Validates the host layout and returns the per-host batch size."""
    _check_positive("global_batch_size", global_batch_size, "--config.training.batch_size")
    _check_positive("process_count", process_count, "the launcher's process count")
    if not 0 <= process_index < process_count:
        raise DataError(
            f"process_index {process_index} is outside [0, {process_count}): "
            "launch with a valid jax.distributed process id"
        )
    if global_batch_size % process_count:
        raise DataError(
            f"global batch size {global_batch_size} is not divisible by the "
            f"{process_count} processes: set --config.training.batch_size to a "
            f"multiple of {process_count}"
        )
    return global_batch_size // process_count


def _check_positive(name: str, value: int, flag: str) -> None:
    """Raises DataError naming `flag` unless `value` is a positive integer."""
    if not isinstance(value, (int, np.integer)) or value <= 0:
        raise DataError(f"{name} must be a positive integer, got {value!r}: set {flag}")


def _pad_rows(rows: np.ndarray, total: int, fill) -> np.ndarray:
    """Appends rows filled with `fill` until `rows` has `total` rows."""
    extra = np.full((total - len(rows),) + rows.shape[1:], fill, dtype=rows.dtype)
    return np.concatenate([rows, extra], axis=0)
