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
from tdlm_jax.errors import ConfigError
from tdlm_jax.model.transformer import (Denoiser, ModelConfig, attention_mask, explicit_attention,
                                        resolve_attention_impl)

REPO = pathlib.Path(__file__).resolve().parents[1]
B, L, N, H = 2, 8, 2, 16


def qkv(dtype):
    keys = jax.random.split(jax.random.key(0), 3)
    return [jax.random.normal(k, (B, L, N, H), jnp.float32).astype(dtype) for k in keys]


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
    assert resolve_attention_impl("auto", "bfloat16", 64, 1023, gpu) == "xla"  # odd length
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
