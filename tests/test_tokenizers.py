"""Tests for the tokenizers (byte, gpt2, bpe:<n>, hf:, sentencepiece:), their record in the
workdir, and a tiny end-to-end run on JSONL documents with a per-run BPE and pad packing."""

import json
import pathlib
import runpy

import numpy as np
import pytest

from tdlm_jax.data import dataset, documents, sources, subword, tokenizer
from tdlm_jax.errors import ConfigError, DataError
from tdlm_jax.training import config as config_lib

pytest.importorskip("tokenizers")
REPO = pathlib.Path(__file__).resolve().parents[1]
TEXT = "To be, or not to be: that is the question — ça va?"
CORPUS = [f"{w} the quick brown fox jumps over the lazy dog, said {w}." for w in
          ("Hamlet", "Ophelia", "Polonius", "Laertes", "Horatio", "Gertrude", "Claudius", "Yorick")] * 5


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A workdir holding a bpe:300 tokenizer trained on CORPUS."""
    workdir = tmp_path_factory.mktemp("bpe")
    tokenizer.get_tokenizer("bpe:300", workdir=str(workdir), training_text=lambda: CORPUS)
    return workdir


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("spm")
    (folder / "corpus.txt").write_text("\n".join(CORPUS + [TEXT]), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(folder / "corpus.txt"), model_prefix=str(folder / "m"),
                                   vocab_size=80, hard_vocab_limit=False, minloglevel=2)
    return str(folder / "m.model")


def _all_tokenizers(bpe_dir, sentencepiece_model):
    return [
        tokenizer.get_tokenizer("byte"),
        tokenizer.get_tokenizer("gpt2"),
        tokenizer.get_tokenizer("bpe:300", workdir=str(bpe_dir)),
        tokenizer.get_tokenizer(f"hf:{bpe_dir / 'tokenizer.json'}"),
        tokenizer.get_tokenizer(f"sentencepiece:{sentencepiece_model}"),
    ]


def test_round_trips_and_special_ids(bpe_dir, sentencepiece_model):
    for tok in _all_tokenizers(bpe_dir, sentencepiece_model):
        ids = tok.encode(TEXT)
        assert ids.dtype == np.int32 and ids.ndim == 1 and 0 <= ids.min() and ids.max() < tok.text_vocab_size
        decoded = tok.decode(ids)
        if tok.name.startswith("sentencepiece"):  # characters outside its tiny vocabulary become <unk>
            assert decoded.startswith("To be,")
        else:
            assert decoded == TEXT, tok.name
        # [MASK] and [PAD] are the last ids, outside what the model predicts; EOS is predictable.
        assert (tok.mask_id, tok.pad_id) == (tok.text_vocab_size, tok.text_vocab_size + 1) == (
            tok.vocab_size - 2, tok.vocab_size - 1), tok.name
        assert 0 <= tok.eos_id < tok.text_vocab_size
        shown = tok.decode(list(tok.encode("To")) + [tok.mask_id, tok.eos_id, tok.pad_id, tok.pad_id])
        mask = "_" if tok.name == "byte" else "[MASK]"
        assert shown.endswith(f"{mask}<|endoftext|>") and "[PAD]" not in shown, tok.name
        with pytest.raises(ValueError, match="must lie in"):
            tok.decode([tok.vocab_size])
        # Batched encoding (what the token cache uses) gives exactly the per-text ids.
        batch = tok.encode_batch([TEXT, "", "Hello world"])
        assert [ids.tolist() for ids in batch] == [tok.encode(t).tolist() for t in (TEXT, "", "Hello world")], tok.name
        assert all(ids.dtype == np.int32 for ids in batch)


def test_a_long_document_in_pieces_tokenizes_to_the_document_s_ids(bpe_dir, sentencepiece_model, monkeypatch):
    """The token cache encodes long documents piece by piece (tdlm_jax.data.documents): its cut,
    before a space that follows a word, must be where every tokenizer starts a token anyway."""
    monkeypatch.setattr(documents, "MAX_PIECE_CHARS", 300)
    text = sources.shakespeare_text()[:30_000] + "  two spaces,\ttabs \t and  ça va?  " * 20
    pieces = [piece for piece, _ in documents.document_pieces(text)]
    assert len(pieces) > 100 and "".join(pieces) == text
    for tok in _all_tokenizers(bpe_dir, sentencepiece_model):
        in_pieces = np.concatenate([tok.encode(piece) for piece in pieces])
        np.testing.assert_array_equal(in_pieces, tok.encode(text), err_msg=tok.name)


def test_gpt2_is_the_real_gpt2():
    tok = tokenizer.get_tokenizer("gpt2")
    assert tok.encode("Hello world").tolist() == [15496, 995]
    assert (tok.eos_id, tok.text_vocab_size, tok.mask_id, tok.pad_id, tok.vocab_size) == (
        50256, 50257, 50257, 50258, 50259)
    assert tok.decode([15496, 995, 50256]) == "Hello world<|endoftext|>"


def test_bpe_reloaded_from_the_workdir_gives_identical_ids(bpe_dir, tmp_path):
    calls = []
    fresh = tokenizer.get_tokenizer("bpe:300", workdir=str(tmp_path), training_text=lambda: calls.append(1) or CORPUS)
    reloaded = tokenizer.get_tokenizer("bpe:300", workdir=str(tmp_path),
                                       training_text=lambda: calls.append(1) or CORPUS)
    assert calls == [1]  # trained once, then reused
    assert (tmp_path / "tokenizer.json").is_file()
    sample = " ".join(CORPUS[:3]) + TEXT
    np.testing.assert_array_equal(fresh.encode(sample), reloaded.encode(sample))
    assert fresh.vocab_size == reloaded.vocab_size <= 302
    assert len(fresh.encode(CORPUS[0])) < len(CORPUS[0].encode()) / 2  # it learned merges
    # eos is the trained tokenizer's own <|endoftext|>.
    assert fresh.eos_id == 0


def test_bpe_needs_a_workdir_or_a_trained_file(tmp_path):
    with pytest.raises(DataError, match="needs its workdir"):
        tokenizer.get_tokenizer("bpe:300")
    with pytest.raises(DataError, match=r"tokenizer.json does not exist"):
        tokenizer.get_tokenizer("bpe:300", workdir=str(tmp_path))


def test_hf_tokenizer_errors(tmp_path):
    from tokenizers import Tokenizer, models

    bad = Tokenizer(models.WordLevel({"a": 0, "b": 5, "[UNK]": 1}, unk_token="[UNK]"))
    bad.save(str(tmp_path / "gappy.json"))
    with pytest.raises(DataError, match="declares 3 ids but uses id 5"):
        tokenizer.get_tokenizer(f"hf:{tmp_path / 'gappy.json'}")
    with pytest.raises(DataError, match="does not exist.*hf:<path"):
        tokenizer.get_tokenizer(f"hf:{tmp_path / 'missing.json'}")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(DataError, match="junk.json.*not a valid tokenizer.json"):
        tokenizer.get_tokenizer(f"hf:{tmp_path / 'junk.json'}")


def test_hf_tokenizer_without_eos_gets_one_appended(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    plain = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    plain.pre_tokenizer = pre_tokenizers.Whitespace()
    plain.save(str(tmp_path / "words.json"))
    tok = tokenizer.get_tokenizer(f"hf:{tmp_path / 'words.json'}")
    assert (tok.eos_id, tok.text_vocab_size, tok.mask_id, tok.pad_id, tok.vocab_size) == (3, 4, 4, 5, 6)
    assert tok.encode("hello world").tolist() == [1, 2]


def test_sentencepiece_uses_its_own_eos(sentencepiece_model, tmp_path):
    tok = tokenizer.get_tokenizer(f"sentencepiece:{sentencepiece_model}")
    assert tok.eos_id == 2 and tok.mask_id == tok.text_vocab_size
    with pytest.raises(DataError, match="does not exist"):
        tokenizer.get_tokenizer(f"sentencepiece:{tmp_path / 'none.model'}")


def test_tokenizer_info_is_recorded_and_checked(tmp_path):
    data = runpy.run_path(str(REPO / "configs" / "base.py"))["get_config"]().data
    tok = dataset.build_tokenizer(data, str(tmp_path))
    info = json.loads((tmp_path / dataset.TOKENIZER_INFO).read_text())
    assert info == {"name": "byte", "vocab_size": 259, "text_vocab_size": 257, "mask_id": 257, "pad_id": 258,
                    "eos_id": 256}
    assert dataset.load_tokenizer(str(tmp_path), "byte") == tok
    with pytest.raises(DataError, match="tokenizer_info.json recorded.*new --workdir"):
        dataset.load_tokenizer(str(tmp_path), "gpt2")


@pytest.mark.parametrize("key, value, message", [
    ("data.tokenizer", "bpe:10", "bpe needs an integer vocab size"),
    ("data.tokenizer", "words", "must be one of byte, gpt2"),
    ("data.packing", "stack", "must be one of wrap, pad"),
    ("data.txt_documents", "line", "must be one of file, paragraph"),
    ("data.text_field", "", "data.text_field"),
])
def test_config_validation_of_data_keys(key, value, message):
    config = runpy.run_path(str(REPO / "configs" / "tiny.py"))["get_config"]()
    config.update_from_flattened_dict({key: value})
    with pytest.raises(ConfigError, match=message) as info:
        config_lib.validate(config, num_devices=1)
    assert key in str(info.value) and "\n" not in str(info.value)


def test_tiny_run_on_jsonl_with_bpe_and_pad_packing(tmp_path):
    from tdlm_jax.training import loop
    from tdlm_jax.inference.trained import load_trained

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for part in range(2):
        lines = [json.dumps({"text": doc}) for doc in CORPUS[part::2]]
        (corpus / f"part{part}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = runpy.run_path(str(REPO / "configs" / "tiny.py"))["get_config"]()
    config.update_from_flattened_dict({
        "data.source": str(corpus / "*.jsonl"), "data.tokenizer": "bpe:300", "data.packing": "pad",
        "training.num_steps": 2, "training.logging_steps": 1, "training.eval_every_n_steps": 2,
        "training.checkpoint_every_n_steps": 2, "training.detailed_metrics_steps": 100,
        "training.attention_analysis_steps": 100, "sampling.num_samples_at_eval": 0})
    workdir = tmp_path / "run"
    summary = loop.train(config, str(workdir))
    assert summary["summary/total_steps"] == 2
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    ratios = [r["metrics/valid_ratio"] for r in rows if r.get("metrics/valid_ratio") is not None]
    assert ratios and max(ratios) < 1.0  # pad packing: padding draws masks that are not scored

    trained = load_trained(str(workdir))
    run_tok = tokenizer.get_tokenizer("bpe:300", workdir=str(workdir))
    assert trained.tokenizer.vocab_size == run_tok.vocab_size == trained.model().cfg.vocab_size
    ids = run_tok.encode(CORPUS[0])
    np.testing.assert_array_equal(trained.tokenizer.encode(CORPUS[0]), ids)
    assert trained.tokenizer.decode(ids) == CORPUS[0]
    info = json.loads((workdir / dataset.TOKENIZER_INFO).read_text())
    assert info["name"] == "bpe:300" and info["mask_id"] == run_tok.mask_id
    assert (workdir / subword.WORKDIR_TOKENIZER).is_file()
