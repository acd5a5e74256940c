"""Batching: cut a token stream into windows and serve them as batches.

Every batch is a dict {"tokens": int32[B, L], "valid": bool[B, L]}; `valid` is
False at [PAD] positions, which must be excluded from the loss and metrics.

Training batches come from a grain `MapDataset` pipeline whose iterator state is a
single integer, so it can be checkpointed exactly (`get_state` / `set_state`, or
`grain.checkpoint.CheckpointSave` / `CheckpointRestore` through orbax).
"""

from __future__ import annotations

import grain
import numpy as np

from tdlm_jax.errors import DataError

Batch = dict[str, np.ndarray]

# The windows already live in memory, so reading threads would only contend for
# the GIL, and grain's default 500-element prefetch buffer would hold 500 whole
# batches. Plain in-process reads also keep the iterator state trivially exact.
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


def make_train_iterator(
    tokens: np.ndarray,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    pad_id: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """Returns an infinite, checkpointable iterator of this host's training batches.

    Windows are shuffled with a fresh permutation every epoch (grain's shuffle
    derives a per-epoch seed from the epoch index). Host sharding takes every
    `process_count`-th element of the shuffled stream, starting at
    `process_index`, so at every step the union of all hosts' batches is exactly
    the global batch a single host would see (as a set of rows; row order
    differs), and the hosts' batches are disjoint within an epoch.

    Args:
        tokens: 1-D training token stream.
        seq_len: window length L.
        global_batch_size: rows per step summed over all hosts.
        seed: shuffle seed (non-negative int); same seed -> same batches.
        pad_id: id filling the final partial window.
        process_index: this host's index in [0, process_count).
        process_count: number of hosts.

    Returns:
        A grain iterator of {"tokens": int32[B_local, L], "valid": bool[B_local, L]},
        B_local = global_batch_size // process_count, supporting get_state/set_state.

    Raises:
        DataError: on an empty stream, a non-positive size, a negative seed, or a
            global_batch_size not divisible by process_count.
    """
    tokens_nxl, valid_nxl = windows(tokens, seq_len, pad_id)
    return train_iterator_from_windows(tokens_nxl, valid_nxl, global_batch_size=global_batch_size, seed=seed,
                                       process_index=process_index, process_count=process_count)


def train_iterator_from_windows(
    tokens_nxl: np.ndarray,
    valid_nxl: np.ndarray,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """`make_train_iterator` over windows already cut (e.g. by `pack`)."""
    local_batch_size = _local_batch_size(global_batch_size, process_index, process_count)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}: set --config.seed")
    if len(tokens_nxl) == 0:
        raise DataError(
            "the training token stream is empty: set --config.data.source to a non-empty text"
        )
    ds = (
        grain.MapDataset.source(_WindowSource(tokens_nxl, valid_nxl))
        .shuffle(seed=_grain_seed(seed))
        .repeat()  # infinite; index // num_windows is the epoch the shuffle reseeds by
    )
    # Strided sharding before batching: host h's step-k rows are global stream
    # positions (k * B_local + j) * P + h, which together cover k*G .. (k+1)*G - 1.
    ds = ds[process_index::process_count]
    ds = ds.batch(local_batch_size, drop_remainder=True)
    return iter(ds.to_iter_dataset(_READ_OPTIONS))


def make_eval_batches(
    tokens: np.ndarray,
    *,
    seq_len: int,
    batch_size: int,
    num_batches: int | None,
    pad_id: int,
) -> list[Batch]:
    """Returns a fixed list of validation batches of consecutive windows.

    Takes the first `num_batches * batch_size` windows in order (all windows when
    `num_batches` is 0 or None, or when fewer exist). Every batch has exactly
    `batch_size` rows so the eval step compiles once: missing rows at the end are
    filled with pad_id and valid=False, contributing nothing to any metric.

    Returns:
        A list of {"tokens": int32[batch_size, L], "valid": bool[batch_size, L]}.
    """
    return eval_batches_from_windows(*windows(tokens, seq_len, pad_id), batch_size=batch_size,
                                     num_batches=num_batches, pad_id=pad_id)


def eval_batches_from_windows(
    tokens_nxl: np.ndarray,
    valid_nxl: np.ndarray,
    *,
    batch_size: int,
    num_batches: int | None,
    pad_id: int,
) -> list[Batch]:
    """`make_eval_batches` over windows already cut (e.g. by `pack`)."""
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


class _WindowSource:
    """Random-access grain source yielding one window dict per index."""

    def __init__(self, tokens_nxl: np.ndarray, valid_nxl: np.ndarray):
        self._tokens = tokens_nxl
        self._valid = valid_nxl

    def __len__(self) -> int:
        return len(self._tokens)

    def __getitem__(self, index: int) -> Batch:
        return {"tokens": self._tokens[index], "valid": self._valid[index]}


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
