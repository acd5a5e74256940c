"""Tests for tdlm_jax.data: tokenizer, text sources, windows and batch pipelines."""

import json
import logging
import pathlib
import re
import runpy
import types

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tdlm_jax.data import dataset, documents, pipeline, sources, tokenizer
from tdlm_jax.errors import DataError

PAD = 257
base_config = runpy.run_path(str(pathlib.Path(__file__).parents[1] / "configs" / "base.py"))["get_config"]


def _take(it, n):
    return [next(it) for _ in range(n)]


def _rows(batch):
    """Rows of a batch as a sorted list of tuples, for order-free comparison."""
    return sorted(map(tuple, batch["tokens"].tolist()))


def _stream_windows(tokens, seq_len=8):
    """The production windows (`StreamWindows`) of one in-memory token stream."""
    stream = types.SimpleNamespace(tokens=np.asarray(tokens), offsets=np.array([0, len(tokens)]))
    return pipeline.StreamWindows(stream, seq_len, PAD, "wrap")


def _train_iter(tokens, seq_len=8, **overrides):
    kwargs = dict(global_batch_size=4, seed=0)
    kwargs.update(overrides)
    return pipeline.train_iterator(_stream_windows(tokens, seq_len), **kwargs)


def _eval_batches(tokens, seq_len, **kwargs):
    return pipeline.eval_batches_from_source(_stream_windows(tokens, seq_len), pad_id=PAD, **kwargs)


# ----------------------------------------------------------------- tokenizer


def test_byte_tokenizer_ids_and_round_trip():
    tok = tokenizer.get_tokenizer("byte")
    # Text ids, then EOS (predictable), then [MASK] and [PAD] (never predicted).
    assert (tok.eos_id, tok.mask_id, tok.pad_id, tok.vocab_size, tok.text_vocab_size) == (256, 257, 258, 259, 257)
    text = "To be, or not to be — ça va?"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.max() < 256
    assert tok.decode(ids) == text


def test_byte_tokenizer_decode_specials_and_invalid_utf8():
    tok = tokenizer.ByteTokenizer()
    ids = list(tok.encode("ab")) + [tok.mask_id] + list(tok.encode("c")) + [tok.pad_id] * 3
    assert tok.decode(ids) == "ab_c"
    assert tok.decode(ids, mask_str="[M]") == "ab[M]c"
    assert tok.decode(list(tok.encode("x")) + [tok.eos_id]) == "x<|endoftext|>"
    # A multi-byte character cut in half decodes to U+FFFD instead of failing.
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"


def test_unknown_tokenizer_names_allowed():
    for name in ("word", "bpe:12", "bpe:x", "hf:"):
        with pytest.raises(DataError, match="--config.data.tokenizer.*byte, gpt2, bpe:<vocab_size>"):
            tokenizer.get_tokenizer(name)


# ------------------------------------------------------------------- sources


def test_shakespeare_loads_clean_text():
    text = sources.load_text("shakespeare")
    assert len(text.encode("utf-8")) > 4_000_000
    assert "ROMEO" in text
    assert "*" not in text and "_" not in text and "\\[" not in text
    assert "  \n" not in text and "\n\n\n" not in text
    assert sources.load_text("shakespeare") is text  # cached per process


def test_strip_markdown():
    md = "# Play\n\n\n\n**HAMLET**  \nTo be.  \n_Exit_ \\[Aside] *Sound a horn.*\n"
    assert sources.strip_markdown(md) == "Play\n\nHAMLET\nTo be.\nExit [Aside] Sound a horn.\n"


def test_load_local_files_and_glob(tmp_path):
    (tmp_path / "b.txt").write_text("second\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first\n", encoding="utf-8")
    assert sources.load_text(str(tmp_path / "a.txt")) == "first\n"
    assert sources.load_text(str(tmp_path / "*.txt")) == "first\n\nsecond"


@pytest.mark.parametrize("kind", ["missing", "empty", "blank", "nomatch", "directory"])
def test_bad_sources_raise_data_error_naming_path(tmp_path, kind):
    path = tmp_path / "corpus.txt"
    if kind == "empty":
        path.write_text("")
    elif kind == "blank":
        path.write_text(" \n\t\n")
    elif kind == "nomatch":
        path = tmp_path / "*.nothing"
    elif kind == "directory":
        path = tmp_path
    with pytest.raises(DataError, match="--config.data.source") as info:
        sources.load_text(str(path))
    assert str(path) in str(info.value)


def test_split_train_val_deterministic_disjoint_sizes():
    tokens = np.arange(1000, dtype=np.int32)
    train, val = sources.split_train_val(tokens, 0.1, seq_len=16)
    assert (len(train), len(val)) == (900, 100)
    np.testing.assert_array_equal(np.concatenate([train, val]), tokens)
    assert not set(train.tolist()) & set(val.tolist())
    train2, val2 = sources.split_train_val(tokens, 0.1, seq_len=16)
    np.testing.assert_array_equal(train, train2)
    np.testing.assert_array_equal(val, val2)


@pytest.mark.parametrize("val_fraction, seq_len", [(0.1, 200), (0.0, 8), (1.0, 8)])
def test_split_train_val_rejects_bad_sizes(val_fraction, seq_len):
    with pytest.raises(DataError):
        sources.split_train_val(np.arange(1000), val_fraction, seq_len)


# ------------------------------------------------------------------- windows


def test_windows_shape_and_padding():
    tokens_nxl, valid_nxl = pipeline.windows(np.arange(10), 4, PAD)
    assert tokens_nxl.shape == valid_nxl.shape == (3, 4)
    assert tokens_nxl.dtype == np.int32 and valid_nxl.dtype == bool
    np.testing.assert_array_equal(tokens_nxl[2], [8, 9, PAD, PAD])
    np.testing.assert_array_equal(valid_nxl[2], [True, True, False, False])
    assert valid_nxl[:2].all()
    exact, exact_valid = pipeline.windows(np.arange(8), 4, PAD)
    assert exact.shape == (2, 4) and exact_valid.all()


# --------------------------------------------------------------- train iterator


def test_train_iterator_batches_and_determinism():
    tokens = np.arange(8 * 10 + 3, dtype=np.int32)  # 11 windows, last partial
    first = _take(_train_iter(tokens), 6)
    assert first[0]["tokens"].shape == first[0]["valid"].shape == (4, 8)
    assert first[0]["tokens"].dtype == np.int32 and first[0]["valid"].dtype == bool
    again = _take(_train_iter(tokens), 6)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
        np.testing.assert_array_equal(a["valid"], b["valid"])
    other = _take(_train_iter(tokens, seed=1), 6)
    assert any(not np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(first, other))
    # Padding stays aligned with `valid`.
    for batch in first:
        assert ((batch["tokens"] == PAD) == ~batch["valid"]).all()


def test_train_iterator_reshuffles_each_epoch():
    tokens = np.arange(8 * 16, dtype=np.int32)  # 16 windows = 4 steps per epoch
    batches = _take(_train_iter(tokens), 8)
    epoch0 = np.concatenate([b["tokens"][:, 0] for b in batches[:4]])
    epoch1 = np.concatenate([b["tokens"][:, 0] for b in batches[4:]])
    assert sorted(epoch0) == sorted(epoch1) == list(range(0, 128, 8))  # each window once
    assert not np.array_equal(epoch0, epoch1)


def test_train_iterator_hosts_split_the_global_batch():
    tokens = np.arange(8 * 40, dtype=np.int32)
    single = _take(_train_iter(tokens, global_batch_size=8), 5)
    hosts = [
        _take(_train_iter(tokens, global_batch_size=8, process_index=i, process_count=2), 5)
        for i in range(2)
    ]
    for step, global_batch in enumerate(single):
        host_rows = [_rows(h[step]) for h in hosts]
        assert all(len(r) == 4 for r in host_rows)
        assert not set(host_rows[0]) & set(host_rows[1])
        assert sorted(host_rows[0] + host_rows[1]) == _rows(global_batch)
        # Stacked in process order, the hosts' rows are the single-host batch, row for row:
        # the stratified sampler assigns noise by row, so the order is part of the math.
        stacked = np.concatenate([h[step]["tokens"] for h in hosts])
        np.testing.assert_array_equal(stacked, global_batch["tokens"])


def test_train_iterator_rejects_indivisible_batch():
    with pytest.raises(DataError, match="divisible"):
        _train_iter(np.arange(100), global_batch_size=5, process_count=2)


def test_train_iterator_state_restore_resumes_exactly():
    tokens = np.arange(8 * 13 + 5, dtype=np.int32)
    it = _train_iter(tokens)
    _take(it, 7)  # crosses an epoch boundary (14 windows = 3.5 steps per epoch)
    state = it.get_state()
    expected = _take(it, 6)
    restored = _train_iter(tokens)
    restored.set_state(state)
    for a, b in zip(expected, _take(restored, 6)):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
        np.testing.assert_array_equal(a["valid"], b["valid"])


def test_train_iterator_orbax_checkpoint_round_trip(tmp_path):
    tokens = np.arange(8 * 20, dtype=np.int32)
    it = _train_iter(tokens)
    _take(it, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
        expected = _take(it, 4)
        fresh = _train_iter(tokens)
        manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    for a, b in zip(expected, _take(fresh, 4)):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])


# -------------------------------------------------------------- eval batches


def test_eval_batches_fixed_and_padded():
    tokens = np.arange(8 * 5 + 2, dtype=np.int32)  # 6 windows, last partial
    batches = _eval_batches(tokens, seq_len=8, batch_size=4, num_batches=None)
    assert len(batches) == 2
    assert all(b["tokens"].shape == b["valid"].shape == (4, 8) for b in batches)
    np.testing.assert_array_equal(batches[0]["tokens"].reshape(-1), np.arange(32))
    assert not batches[1]["valid"][2:].any() and (batches[1]["tokens"][2:] == PAD).all()
    assert batches[1]["valid"][1, :2].all() and not batches[1]["valid"][1, 2:].any()
    again = _eval_batches(tokens, seq_len=8, batch_size=4, num_batches=0)
    for a, b in zip(batches, again):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])


def test_eval_batches_limit_and_shortfall():
    tokens = np.arange(8 * 20, dtype=np.int32)
    one = _eval_batches(tokens, seq_len=8, batch_size=4, num_batches=1)
    assert len(one) == 1 and one[0]["valid"].all()
    many = _eval_batches(tokens, seq_len=8, batch_size=8, num_batches=10)
    assert len(many) == 3 and many[2]["valid"].sum() == 4 * 8


# ------------------------------------------------------- documents (file formats)


def _write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")


def test_txt_documents_per_file_and_per_paragraph(tmp_path):
    (tmp_path / "a.txt").write_text("one\ntwo\n\n\nthree\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("four\n", encoding="utf-8")
    pattern = str(tmp_path / "*.txt")
    assert documents.load_documents(pattern) == ["one\ntwo\n\n\nthree\n", "four\n"]
    assert documents.load_documents(pattern, txt_documents="paragraph") == ["one\ntwo", "three", "four"]


def test_jsonl_documents_field_and_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    _write_jsonl(path, [{"body": "first", "id": 1}, {"body": ""}, {"body": "second"}])
    with open(path, "a") as f:
        f.write("\n")
    assert documents.load_documents(str(path), text_field="body") == ["first", "second"]


def test_parquet_documents(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["alpha", None, "beta"], "n": [1, 2, 3]}), tmp_path / "d.parquet")
    assert documents.load_documents(str(tmp_path / "*.parquet")) == ["alpha", "beta"]
    with pytest.raises(DataError, match="no column 'body'.*--config.data.text_field"):
        documents.load_documents(str(tmp_path / "d.parquet"), text_field="body")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="bad.parquet.*not a readable Parquet"):
        documents.load_documents(str(tmp_path / "bad.parquet"))


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"text": broken\n', r"line 2 is not JSON"),
    ('{"text": "ok"}\n\n{"body": "x"}\n', r"line 3 has no string field 'text'.*--config.data.text_field"),
    ('["text"]\n', r"line 1 has no string field"),
    ("", r"is empty"),
    ('{"text": "  "}\n', r"is empty"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message) as info:
        documents.load_documents(str(path))
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_invalid_utf8_is_replaced_and_counted(tmp_path, caplog):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café \ufffd ".encode("utf-8") + b"na\xefve \xff")
    with caplog.at_level(logging.WARNING):
        docs = documents.load_documents(str(path))
    assert docs == ["café \ufffd na\ufffdve \ufffd"]
    assert "2 invalid UTF-8" in caplog.text  # the U+FFFD already in the file is not counted


def test_files_stream_in_pieces_that_join_to_what_a_whole_read_gives(tmp_path, monkeypatch, caplog):
    """The token cache reads files in blocks and cuts documents into pieces (bounded memory):
    the documents, and the count of invalid UTF-8, must be those of one read of the file."""
    monkeypatch.setattr(documents, "MAX_PIECE_CHARS", 40)
    monkeypatch.setattr(sources, "READ_BLOCK_BYTES", 7)  # cuts characters and U+FFFD's bytes
    raw = ("première ligne\n\n  \t\nsecond   paragraph, with words that go on and on and on past forty\n"
           "\n\n\n" + "y" * 100 + "\n \n" + "λόγος  " * 30 + "\ufffd").encode() + b"na\xefve \xff\xfe end\n\n"
    (tmp_path / "t.txt").write_bytes(raw)
    text = raw.decode("utf-8", errors="replace")
    paragraphs = [block.strip("\n") for block in re.split(r"\n[ \t]*\n", text) if block.strip()]
    for mode, expected in (("file", [text]), ("paragraph", paragraphs)):
        with caplog.at_level(logging.WARNING):
            pieces = list(documents.file_pieces(str(tmp_path / "t.txt"), txt_documents=mode))
        assert list(documents.joined(pieces)) == expected, mode
        assert len(pieces) > 10 and max(len(piece) for piece, _ in pieces) <= 40
        assert caplog.text.count("3 invalid UTF-8") == 1  # the file's own U+FFFD is not counted
        caplog.clear()
    # JSON Lines are read line by line, split at "\n" only: a raw U+2028 is legal inside a string.
    records = ["a\u2028b " * 20, "short", "x"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": r}, ensure_ascii=False) + "\n" for r in records),
                                      encoding="utf-8")
    assert documents.load_documents(str(tmp_path / "d.jsonl")) == records


def test_no_match_names_the_glob(tmp_path):
    with pytest.raises(DataError, match=r"matches no file.*--config.data.source"):
        documents.load_documents(str(tmp_path / "*.jsonl"))


# ------------------------------------------------------- split, tokenize, pack


def _data_config(source, **overrides):
    data = base_config().data
    data.update(dict(source=source, seq_len=8, val_fraction=0.25, **overrides))
    return data


def test_split_documents_holds_out_the_last_ones():
    docs = [f"d{i}" for i in range(10)]
    assert dataset.split_documents(docs, 0.2) == (docs[:8], docs[8:])
    assert dataset.split_documents(docs[:2], 0.01) == (["d0"], ["d1"])  # at least one each
    with pytest.raises(DataError, match="1 documents.*--config.data.val_fraction"):
        dataset.split_documents(["only"], 0.5)


def test_pad_packing_one_document_per_window(tmp_path):
    _write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in ["ab", "a much longer doc", "c", "dd"]])
    tok = tokenizer.ByteTokenizer()
    splits = dataset.split_windows(_data_config(str(tmp_path / "d.jsonl"), packing="pad"), tok)
    tokens, valid = splits["train"]
    assert tokens.shape == (3, 8)
    np.testing.assert_array_equal(tokens[0], [97, 98, tok.eos_id] + [tok.pad_id] * 5)
    np.testing.assert_array_equal(valid[0], [True] * 3 + [False] * 5)
    assert valid[1].all() and tok.decode(tokens[1]) == "a much l"  # truncated to seq_len
    assert ((tokens == tok.pad_id) == ~valid).all()
    assert tok.decode(splits["val"][0][0]) == "dd<|endoftext|>"


def test_wrap_packing_crosses_document_boundaries(tmp_path):
    _write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in ["abc", "defgh", "ij", "k"]])
    tok = tokenizer.ByteTokenizer()
    tokens, valid = dataset.split_windows(_data_config(str(tmp_path / "d.jsonl")), tok)["train"]
    assert tok.decode(tokens.reshape(-1)) == "abc<|endoftext|>defgh<|endoftext|>ij<|endoftext|>"
    assert tokens.shape == (2, 8) and valid.sum() == 4 + 6 + 3


def test_single_document_split_by_tokens_like_before():
    """Shakespeare stays one document split by tokens, as base.py's results assume."""
    data = base_config().data
    tok = tokenizer.ByteTokenizer()
    train, val = dataset.split_windows(data, tok).values()
    stream = np.concatenate([tok.encode(sources.load_text("shakespeare")), [tok.eos_id]])
    num_val = int(round(stream.size * data.val_fraction))
    np.testing.assert_array_equal(train[0].reshape(-1)[: stream.size - num_val], stream[:-num_val])
    np.testing.assert_array_equal(val[0][0], stream[-num_val:][: data.seq_len])


def test_corpus_smaller_than_a_batch_is_refused(tmp_path):
    _write_jsonl(tmp_path / "d.jsonl", [{"text": "tiny"}, {"text": "val"}])
    splits = dataset.split_windows(_data_config(str(tmp_path / "d.jsonl")), tokenizer.ByteTokenizer())
    with pytest.raises(DataError, match=r"1 windows.*fewer than one batch of 8.*batch_size"):
        dataset.check_enough_for_a_batch(splits["train"], 8, 8)
