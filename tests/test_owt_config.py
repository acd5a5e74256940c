"""Tests for configs/owt_gpt2_small.py: it validates, its GPT-2-small-sized model initializes
(abstractly) with the parameter count computed by hand, and it trains 2 steps at a tiny size."""

import json
import math
import pathlib
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tdlm_jax.data import tokenizer
from tdlm_jax.inference.trained import load_trained
from tdlm_jax.model.transformer import Denoiser
from tdlm_jax.training import config as config_lib

pytest.importorskip("tokenizers")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
REPO = pathlib.Path(__file__).resolve().parents[1]
owt_config = runpy.run_path(str(REPO / "configs" / "owt_gpt2_small.py"))["get_config"]


def test_owt_config_validates_with_the_intended_values():
    config = owt_config()
    config_lib.validate(config, num_devices=8)
    assert (config.model.num_layers, config.model.d_model, config.model.num_heads, config.model.mlp_dim) == (
        12, 768, 12, 2048)
    assert (config.data.seq_len, config.data.tokenizer, config.model.dtype) == (1024, "gpt2", "bfloat16")
    assert (config.training.batch_size, config.training.learning_rate, config.training.warmup_steps,
            config.training.decay_schedule, config.training.adam_b2, config.training.weight_decay) == (
        512, 3e-4, 2500, "constant", 0.999, 0.0)
    assert config.data.source.startswith("hf:") and config.diffusion.schedule == "loglinear"
    base = runpy.run_path(str(REPO / "configs" / "base.py"))["get_config"]()
    assert _keys(config.to_dict()) == _keys(base.to_dict())  # it overrides base.py's keys, adds none


def _keys(tree, prefix=""):
    return {k for key, value in tree.items()
            for k in (_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"})}


def test_owt_model_has_the_hand_computed_parameter_count():
    config = owt_config()
    tok = tokenizer.get_tokenizer("gpt2")
    cfg = config_lib.model_config(config, vocab_size=tok.vocab_size, num_predictable=tok.text_vocab_size)
    assert cfg.vocab_size == 50304 and cfg.num_predictable == 50257 and cfg.dtype == "bfloat16"
    abstract = nnx.eval_shape(lambda: Denoiser(cfg, nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert all(leaf.dtype == np.float32 for leaf in leaves)  # bf16 compute, f32 parameters
    d, v, m, layers = 768, 50304, 2048, 12
    per_layer = 4 * d * d + 3 * d * m + 2 * d  # qkv + out, SwiGLU gate/up/down, two RMSNorm scales
    expected = 2 * v * d + layers * per_layer + d  # embedding, output head (untied), final norm
    assert expected == 162_220_800
    assert sum(int(np.prod(leaf.shape)) for leaf in leaves) == expected


def test_owt_config_trains_two_steps_at_a_tiny_size(tmp_path):
    from tdlm_jax.training import loop

    data_dir = tmp_path / "owt" / "data"
    data_dir.mkdir(parents=True)
    texts = [f"Document {i}: the quick brown fox jumps over the lazy dog {i} times." for i in range(40)]
    pq.write_table(pa.table({"text": texts}), data_dir / "train-00000-of-00001.parquet")
    config = owt_config()
    config.update_from_flattened_dict({
        "data.source": f"hf:{tmp_path / 'owt'}",  # the config's own kind of source, read offline
        "data.val_fraction": 0.25, "data.seq_len": 32, "data.eval_batch_size": 4, "data.num_eval_batches": 1,
        "data.cache_dir": str(tmp_path / "cache"), "data.worker_count": 0,
        "model.d_model": 32, "model.num_heads": 2, "model.num_layers": 2, "model.mlp_dim": 64,
        "training.batch_size": 4, "training.num_steps": 2, "training.warmup_steps": 1,
        "training.logging_steps": 1, "training.eval_every_n_steps": 2, "training.checkpoint_every_n_steps": 2,
        "training.detailed_metrics_steps": 100, "training.attention_analysis_steps": 100,
        "sampling.num_samples_at_eval": 0})
    summary = loop.train(config, str(tmp_path / "run"))
    assert summary["summary/total_steps"] == 2
    assert np.isfinite(summary["summary/final_loss"]) and np.isfinite(summary["summary/best_val_loss"])
    # The barely trained model predicts over exactly the 50257 GPT-2 ids, and broadly: its
    # predictive entropy at a masked position is at most log(50257) = 10.82 (the support's size),
    # and measured 10.33 (a byte vocabulary's could not pass 5.55).
    trained = load_trained(str(tmp_path / "run"))
    noisy = jnp.full((2, 32), trained.tokenizer.mask_id)
    logits = trained.model()(noisy, jnp.ones_like(noisy, bool))
    assert int(jnp.isfinite(logits[0, 0]).sum()) == 50257  # [MASK], [PAD] and the padded rows: −inf
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    entropy = -jnp.where(jnp.isfinite(log_probs), jnp.exp(log_probs) * log_probs, 0.0).sum(-1).mean()
    assert math.log(50257) - 1.0 < float(entropy) <= math.log(50257) + 1e-4
    info = json.loads((tmp_path / "run" / "tokenizer_info.json").read_text())
    assert info["name"] == "gpt2" and info["vocab_size"] == 50259
