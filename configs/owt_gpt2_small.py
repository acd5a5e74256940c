"""A GPT-2-small-sized masked diffusion LM on OpenWebText with the GPT-2 tokenizer, after MDLM
(Sahoo et al. 2024, "Simple and Effective Masked Diffusion Language Models", OWT setup),
meant for GPU/TPU:

    python -m tdlm_jax.main --config=configs/owt_gpt2_small.py --workdir=runs/owt_gpt2_small

Needs `pip install -e ".[hf,tokenizers]"` and the network on the first run, which streams
OpenWebText (about 8M documents, 9B GPT-2 tokens) once into the token cache (`data.cache_dir`,
about 18 GB as uint16); later runs and resumes read the cache, offline. If the Hub copy cannot
be opened (datasets >= 4 no longer runs loading scripts, which `Skylion007/openwebtext` once
shipped), point `--config.data.source` at a parquet mirror, `hf:<name>@refs/convert/parquet`,
or local files (`--config.data.source='/data/owt/*.parquet'`).

Differences from MDLM, by design of this codebase: a LLaDA-style RoPE / RMSNorm / SwiGLU
transformer instead of MDLM's DiT (SwiGLU width 2048 ≈ 8/3·768 matches the parameters of a
4×768 GELU MLP), no dropout, no time conditioning (MDLM found it unnecessary for absorbing
diffusion), and untied input / output embeddings.
"""

import pathlib
import runpy

# Loaded by path, so this file works wherever it is run from (config files are not a package).
_base = runpy.run_path(str(pathlib.Path(__file__).with_name("base.py")))


def get_config():
    config = _base["get_config"]()

    # OpenWebText has only a train split: one document in 2000 (val_fraction 0.0005, as nanoGPT)
    # is held out by the streaming rule of tdlm_jax.data.hf_source, ~4000 documents / 4.4M tokens.
    config.data.source = "hf:Skylion007/openwebtext"
    config.data.tokenizer = "gpt2"  # 50257 ids, <|endoftext|> = EOS; [MASK] 50257, [PAD] 50258
    config.data.packing = "wrap"  # MDLM's OWT setup: documents concatenated, cut into 1024-token windows
    config.data.seq_len = 1024
    config.data.val_fraction = 0.0005
    config.data.eval_batch_size = 64
    config.data.num_eval_batches = 16  # 1024 fixed validation sequences per evaluation
    # Two reader processes keep batches ready while the host dispatches steps (measured on a
    # 2-core CPU: 39M tokens/s in-process, 65M with 2 workers, for 512 × 1024 batches).
    config.data.worker_count = 2
    config.data.prefetch_buffer_size = 2

    config.model.d_model = 768
    config.model.num_heads = 12
    config.model.num_layers = 12
    config.model.mlp_dim = 2048  # SwiGLU ≈ 8/3·768
    config.model.dtype = "bfloat16"  # compute dtype; parameters and optimizer state stay float32
    config.model.vocab_size = 50304  # 50259 GPT-2 ids + [MASK] + [PAD], padded to a multiple of 128
    config.model.time_conditioning = False

    config.diffusion.schedule = "loglinear"  # MDLM: σ(t) = −log(1 − (1 − ε)t), so α(t) = 1 − (1 − ε)t
    config.diffusion.t_min = 1e-3  # MDLM's sampling_eps
    config.diffusion.time_sampling = "stratified"  # MDLM's antithetic (low-discrepancy) time sampling
    config.diffusion.loss_weighting = "elbo"

    # MDLM: AdamW lr 3e-4, betas (0.9, 0.999), eps 1e-8, weight decay 0, 2500 linear warmup steps
    # then constant, global batch 512, grad-norm clip 1.0, EMA 0.9999, 1M steps (on 8 GPUs).
    config.training.num_steps = 1_000_000
    config.training.batch_size = 512  # global; 64 per device on 8 devices
    config.training.learning_rate = 3e-4
    config.training.warmup_steps = 2500
    config.training.decay_schedule = "constant"
    config.training.min_learning_rate_ratio = 1.0
    config.training.weight_decay = 0.0
    config.training.adam_b1 = 0.9
    config.training.adam_b2 = 0.999
    config.training.grad_clip_norm = 1.0
    config.training.ema_decay = 0.9999
    # On fewer than 8 accelerators, keep the global batch and split it: e.g.
    # --config.training.grad_accum_steps=8 on one 80 GB GPU, or --config.model.remat=true.
    config.training.grad_accum_steps = 1
    # The metrics guide's frequencies. An evaluation (1024 sequences, forward only) and its two
    # samples cost about one train step, so evaluating every 100 steps adds about 1 %.
    config.training.logging_steps = 100
    config.training.detailed_metrics_steps = 500
    config.training.attention_analysis_steps = 2000
    config.training.eval_every_n_steps = 100
    config.training.checkpoint_every_n_steps = 5000
    config.training.max_checkpoints_to_keep = 3

    config.sampling.num_samples_at_eval = 2
    config.sampling.steps = 256
    config.sampling.prompt = "The"

    # Health thresholds: the rules that look at training progress start after warmup.
    config.health.warmup_steps = 5000
    return config
