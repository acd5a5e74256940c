"""The key of a token-cache entry: everything that determines the cached tokens (see
`tdlm_jax.data.cache`), and where the entry of that key lives."""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

import ml_collections

from tdlm_jax.data import hf_source, sources
from tdlm_jax.data.tokenizer import Tokenizer, identity

FORMAT_VERSION = 1  # bump when the stored layout, or the text a source yields, changes
ENV_DIR = "TDLM_CACHE_DIR"


def cache_root(data: ml_collections.ConfigDict) -> str:
    """The cache directory `data.cache_dir` names (see the module docstring for the default)."""
    root = data.get("cache_dir", "") or os.environ.get(ENV_DIR, "")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME", "") or "~/.cache", "tdlm_jax", "tokens")
    return os.path.abspath(os.path.expanduser(root))


def cache_identity(data: ml_collections.ConfigDict, tok: Tokenizer) -> dict[str, Any]:
    """Everything that determines the cached tokens, as JSON-ready values."""
    is_hf = hf_source.is_hf_source(data.source)
    return {
        "format": FORMAT_VERSION,
        "source": _source_identity(data.source),
        "tokenizer": {**identity(tok),
                      "files": [_sha256(path) for path in getattr(tok, "files", ())]},
        "text_field": data.get("text_field", "text"),
        "txt_documents": data.get("txt_documents", "file"),
        "val_fraction": float(data.val_fraction),
        "hf_max_documents": int(data.get("hf_max_documents", 0)) if is_hf else 0,
    }


def entry_directory(root: str, source: str, tokenizer_name: str, key_fields: dict[str, Any]) -> str:
    """<root>/<source hint>.<tokenizer hint>.<hash of the key fields>."""
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:20]
    return os.path.join(root, f"{_slug(source)}.{_slug(tokenizer_name)}.{key}")


def _source_identity(source: str) -> dict[str, Any]:
    if source == sources.SHAKESPEARE:
        return {"kind": "shakespeare", "files": [_stat(p) for p in sources.shakespeare_files()]}
    if hf_source.is_hf_source(source):
        spec = hf_source.parse_source(source)
        identity: dict[str, Any] = {"kind": "hf", "name": spec.name, "config": spec.config, "revision": spec.revision}
        if spec.is_local:  # a local dataset can change: list its files like a glob's
            root = os.path.abspath(os.path.expanduser(spec.name))
            identity["files"] = [_stat(os.path.join(d, n), relative_to=root) for d, _, names in sorted(os.walk(root))
                                 for n in sorted(names)]
        return identity
    return {"kind": "files", "files": [_stat(os.path.abspath(p)) for p in sources.resolve_paths(source)]}


def _stat(path: str, relative_to: str | None = None) -> list[Any]:
    st = os.stat(path)
    return [os.path.relpath(path, relative_to) if relative_to else path, st.st_size, st.st_mtime_ns]


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _slug(text: str) -> str:
    """A short, readable, filesystem-safe hint of a source or tokenizer name."""
    tail = os.path.basename(text.rstrip("/")) or text
    return re.sub(r"[^A-Za-z0-9_-]+", "_", tail).strip("_")[:32] or "data"
