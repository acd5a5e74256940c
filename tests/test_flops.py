"""The FLOP accounting: a hand count for a tiny config, and XLA's own count of the forward pass."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from tdlm_jax.model import flops
from tdlm_jax.model.transformer import Denoiser, ModelConfig

# d=32, 2 layers, mlp 64, 259 ids (256 bytes + EOS, [MASK], [PAD]), sequences of 32.
TINY = ModelConfig(vocab_size=259, num_predictable=257, d_model=32, num_heads=2, num_layers=2, mlp_dim=64)
SEQ = 32


def test_hand_count_of_the_tiny_config():
    # Per layer: q/k/v 3·32·32 = 3072, output 32·32 = 1024, SwiGLU 3·32·64 = 6144 -> 10240;
    # two layers 20480, plus the head 32·259 = 8288. The embedding (259·32) is not counted.
    assert flops.matmul_params(TINY) == 28_768
    # q·kᵀ and p·v: 2·2·32·32 = 4096 per layer and token, 8192 for both layers.
    assert flops.attention_flops_per_token(TINY, SEQ) == 8_192
    assert flops.forward_flops_per_token(TINY, SEQ) == 2 * 28_768 + 8_192 == 65_728
    # 6·N + 12·layers·seq·d = 172608 + 24576.
    assert flops.train_flops_per_token(TINY, SEQ) == 197_184


def test_the_causal_baseline_counts_half_the_attention():
    causal = dataclasses.replace(TINY, causal=True)
    assert flops.matmul_params(causal) == 28_768  # the weights are the same
    # q·kᵀ and p·v over the pairs at or before each query: 2·32·32 = 2048 per layer, 4096 for both.
    assert flops.attention_flops_per_token(causal, SEQ) == 4_096
    assert flops.forward_flops_per_token(causal, SEQ) == 2 * 28_768 + 4_096 == 61_632
    # 6·N + 6·layers·seq·d = 172608 + 12288.
    assert flops.train_flops_per_token(causal, SEQ) == 184_896


def test_time_conditioning_adds_its_projection_once_per_sequence():
    conditioned = dataclasses.replace(TINY, time_conditioning=True)
    assert flops.forward_flops_per_token(conditioned, SEQ) == 65_728 + 2 * 32 * 32 / SEQ


def test_mfu_is_achieved_over_peak():
    assert flops.mfu(1e6, 2e3, 4e9) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        flops.mfu(1e6, 2e3, 0.0)


@pytest.mark.parametrize("cfg", [TINY, dataclasses.replace(TINY, d_model=64, num_heads=4, mlp_dim=160)],
                         ids=["tiny", "wider"])
def test_forward_count_matches_xla_cost_analysis(cfg):
    """XLA counts 2·m·n·k per dot, as the formula does, plus one FLOP per elementwise op
    (norms, RoPE, softmax, SiLU, the −inf mask of the logits), which the convention leaves
    out: so XLA's count is a little higher, never lower, and the gap shrinks as the matmuls
    grow (about 4.5% for the tiny model, 1.4% for base.py's)."""
    batch = 4
    graphdef, params = nnx.split(Denoiser(cfg, nnx.Rngs(0)))
    forward = jax.jit(lambda p, tokens, valid: nnx.merge(graphdef, p)(tokens, valid))
    tokens, valid = jnp.zeros((batch, SEQ), jnp.int32), jnp.ones((batch, SEQ), bool)
    xla_flops = forward.lower(params, tokens, valid).compile().cost_analysis()["flops"]
    ratio = xla_flops / (batch * SEQ * flops.forward_flops_per_token(cfg, SEQ))
    assert 1.0 <= ratio < 1.08, ratio
