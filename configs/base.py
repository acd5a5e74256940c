"""The default: a byte-level masked diffusion LM on the built-in Shakespeare, sized for a
laptop CPU (about 4 minutes on 2 cores, reaching a validation NELBO below 2.8 nats/byte within one).

Larger runs are an override away, e.g. `--config.training.num_steps=20000`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # parameters, data order and diffusion noise all derive from it

    config.data = ml_collections.ConfigDict()
    # 'shakespeare' (built in, one document), a path/glob of .txt, .jsonl or .parquet files, or
    # 'hf:<dataset name or local dir>[:<config>][@<revision>]', a Hugging Face dataset read as a stream
    # (pip install -e ".[hf]"), e.g. 'hf:HuggingFaceFW/fineweb-edu:sample-10BT'.
    config.data.source = "shakespeare"
    config.data.hf_max_documents = 0  # hf: sources only: read at most this many rows per split (0 = all)
    config.data.txt_documents = "file"  # .txt files: one document per 'file' or per blank-line 'paragraph'
    config.data.text_field = "text"  # the JSONL field / Parquet column holding each document's text
    # 'byte' (256 bytes + EOS, [MASK], [PAD]), 'gpt2', 'bpe:<vocab_size>' (trained on the training text,
    # kept in <workdir>/tokenizer.json), 'hf:<path to tokenizer.json>' or 'sentencepiece:<path to .model>'.
    config.data.tokenizer = "byte"
    # Documents end in EOS; 'wrap' cuts their concatenation into seq_len windows, 'pad' gives each
    # document its own window (truncated, then padded with [PAD], which is never scored).
    config.data.packing = "wrap"
    config.data.seq_len = 128
    config.data.val_fraction = 0.05  # held out: the last 5% of the documents, or of the tokens of a single one
    config.data.eval_batch_size = 32
    config.data.num_eval_batches = 8  # fixed validation batches, the same at every eval
    # The source is tokenized once into memory-mapped files here, and reused by every run (and resume)
    # with the same source, tokenizer and split. '' = $TDLM_CACHE_DIR, else ~/.cache/tdlm_jax/tokens:
    # shared by all workdirs, so a sweep tokenizes a large corpus once.
    config.data.cache_dir = ""
    # Batches are read in the training process (0), or by this many grain worker processes, each
    # keeping prefetch_buffer_size batches ready. The iterator's checkpointed position is the same either way.
    config.data.worker_count = 0
    config.data.prefetch_buffer_size = 2

    config.model = ml_collections.ConfigDict()
    config.model.kind = "diffusion"  # 'diffusion', or 'ar' for the autoregressive baseline
    config.model.d_model = 128
    config.model.num_heads = 4
    config.model.num_layers = 4
    config.model.mlp_dim = 384  # SwiGLU hidden width (≈ 8/3·d_model, rounded)
    config.model.dtype = "float32"  # compute dtype: 'float32' or 'bfloat16'; params stay float32
    config.model.time_conditioning = False  # masked diffusion needs no time input (MDLM, MD4)
    # Embedding/output rows: 0 uses the tokenizer's vocabulary; a larger value pads it (e.g. 50304
    # for GPT-2, a multiple of 128 for fast accelerator matmuls; padded ids are never predicted).
    config.model.vocab_size = 0
    config.model.remat = False  # recompute each block's activations in the backward pass: less memory, ~1/3 more compute
    # What a rematerialized block saves: 'nothing_saveable', 'dots_saveable' (keeps matmul outputs),
    # 'dots_with_no_batch_dims_saveable' or 'everything_saveable' (jax.checkpoint_policies).
    config.model.remat_policy = "nothing_saveable"
    # Attention kernel: 'auto' (cuDNN's fused flash attention on an NVIDIA GPU with bfloat16,
    # the XLA path elsewhere), 'xla', or 'cudnn' (an error where it does not apply).
    config.model.attention_impl = "auto"

    config.diffusion = ml_collections.ConfigDict()
    config.diffusion.schedule = "linear"  # α(t): 'linear' (1 − t), 'cosine', 'polynomial', 'loglinear'
    config.diffusion.polynomial_power = 2.0  # k of α(t) = 1 − t^k, for 'polynomial'
    config.diffusion.t_min = 1e-3  # t ~ U[t_min, 1]; keeps w(t) = 1/t finite
    # 'stratified' (low variance, strata aligned to the corruption buckets), 'iid', or 'adaptive':
    # importance sampling of t from a proposal q learned to minimise the NELBO estimate's
    # variance, each sequence weighted by p(t)/q(t) so the estimate stays unbiased.
    config.diffusion.time_sampling = "stratified"
    config.diffusion.adaptive_bins = 32  # q is piecewise constant over this many bins of [t_min, 1]
    config.diffusion.adaptive_floor = 0.1  # q mixed with this share of uniform, so no bin starves
    config.diffusion.adaptive_decay = 0.99  # per-step EMA decay of each bin's E[loss²]
    config.diffusion.adaptive_warmup_steps = 100  # q stays uniform for this many steps
    config.diffusion.loss_weighting = "elbo"  # 'elbo' (exact bound), ablations 'uniform', 'clipped'
    config.diffusion.weight_clip_max = 10.0  # the cap of 'clipped'

    config.training = ml_collections.ConfigDict()
    config.training.num_steps = 1200
    config.training.batch_size = 32  # global, split over all devices and hosts
    config.training.learning_rate = 2e-3
    config.training.warmup_steps = 100
    config.training.decay_schedule = "cosine"  # 'cosine', 'linear' or 'constant' after warmup
    config.training.min_learning_rate_ratio = 0.1  # final LR as a fraction of the peak
    config.training.weight_decay = 0.01
    config.training.adam_b1 = 0.9
    config.training.adam_b2 = 0.99
    config.training.grad_clip_norm = 1.0  # <= 0 disables clipping
    # The global batch is split into this many microbatches whose gradients are summed inside the
    # jitted step (same update as one big batch, 1/k of the activation memory; the stratified
    # times are laid out so every microbatch holds the same buckets). 8 is a CPU choice:
    # microbatches of 4 rows keep every activation in cache, which makes this config's step 1.45×
    # faster on a 2-core CPU (docs/performance.md). On an accelerator, use 1.
    config.training.grad_accum_steps = 8
    # Microbatches per iteration of the accumulation loop, live at once. 0 = by platform: 2 on a
    # CPU (XLA:CPU overlaps two independent microbatches on the cores: this config's step in about
    # 0.8 of the time, for about twice the activation memory), 1 on an accelerator.
    config.training.grad_accum_unroll = 0
    # > 0 keeps an exponential moving average of the parameters (e.g. 0.9999 as in MDLM), which
    # evaluation, samples, tdlm_jax.sample and tdlm_jax.evaluate then use. 0 turns it off.
    config.training.ema_decay = 0.0
    # Metric tiers (see the metrics guide): tier 1, tier 2 (research), tier 3 (advanced), each a
    # multiple of logging_steps. The guide's 500 and 2000 suit long runs (owt_gpt2_small.py has
    # them); this 1200-step run shows tier 2 six times, tier 3 three times and evaluates 12 times.
    config.training.logging_steps = 100
    config.training.detailed_metrics_steps = 200
    config.training.attention_analysis_steps = 400
    # The tier-3 pass analyses this many rows of the step's batch (evenly spaced, so they span the
    # corruption levels): its memory, one layer's [rows, heads, L, L] attention at a time, stays
    # below the train step's whatever the batch.
    config.training.analysis_rows = 8
    config.training.eval_every_n_steps = 100
    config.training.checkpoint_every_n_steps = 500
    config.training.max_checkpoints_to_keep = 3
    # Non-finite steps are skipped; this many in a row stops the run (checked at logging steps).
    config.training.max_consecutive_nonfinite = 100
    # Resuming with a different model, data or batch is refused unless this is set.
    config.training.allow_config_change = False
    # JAX's persistent compilation cache, so a resumed run loads its compiled steps instead of
    # recompiling: '' keeps it in <workdir>/compilation_cache (in $JAX_COMPILATION_CACHE_DIR where
    # that is set), a path puts it there (e.g. one directory shared by a sweep's runs), 'none'
    # turns it off.
    config.training.compilation_cache_dir = ""

    # Samples drawn at every evaluation (0 turns it off): to <workdir>/samples.jsonl, report.html,
    # TensorBoard and the console.
    config.sampling = ml_collections.ConfigDict()
    config.sampling.num_samples_at_eval = 2
    config.sampling.steps = 64
    config.sampling.method = "ancestral"  # 'ancestral', 'confidence' or 'random_remask'
    # What eval samples start with: 'auto' is "ROMEO:" on the built-in Shakespeare (its lines begin
    # with a speaker's cue) and nothing on any other source; or any text shorter than seq_len.
    config.sampling.prompt = "auto"

    config.metrics = ml_collections.ConfigDict()
    # Masking-rate edges of the low / medium / high corruption buckets.
    config.metrics.bucket_edges = (0.0, 0.3, 0.7, 1.0)
    # Under iid or adaptive time sampling, tier 2 takes every row's gradient on its own (bucket
    # membership is data); this caps the per-row gradients held at once per device, in MiB. 0 = by
    # platform: 32 on a CPU (a chunk's rows stay in cache), else 1/16 of the device's memory up to
    # 4096 (GPT-2 small's 650 MB rows four at a time rather than one by one).
    config.metrics.row_gradient_mb = 0

    # Health monitor (tdlm_jax.metrics.health): the metrics guide's warning signs as alerts in
    # alerts.jsonl. Defaults equal HealthThresholds and stay quiet on a healthy run of this config.
    config.health = ml_collections.ConfigDict()
    config.health.warmup_steps = 500  # accuracy, trend and correlation rules ignore earlier points
    config.health.bucket_order_margin = 0.05  # high-corruption accuracy may exceed medium by this (noise)
    config.health.mask_accuracy_floor = 0.4  # stagnation only counts below this mask accuracy
    config.health.stagnation_window = 5  # logged mask-accuracy points to judge stagnation over
    config.health.stagnation_min_improvement = 0.005  # absolute gain over the window that counts as learning
    config.health.gradient_window = 3  # research logs whose median the gradient rules judge (one batch is noisy)
    config.health.gradient_ratio_min = 0.1  # high/low corruption gradient norm ratio: healthy range
    config.health.gradient_ratio_max = 10.0
    config.health.high_gradient_norm_min = 0.01  # below: high-corruption gradients vanish
    config.health.low_gradient_norm_max = 5.0  # above: low-corruption gradients explode
    config.health.hidden_state_norm_min = 0.1  # mean L2 norm of the pre-norm residual stream (≈ √d at init)
    config.health.hidden_state_norm_max = 1000.0
    config.health.trend_window = 5  # tier-3 points that must be strictly decreasing to count as a trend
    config.health.trend_min_drop = 0.25  # and the total relative drop over them
    config.health.overfit_window = 4  # evaluations of rising val/loss and a widening val − train gap
    config.health.loss_weight_min = 0.5  # research/avg_loss_weight: healthy range (≈ 2 for linear + elbo)
    config.health.loss_weight_max = 10.0
    config.health.loss_stderr_fraction_max = 0.25  # research/loss_estimator_stderr / loss above this: too noisy
    # Healthy sign of research/weight_difficulty_correlation: 'negative' for ELBO weights (w(t) falls
    # as masking grows, so the easiest tokens weigh most), 'positive', or 'any' to disable the rule.
    config.health.expected_weight_difficulty_sign = "negative"
    config.health.weight_difficulty_margin = 0.1  # how far past 0 the wrong sign may go before firing

    # Device mesh (tdlm_jax.parallel.sharding): (data, fsdp) sizes whose product is the job's device count;
    # -1 takes the remaining devices. The batch splits over both axes; params and optimizer state
    # are sharded over fsdp (each matrix along its largest dimension fsdp divides) and replicated
    # over data. (-1, 1) is pure data parallelism; e.g. (-1, 8) shards the state 8 ways.
    config.sharding = ml_collections.ConfigDict()
    config.sharding.mesh_shape = (-1, 1)

    config.logging = ml_collections.ConfigDict()
    config.logging.wandb_project = ""  # a Weights & Biases project name enables the wandb writer
    config.logging.wandb_entity = ""  # team or user; empty uses wandb's default
    return config
