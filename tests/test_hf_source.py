"""Tests for `data.source=hf:...`: a Hugging Face dataset, streamed through the real
`datasets.load_dataset(..., streaming=True)`, offline, from datasets written here."""

import builtins
import pathlib
import runpy

import numpy as np
import pytest

from tdlm_jax.data import cache, dataset, hf_source, tokenizer
from tdlm_jax.errors import ConfigError, DataError
from tdlm_jax.training import config as config_lib

datasets = pytest.importorskip("datasets")  # offline: tests/conftest.py sets HF_DATASETS_OFFLINE
REPO = pathlib.Path(__file__).resolve().parents[1]
BYTE = tokenizer.ByteTokenizer()


def _repo(root, splits):
    """A local dataset repo: data/<split>-00000-of-00001.parquet, as the Hub lays them out."""
    (root / "data").mkdir(parents=True)
    for split, texts in splits.items():
        table = datasets.Dataset.from_dict({"text": texts, "id": list(range(len(texts)))})
        table.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def _data(source, tmp_path, **overrides):
    data = runpy.run_path(str(REPO / "configs" / "base.py"))["get_config"]().data
    data.update({"source": source, "seq_len": 8, "cache_dir": str(tmp_path / "cache"), **overrides})
    return data


def _docs(stream):
    """The documents of a cached stream, decoded."""
    tokens, offsets = np.asarray(stream.tokens), np.asarray(stream.offsets)
    return [BYTE.decode(tokens[a:b - 1]) for a, b in zip(offsets[:-1], offsets[1:])]


def test_held_out_rule_is_exact_and_evenly_spaced():
    assert [i for i in range(100) if hf_source.is_held_out(i, 0.05)] == [19, 39, 59, 79, 99]
    assert sum(hf_source.is_held_out(i, 0.29) for i in range(100)) == 29  # exact decimals, not binary floats
    assert [i for i in range(6000) if hf_source.is_held_out(i, 0.0005)] == [1999, 3999, 5999]


def test_parse_source():
    assert hf_source.parse_source("hf:HuggingFaceFW/fineweb-edu:sample-10BT") == hf_source.HfSource(
        "HuggingFaceFW/fineweb-edu", "sample-10BT")
    assert hf_source.parse_source("hf:Skylion007/openwebtext@refs/convert/parquet") == hf_source.HfSource(
        "Skylion007/openwebtext", None, "refs/convert/parquet")
    with pytest.raises(ValueError, match="hf:<dataset name"):
        hf_source.parse_source("hf::config")


def test_a_validation_split_is_used_when_there_is_one(tmp_path):
    train, val = [f"train document {i}" for i in range(12)], ["validation one", "", "validation two"]
    repo = _repo(tmp_path / "repo", {"train": train, "validation": val})
    token_cache = cache.open_or_build(_data(f"hf:{repo}", tmp_path), BYTE)
    assert _docs(token_cache.train) == train and _docs(token_cache.val) == ["validation one", "validation two"]
    assert token_cache.meta["split_by"] == "stream" and token_cache.built
    assert not cache.open_or_build(_data(f"hf:{repo}", tmp_path), BYTE).built  # the stream is read once


def test_without_a_validation_split_every_kth_row_is_held_out(tmp_path):
    train = [f"row {i}" for i in range(20)]
    repo = _repo(tmp_path / "repo", {"train": train})
    data = _data(f"hf:{repo}", tmp_path, val_fraction=0.25)
    token_cache = cache.open_or_build(data, BYTE)
    assert _docs(token_cache.val) == ["row 3", "row 7", "row 11", "row 15", "row 19"]
    assert _docs(token_cache.train) == [t for i, t in enumerate(train) if i % 4 != 3]
    assert list(dataset.training_texts(data)) == _docs(token_cache.train)  # what bpe:<n> trains on
    capped = cache.open_or_build(_data(f"hf:{repo}", tmp_path, val_fraction=0.25, hf_max_documents=9), BYTE)
    assert _docs(capped.val) == ["row 3", "row 7"] and len(_docs(capped.train)) == 7
    with pytest.raises(DataError, match=r"gave no validation documents.*--config.data.hf_max_documents"):
        cache.open_or_build(_data(f"hf:{repo}", tmp_path, val_fraction=0.25, hf_max_documents=3), BYTE)


def test_training_windows_from_a_stream(tmp_path):
    repo = _repo(tmp_path / "repo", {"train": ["abcdefghijk"] * 8, "validation": ["xyz"]})
    splits = dataset.split_windows(_data(f"hf:{repo}", tmp_path, packing="pad"), BYTE)
    assert splits["train"][0].shape == (8, 8) and splits["train"][1].all()  # truncated to seq_len
    assert BYTE.decode(splits["val"][0][0]) == "xyz<|endoftext|>"


@pytest.mark.parametrize("kind", ["missing_dir", "unknown_hub_name", "no_field"])
def test_errors_are_one_line_and_name_the_source(tmp_path, kind):
    if kind == "missing_dir":
        source, message = f"hf:{tmp_path / 'nothing'}", r"cannot open the Hugging Face dataset"
    elif kind == "unknown_hub_name":
        source, message = "hf:no-such-user/no-such-dataset", r"cannot open.*check the name, config and revision"
    else:
        source = f"hf:{_repo(tmp_path / 'repo', {'train': ['a', 'b']})}"
        message = r"row 0 has no field 'body' \(fields: text, id\).*--config.data.text_field"
    with pytest.raises(DataError, match=message) as info:
        cache.open_or_build(_data(source, tmp_path, text_field="body"), BYTE)
    assert f"data.source={source!r}" in str(info.value) and "\n" not in str(info.value)


def test_missing_datasets_package_names_the_pip_command(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(DataError, match=r"needs the 'datasets' package: pip install 'tdlm_jax\[hf\]'"):
        cache.open_or_build(_data("hf:some/dataset", tmp_path), BYTE)


def test_config_validation_of_the_new_data_keys():
    base = runpy.run_path(str(REPO / "configs" / "tiny.py"))["get_config"]
    for key, value, message in [("data.source", "hf::x", "must have the form hf:"),
                                ("data.worker_count", -1, "integer >= 0"),
                                ("data.hf_max_documents", -3, "integer >= 0"),
                                ("data.prefetch_buffer_size", 0, "positive integer"),
                                ("data.cache_dir", None, "directory path")]:
        config = base()
        config.update_from_flattened_dict({key: value})
        with pytest.raises(ConfigError, match=message) as info:
            config_lib.validate(config, num_devices=1)
        assert key in str(info.value)
