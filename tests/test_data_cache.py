"""Tests for the token cache (tdlm_jax.data.cache), the lazily cut windows, the training iterator
with grain worker processes, and the data-speed benchmark function."""

import json
import logging
import os
import pathlib
import pickle
import runpy
import subprocess
import sys

import numpy as np
import pytest

from tdlm_jax.data import cache, dataset, documents, pipeline, subword, throughput, tokenizer
from tdlm_jax.errors import DataError

REPO = pathlib.Path(__file__).resolve().parents[1]
BYTE = tokenizer.ByteTokenizer()
DOCS = ["abc", "defgh", "ij", "a much longer document", "k", "lmnop", "qr", "stu"]


def _data(source, cache_dir, **overrides):
    data = runpy.run_path(str(REPO / "configs" / "base.py"))["get_config"]().data
    data.update({"source": str(source), "seq_len": 8, "val_fraction": 0.25, "cache_dir": str(cache_dir), **overrides})
    return data


def _jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def _expected_windows(docs, packing, seq_len=8):
    """What the in-memory path (pipeline.pack over tokenized documents) gives."""
    ids = [np.concatenate([BYTE.encode(d), [BYTE.eos_id]]) for d in docs]
    return pipeline.pack(ids, seq_len, BYTE.pad_id, packing)


@pytest.mark.parametrize("packing, piece_chars", [("wrap", None), ("pad", None), ("pad", 3)])
def test_cached_windows_equal_packing_in_memory(tmp_path, monkeypatch, packing, piece_chars):
    if piece_chars:  # documents tokenized in pieces still end (and pad) where the documents end
        monkeypatch.setattr(documents, "MAX_PIECE_CHARS", piece_chars)
    source = _jsonl(tmp_path / "d.jsonl", DOCS)
    splits = dataset.split_windows(_data(source, tmp_path / "cache", packing=packing), BYTE)
    for split, docs in (("train", DOCS[:6]), ("val", DOCS[6:])):  # 0.25 of 8 documents held out
        expected = _expected_windows(docs, packing)
        np.testing.assert_array_equal(splits[split][0], expected[0])
        np.testing.assert_array_equal(splits[split][1], expected[1])
    if packing == "wrap":  # known values: the stream crosses document boundaries
        assert BYTE.decode(splits["train"][0][0]) == "abc<|endoftext|>defg"
    else:
        assert BYTE.decode(splits["train"][0][3]) == "a much l"  # truncated to seq_len


def test_single_document_is_split_by_tokens(tmp_path):
    text = "x" * 99  # + EOS = 100 tokens: 25 held out
    (tmp_path / "one.txt").write_text(text)
    data = _data(tmp_path / "one.txt", tmp_path / "cache")
    token_cache = cache.open_or_build(data, BYTE)
    assert token_cache.meta["split_by"] == "tokens"
    assert (token_cache.train.num_tokens, token_cache.val.num_tokens) == (75, 25)
    assert token_cache.val.tokens[-1] == BYTE.eos_id and token_cache.train.tokens.dtype == np.uint16
    with pytest.raises(DataError, match=r"too short for seq_len=32.*validation 25 tokens"):
        dataset.training_windows(_data(tmp_path / "one.txt", tmp_path / "cache", seq_len=32), BYTE)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak from Linux's /proc")
def test_a_one_line_file_builds_its_cache_in_bounded_memory(tmp_path):
    """The whole file was once read, decoded and encoded at once: a 200 MB line peaked at 3 GB."""
    size_mb = 96
    line = ("thou art the king é λόγος " * 4000).encode()
    with open(tmp_path / "one.txt", "wb") as f:
        for _ in range(size_mb * (1 << 20) // len(line)):
            f.write(line)
    # VmHWM, not ru_maxrss: the latter keeps the peak of the forking pytest process.
    script = ("import re, runpy; from tdlm_jax.data import cache, tokenizer; "
              f"data = runpy.run_path({str(REPO / 'configs' / 'base.py')!r})['get_config']().data; "
              f"data.update(source={str(tmp_path / 'one.txt')!r}, cache_dir={str(tmp_path / 'cache')!r}); "
              "c = cache.open_or_build(data, tokenizer.ByteTokenizer()); "
              "print(c.train.num_tokens + c.val.num_tokens, "
              "re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read()).group(1))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    num_tokens, peak_mb = int(out[0]), int(out[1]) / 1024
    assert num_tokens == os.path.getsize(tmp_path / "one.txt") + 1  # bytes + EOS
    assert peak_mb < size_mb * 2, f"peak {peak_mb:.0f} MB building the cache of a {size_mb} MB file"


def test_cache_is_reused_and_keyed_on_what_determines_the_tokens(tmp_path, caplog):
    source = _jsonl(tmp_path / "d.jsonl", DOCS)
    data = _data(source, tmp_path / "cache")
    with caplog.at_level(logging.INFO):
        first = cache.open_or_build(data, BYTE)
        again = cache.open_or_build(data, BYTE)
    assert first.built and not again.built and first.directory == again.directory
    assert f"token cache built: tokenized {source}" in caplog.text
    assert f"token cache hit: {first.directory}" in caplog.text
    # Windows are cut when read: seq_len, packing and batch settings share the entry.
    other_windows = _data(source, tmp_path / "cache", seq_len=16, packing="pad")
    assert cache.open_or_build(other_windows, BYTE).directory == first.directory
    # The split, the tokenizer and the file itself are part of the key.
    assert cache.open_or_build(_data(source, tmp_path / "cache", val_fraction=0.5), BYTE).directory != first.directory
    gpt2 = tokenizer.get_tokenizer("gpt2")
    assert cache.open_or_build(data, gpt2).directory != first.directory
    _jsonl(source, DOCS + ["one more"])
    changed = cache.open_or_build(data, BYTE)
    assert changed.built and changed.directory != first.directory
    assert changed.train.num_docs == 7  # 9 documents, round(9 * 0.25) = 2 held out


@pytest.mark.parametrize("damage", ["truncate", "no_meta", "bad_json", "no_offsets"])
def test_a_damaged_cache_is_rebuilt_with_a_warning(tmp_path, caplog, damage):
    data = _data(_jsonl(tmp_path / "d.jsonl", DOCS), tmp_path / "cache")
    good = cache.open_or_build(data, BYTE)
    expected = np.array(good.train.tokens)
    path = pathlib.Path(good.directory)
    if damage == "truncate":
        os.truncate(path / "train.bin", 6)
    elif damage == "no_meta":
        (path / "meta.json").unlink()
    elif damage == "bad_json":
        (path / "meta.json").write_text('{"format": 1, "identity"')
    else:
        (path / "val_offsets.npy").unlink()
    with caplog.at_level(logging.WARNING):
        rebuilt = cache.open_or_build(data, BYTE)
    assert rebuilt.built and f"token cache {good.directory} is unusable" in caplog.text
    np.testing.assert_array_equal(rebuilt.train.tokens, expected)
    assert sorted(os.listdir(tmp_path / "cache")) == [path.name]  # nothing left aside


def test_an_interrupted_build_leaves_nothing_that_is_trusted(tmp_path):
    data = _data(_jsonl(tmp_path / "d.jsonl", DOCS), tmp_path / "cache")

    class Killed(BaseException):
        pass

    def encode_then_die(texts):
        raise Killed()  # as a SIGKILL would, mid-build: before meta.json and the rename

    broken = subword.SubwordTokenizer("byte-like", 256, None, lambda t: list(t.encode()), bytes.decode,
                                      encode_batch_fn=encode_then_die)
    with pytest.raises(Killed):
        cache.open_or_build(data, broken)
    assert os.listdir(tmp_path / "cache") == []
    # A temporary directory of a build whose process died is removed by the next build.
    good_name = pathlib.Path(cache.open_or_build(data, BYTE).directory).name
    dead = tmp_path / "cache" / f"{good_name}.tmp-{__import__('socket').gethostname()}-999999999"
    dead.mkdir()
    (dead / "train.bin").write_bytes(b"half")
    (tmp_path / "cache" / good_name / "meta.json").unlink()  # force a rebuild of the same entry
    cache.open_or_build(data, BYTE)
    assert os.listdir(tmp_path / "cache") == [good_name]


def test_token_ids_outside_the_vocabulary_are_refused(tmp_path):
    data = _data(_jsonl(tmp_path / "d.jsonl", DOCS), tmp_path / "cache")
    broken = subword.SubwordTokenizer("hf:broken.json", 10, None, lambda t: [3, 12], str)  # 11 text ids
    with pytest.raises(DataError, match=r"tokenizer 'hf:broken.json' produced token id 12 .*outside its 11 "
                                        r"text ids.*--config.data.tokenizer") as info:
        cache.open_or_build(data, broken)
    assert "\n" not in str(info.value) and os.listdir(tmp_path / "cache") == []


def test_large_vocabularies_are_stored_as_uint32(tmp_path):
    data = _data(_jsonl(tmp_path / "d.jsonl", DOCS), tmp_path / "cache")
    big = subword.SubwordTokenizer("big", 70_000, None, lambda t: [len(t), 69_999], str)
    token_cache = cache.open_or_build(data, big)
    assert token_cache.train.tokens.dtype == np.uint32 and token_cache.meta["max_id"] == 70_000  # EOS
    np.testing.assert_array_equal(token_cache.train.tokens[:3], [3, 69_999, 70_000])


def test_an_unwritable_cache_dir_is_a_one_line_error(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    data = _data(_jsonl(tmp_path / "d.jsonl", DOCS), tmp_path / "file" / "cache")
    with pytest.raises(DataError, match=r"cannot create the token cache directory .*--config.data.cache_dir"):
        cache.open_or_build(data, BYTE)


def test_cache_dir_defaults(monkeypatch):
    data = runpy.run_path(str(REPO / "configs" / "base.py"))["get_config"]().data
    monkeypatch.setenv(cache.ENV_DIR, "/somewhere/tokens")
    assert cache.cache_root(data) == "/somewhere/tokens"
    monkeypatch.delenv(cache.ENV_DIR)
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert cache.cache_root(data) == "/xdg/tdlm_jax/tokens"
    data.cache_dir = "/mine"
    assert cache.cache_root(data) == "/mine"


def test_stream_windows_pickle_without_their_data(tmp_path):
    (tmp_path / "big.txt").write_text("0123456789" * 20_000)
    windows = dataset.training_windows(_data(tmp_path / "big.txt", tmp_path / "cache"), BYTE)["train"]
    assert len(windows) == 18_751  # 200_001 tokens, 50_000 held out: ceil(150_001 / 8), the last one padded
    blob = pickle.dumps(windows)
    assert len(blob) < 2000  # paths and sizes, not the 300 kB stream
    copy = pickle.loads(blob)
    for i in (0, 7, len(windows) - 1):
        np.testing.assert_array_equal(copy[i]["tokens"], windows[i]["tokens"])
    assert windows[len(windows) - 1]["valid"].sum() == 1


def _cached_iterator(tmp_path, **kwargs):
    # 45 training documents of 11 or 12 tokens = 530 tokens: 9 windows of 64, an epoch every 2.25 batches.
    windows = dataset.training_windows(_data(_jsonl(tmp_path / "d.jsonl", [f"document {i}" for i in range(60)]),
                                             tmp_path / "cache", seq_len=64), BYTE)["train"]
    assert len(windows) == 9
    return pipeline.train_iterator(windows, global_batch_size=4, seed=3, **kwargs)


def _take(it, n):
    return [next(it)["tokens"] for _ in range(n)]


def test_iterator_state_is_exact_and_portable_across_worker_counts(tmp_path):
    import grain
    import orbax.checkpoint as ocp

    reference = _take(_cached_iterator(tmp_path), 9)
    with_workers = _cached_iterator(tmp_path, worker_count=2, prefetch_buffer_size=2)
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    try:
        first = _take(with_workers, 6)  # crosses epochs
        assert with_workers.get_state() == {"next_index": 6}  # the in-process grain iterator's state format
        manager.save(6, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(with_workers)))
        manager.wait_until_finished()
        rest = _take(with_workers, 3)
    finally:
        with_workers.close()
    np.testing.assert_array_equal(np.stack(first + rest), np.stack(reference))
    for workers in (0, 2):  # a checkpoint from a run with workers resumes with or without them
        resumed = _cached_iterator(tmp_path, worker_count=workers)
        try:
            manager.restore(6, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
            np.testing.assert_array_equal(np.stack(_take(resumed, 3)), np.stack(reference[6:]))
        finally:
            resumed.close()
    manager.close()
    with pytest.raises(DataError, match="not a batch index"):
        _cached_iterator(tmp_path).set_state({"next_index_in_cycle": 1})


def test_pipeline_tokens_per_second(tmp_path):
    config = runpy.run_path(str(REPO / "configs" / "tiny.py"))["get_config"]()
    config.data.cache_dir = str(tmp_path / "cache")
    first = throughput.pipeline_tokens_per_second(config, num_batches=20, workdir=str(tmp_path / "run"))
    assert not first["cache_hit"] and first["tokens_per_batch"] == 8 * 32 and first["num_batches"] == 20
    assert first["tokens_per_second"] == pytest.approx(20 * 256 / first["seconds"])
    assert first["cache_directory"].startswith(str(tmp_path / "cache"))
    again = throughput.pipeline_tokens_per_second(config, num_batches=5, workdir=str(tmp_path / "run"))
    assert again["cache_hit"] and again["worker_count"] == 0
    assert again["num_train_windows"] == first["num_train_windows"]
    with pytest.raises(ValueError, match="num_batches"):
        throughput.pipeline_tokens_per_second(config, num_batches=0, workdir=str(tmp_path / "run"))
