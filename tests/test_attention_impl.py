"""The attention kernels: the XLA path's arithmetic, and when `model.attention_impl` picks cuDNN."""

import pathlib
import runpy
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tdlm_jax.training import config as config_lib
from tdlm_jax.data import pipeline
from tdlm_jax.errors import ConfigError
from tdlm_jax.model import autoregressive, transformer
from tdlm_jax.model.transformer import (Denoiser, ModelConfig, attention_mask, cudnn_attention_args,
                                        explicit_attention, resolve_attention_impl)

REPO = pathlib.Path(__file__).resolve().parents[1]
B, L, N, H = 2, 8, 2, 16


def qkv(dtype, batch=B):
    keys = jax.random.split(jax.random.key(0), 3)
    return [jax.random.normal(k, (batch, L, N, H), jnp.float32).astype(dtype) for k in keys]


def valid_with_padding():
    return jnp.ones((B, L), bool).at[1, 5:].set(False)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("dtype, atol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)], ids=["f32", "bf16"])
def test_explicit_attention_is_the_xla_kernel(dtype, atol, causal):
    q, k, v = qkv(dtype)
    mask = attention_mask(valid_with_padding(), causal)
    out, probs = explicit_attention(q, k, v, mask)
    fused = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    assert out.dtype == fused.dtype == dtype and probs.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(fused, np.float32), atol=atol)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
    assert np.all(np.asarray(probs)[1, :, :, 5:] == 0)  # padding keys get no weight


def test_explicit_attention_has_the_xla_kernels_gradient():
    q, k, v = qkv(jnp.float32)
    mask = attention_mask(valid_with_padding(), False)
    loss = lambda f: lambda q, k, v: (f(q, k, v) ** 2).sum()
    ours = jax.grad(loss(lambda q, k, v: explicit_attention(q, k, v, mask)[0]), argnums=(0, 1, 2))(q, k, v)
    fused = jax.grad(loss(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask)), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, fused):
        np.testing.assert_allclose(a, b, atol=1e-5)


def fake_gpu(platform_version="cuda 12.8", capability="9.0"):
    return types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3", compute_capability=capability,
                                 client=types.SimpleNamespace(platform_version=platform_version))


def test_auto_takes_cudnn_only_where_it_applies():
    gpu = fake_gpu()
    assert resolve_attention_impl("auto", "bfloat16", 64, 1024, gpu) == "cudnn"
    assert resolve_attention_impl("auto", "float32", 64, 1024, gpu) == "xla"  # cuDNN flash needs bf16/fp16
    assert resolve_attention_impl("auto", "bfloat16", 60, 1024, gpu) == "xla"  # head dim not a multiple of 8
    assert resolve_attention_impl("auto", "bfloat16", 192, 1024, gpu) == "cudnn"  # Hopper: up to 256
    assert resolve_attention_impl("auto", "bfloat16", 192, 1024, fake_gpu(capability="8.0")) == "xla"  # A100: 128
    assert resolve_attention_impl("auto", "bfloat16", 64, 1023, gpu) == "cudnn"  # odd length: no bias, no limit
    assert resolve_attention_impl("auto", "bfloat16", 64, 1024, fake_gpu("rocm 6.0")) == "xla"  # not NVIDIA
    assert resolve_attention_impl("xla", "bfloat16", 64, 1024, gpu) == "xla"
    assert resolve_attention_impl("auto", "bfloat16", 64, 1024, jax.devices()[0]) == "xla"  # this CPU


def test_cudnn_where_it_does_not_apply_is_a_config_error():
    with pytest.raises(ConfigError, match="attention_impl='cudnn' needs an NVIDIA GPU"):
        resolve_attention_impl("cudnn", "bfloat16", 64, 1024, jax.devices()[0])
    with pytest.raises(ConfigError, match="needs model.dtype='bfloat16'"):
        resolve_attention_impl("cudnn", "float32", 64, 1024, fake_gpu())
    with pytest.raises(ConfigError, match="must be one of auto, xla, cudnn"):
        resolve_attention_impl("flash", "bfloat16", 64, 1024, fake_gpu())
    cfg = ModelConfig(vocab_size=10, num_predictable=8, d_model=16, num_heads=2, num_layers=1, mlp_dim=32,
                      attention_impl="cudnn")
    model = Denoiser(cfg, nnx.Rngs(0))
    with pytest.raises(ConfigError, match="needs an NVIDIA GPU"):
        model(jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool))


def test_the_config_key_is_validated_and_passed_to_the_model():
    config = runpy.run_path(str(REPO / "configs" / "tiny.py"))["get_config"]()
    assert config.model.attention_impl == "auto"
    config.model.attention_impl = "xla"
    assert config_lib.model_config(config, vocab_size=259, num_predictable=257).attention_impl == "xla"
    config.model.attention_impl = "flash"
    with pytest.raises(ConfigError, match="model.attention_impl"):
        config_lib.validate(config, num_devices=1)


def valid_rows():
    """A full row, a row padded after 5 tokens, and a row that is all padding."""
    return jnp.arange(L)[None, :] < jnp.array([L, 5, 0])[:, None]


def test_cudnn_arguments_are_sequence_lengths_at_least_one():
    args = cudnn_attention_args(valid_rows(), causal=True)
    assert set(args) == {"query_seq_lengths", "key_value_seq_lengths", "is_causal"}  # no bias, no mask
    for name in ("query_seq_lengths", "key_value_seq_lengths"):
        assert args[name].dtype == jnp.int32 and args[name].shape == (3,)
        np.testing.assert_array_equal(args[name], [L, 5, 1])  # the padding-only row keeps one
    assert args["is_causal"] is True and cudnn_attention_args(valid_rows(), causal=False)["is_causal"] is False


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("dtype, atol, grad_atol", [(jnp.float32, 1e-6, 1e-5), (jnp.bfloat16, 2e-2, 2e-2)],
                         ids=["f32", "bf16"])
def test_cudnn_arguments_attend_as_the_mask(dtype, atol, grad_atol, causal):
    """What the cuDNN branch passes, run by the XLA implementation of the same function (the
    one that runs on CPU, with the same seq-length and causal semantics): at valid queries
    the output and the gradient are the explicit path's; padding queries are finite."""
    valid = valid_rows()
    q, k, v = qkv(dtype, batch=3)
    mask = attention_mask(valid, causal)
    args = cudnn_attention_args(valid, causal)
    fused = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, **args, implementation="xla")
    explicit = lambda q, k, v: explicit_attention(q, k, v, mask)[0]
    out, ref = fused(q, k, v), explicit(q, k, v)
    assert out.dtype == ref.dtype == dtype and np.isfinite(np.asarray(out, np.float32)).all()
    at_valid = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(out, np.float32)[at_valid], np.asarray(ref, np.float32)[at_valid], atol=atol)
    loss = lambda f: lambda q, k, v: (jnp.where(valid[:, :, None, None], f(q, k, v), 0).astype(jnp.float32) ** 2).sum()
    grads = jax.grad(loss(fused), argnums=(0, 1, 2))(q, k, v)
    ref_grads = jax.grad(loss(explicit), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(grads, ref_grads):
        assert np.isfinite(np.asarray(a, np.float32)).all()
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=grad_atol)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_the_cudnn_branch_run_by_xla_gives_the_xla_paths_logits_and_gradients(monkeypatch, causal):
    """The model's cuDNN branch on CPU: `resolve_attention_impl` says 'cudnn' and
    `jax.nn.dot_product_attention` runs what it is given with implementation='xla'."""
    cfg = ModelConfig(vocab_size=10, num_predictable=8, d_model=16, num_heads=2, num_layers=2, mlp_dim=32,
                      causal=causal, attention_impl="xla")
    graphdef, params = nnx.split(Denoiser(cfg, nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(1), (3, L), 0, 8)
    valid = valid_rows()

    def logits_and_grads():
        logits = lambda p: nnx.merge(graphdef, p)(tokens, valid)[..., :cfg.num_predictable]
        loss = lambda p: jnp.where(valid[:, :, None], logits(p), 0.0).var()
        return logits(params), jax.grad(loss)(params)

    ref_logits, ref_grads = logits_and_grads()
    calls = []
    original = jax.nn.dot_product_attention

    def as_xla(q, k, v, **kwargs):
        calls.append(kwargs)
        assert kwargs.pop("implementation") == "cudnn"
        return original(q, k, v, **kwargs, implementation="xla")

    monkeypatch.setattr(transformer, "resolve_attention_impl", lambda *args, **kwargs: "cudnn")
    monkeypatch.setattr(jax.nn, "dot_product_attention", as_xla)
    logits, grads = logits_and_grads()
    assert calls and all("mask" not in c and "bias" not in c and c["is_causal"] is causal for c in calls)
    assert np.isfinite(np.asarray(logits)).all()  # the all-padding row too
    at_valid = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(logits)[at_valid], np.asarray(ref_logits)[at_valid], atol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def is_prefix(valid_NxL) -> bool:
    valid_NxL = np.asarray(valid_NxL)
    return bool((valid_NxL == (np.arange(valid_NxL.shape[1]) < valid_NxL.sum(-1, keepdims=True))).all())


def test_the_models_valid_masks_are_prefixes():
    """`cudnn_attention_args` reads a valid mask as its count of valid tokens: every mask the
    data gives the model must be a prefix of its row (also after the AR baseline's shift)."""
    docs = [np.arange(n, dtype=np.int32) for n in (3, 12, 7)]
    masks = [pipeline.pack(docs, 8, -1, packing)[1] for packing in pipeline.PACKINGS]
    tokens, valid = pipeline.pack(docs, 8, -1, "pad")
    masks += [b["valid"] for b in pipeline.eval_batches_from_windows(tokens, valid, batch_size=2, num_batches=None,
                                                                      pad_id=-1)]  # the last one is filled up
    masks += [autoregressive.shift_right(jnp.asarray(m), True) for m in list(masks)]
    assert all(is_prefix(m) for m in masks)
    assert not is_prefix(np.array([[True, False, True]]))
