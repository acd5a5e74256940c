"""The catalogue of every name the trainer logs: its tier, unit, definition and when it is missing.

This is the one place a metric name is spelled out. The step, the tier computations, the
aggregation, the health rules, the report and the sweep comparison refer to the constants
below, and a test checks that a tiny run logs exactly `scalar_names(...)` for its config and
that the README's metric tables list the same names. Names are a contract with users (they
grep for them, see shared/spec/metrics-guide.md): change one only together with the README.

A metric whose `missing` is set can be undefined for a batch (a ratio with an empty
denominator); it is NaN on the device and written as missing (None, JSON null), never as 0.
A NaN in any other metric is a real numerical failure and is written as NaN.

No JAX import: the report and the sweep comparison read this without loading JAX.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterable, Mapping, Sequence

BUCKETS = ("low", "medium", "high")  # corruption buckets, by masking rate (metrics.bucket_edges)

# Tiers, with the config key of their logging interval (validation and samples: every
# training.eval_every_n_steps).
TIER1, TIER2, TIER3, SUMMARY = "tier 1", "tier 2", "tier 3", "summary"
INTERVALS = {TIER1: "training.logging_steps", TIER2: "training.detailed_metrics_steps",
             TIER3: "training.attention_analysis_steps"}
COUNT_UNITS = ("tokens", "sequences", "updates", "steps", "alerts")


@dataclasses.dataclass(frozen=True)
class Metric:
    """One logged name. `name` may hold a `{bucket}`, `{layer}`, `{rule}`, `{index}` or `{bin}` field."""

    name: str
    tier: str
    unit: str
    definition: str
    missing: str | None = None  # when the value is missing; None: never
    diffusion_only: bool = False  # not logged by the autoregressive baseline (it masks nothing)
    kind: str = "scalar"  # or "text"

    @property
    def is_count(self) -> bool:
        """Whether values are whole numbers of something (shown as ints when they are whole)."""
        return self.unit in COUNT_UNITS

    def expand(self, num_layers: int = 0, rules: Sequence[str] = (), num_samples: int = 0, num_bins: int = 0
               ) -> list[str]:
        """The concrete names of this entry for a model of `num_layers`, these health rules and
        an adaptive time proposal of `num_bins` bins (0: not adaptive)."""
        if "{bucket}" in self.name:
            return [self.name.format(bucket=b) for b in BUCKETS]
        if "{layer}" in self.name:
            return [self.name.format(layer=i) for i in range(num_layers)]
        if "{rule}" in self.name:
            return [self.name.format(rule=r) for r in rules]
        if "{index}" in self.name:
            return [self.name.format(index=i) for i in range(num_samples)]
        if "{bin}" in self.name:
            return [self.name.format(bin=k) for k in range(num_bins)]
        return [self.name]

    def matches(self, name: str) -> bool:
        pattern = re.escape(self.name)
        for field, value in (("bucket", "|".join(BUCKETS)), ("layer", r"\d+"), ("rule", r"\w+"), ("index", r"\d+"),
                             ("bin", r"\d+")):
            pattern = pattern.replace(re.escape("{" + field + "}"), f"(?:{value})")
        return re.fullmatch(pattern, name) is not None


# --- the names -------------------------------------------------------------------------------

TRAIN_LOSS = "train/loss"
LEARNING_RATE = "train/learning_rate"
GRAD_NORM = "train/grad_norm"
SKIPPED_STEPS = "train/skipped_steps"
CONSECUTIVE_SKIPPED_STEPS = "train/consecutive_skipped_steps"
TOKENS_PER_SECOND = "train/tokens_per_second"
MASK_ACCURACY = "metrics/mask_accuracy"
TOTAL_MASKED_TOKENS = "metrics/total_masked_tokens"
VALID_RATIO = "metrics/valid_ratio"
VAL_LOSS = "val/loss"
VAL_PERPLEXITY = "val/perplexity"
VAL_BITS_PER_TOKEN = "val/bits_per_token"
VAL_MASK_ACCURACY = "val/mask_accuracy"

BUCKET_ACCURACY = "research/{bucket}_corruption_accuracy"
BUCKET_COUNT = "research/{bucket}_corruption_count"
BUCKET_LOSS = "research/{bucket}_corruption_loss"
BUCKET_GRADIENT_NORM = "research/gradient_norm_{bucket}_corruption"
GRADIENT_NORM_TOTAL = "research/gradient_norm_total"
GRADIENT_RATIO = "research/gradient_norm_ratio_high_to_low"
WEIGHT_DIFFICULTY = "research/weight_difficulty_correlation"
AVG_LOSS_WEIGHT = "research/avg_loss_weight"
WEIGHT_STD = "research/weight_std"
AVG_PREDICTION_DIFFICULTY = "research/avg_prediction_difficulty"
BUCKET_LOSS_STD = "research/{bucket}_corruption_loss_std"
LOSS_ESTIMATOR_STDERR = "research/loss_estimator_stderr"
GRADIENT_NOISE_SCALE = "research/gradient_noise_scale"
GRADIENT_NOISE_TRACE = "research/gradient_noise_trace"
GRADIENT_SIGNAL = "research/gradient_signal_squared"
TIME_PROPOSAL_BIN = "research/time_proposal/bin_{bin}"
TIME_PROPOSAL = "research/time_proposal"  # TensorBoard's histogram of the bins above

ATTENTION_ENTROPY_PROXY = "advanced/attention_entropy_proxy"
HIDDEN_STATE_NORM = "advanced/hidden_state_norm"
SEQUENCE_DIVERSITY = "advanced/sequence_diversity"
ATTENTION_ENTROPY = "advanced/attention_entropy"
LAYER_ATTENTION_ENTROPY = "advanced/attention_entropy/layer_{layer}"

TRAINING_TIME_HOURS = "summary/training_time_hours"
TOTAL_STEPS = "summary/total_steps"
FINAL_LOSS = "summary/final_loss"
BEST_VAL_LOSS = "summary/best_val_loss"
ALERTS_TOTAL = "alerts/total"
ALERT_STARTS = "alerts/starts/{rule}"

SAMPLE_TEXT = "samples/{index}"
ALERT_TEXT = "alerts/{rule}"
HPARAMS_TEXT = "hparams"


def bucket_name(template: str, bucket: str) -> str:
    """One bucket's name of a `{bucket}` template, e.g. research/low_corruption_accuracy."""
    return template.format(bucket=bucket)


_EMPTY_BATCH = "the batch has no masked valid token"
CATALOGUE: tuple[Metric, ...] = (
    Metric(TRAIN_LOSS, TIER1, "nats/token", "NELBO estimate of the training batch with the configured weighting"),
    Metric(LEARNING_RATE, TIER1, "", "the step's learning rate"),
    Metric(GRAD_NORM, TIER1, "", "global L2 norm of the gradient before clipping"),
    Metric(SKIPPED_STEPS, TIER1, "updates", "updates skipped so far for a non-finite loss or gradient (running total)"),
    Metric(CONSECUTIVE_SKIPPED_STEPS, TIER1, "updates",
           "updates skipped since the last applied one (training.max_consecutive_nonfinite stops the run)"),
    Metric(TOKENS_PER_SECOND, TIER1, "tokens/s",
           "tokens (batch × seq_len) per second over the interval, without compilation, evaluation or checkpointing",
           missing="no training time was measured in the interval"),
    Metric(MASK_ACCURACY, TIER1, "fraction", "correct argmax predictions / masked valid tokens, over the global batch "
           "(each sequence weighted by its unbiasing factor)",
           missing=_EMPTY_BATCH, diffusion_only=True),
    Metric(TOTAL_MASKED_TOKENS, TIER1, "tokens", "masked valid tokens in the global batch", diffusion_only=True),
    Metric(VALID_RATIO, TIER1, "fraction", "masks drawn on real tokens / all masks drawn (padding draws masks too; "
           "each sequence weighted by its unbiasing factor)",
           missing="no mask was drawn", diffusion_only=True),
    Metric(VAL_LOSS, TIER1, "nats/token", "exact-weight NELBO (AR: exact NLL) pooled over the fixed validation batches"),
    Metric(VAL_PERPLEXITY, TIER1, "", "exp(val/loss)"),
    Metric(VAL_BITS_PER_TOKEN, TIER1, "bits/token", "val/loss / ln 2"),
    Metric(VAL_MASK_ACCURACY, TIER1, "fraction", "mask accuracy on the validation batches",
           missing="the validation batches have no masked valid token", diffusion_only=True),
    Metric(BUCKET_ACCURACY, TIER2, "fraction", "correct argmax predictions over the masked valid tokens of the bucket",
           missing="the bucket has no masked valid token", diffusion_only=True),
    Metric(BUCKET_COUNT, TIER2, "sequences", "sequences in the bucket", diffusion_only=True),
    Metric(BUCKET_LOSS, TIER2, "nats/token", "the bucket's NELBO contribution; the three add up to train/loss",
           diffusion_only=True),
    Metric(BUCKET_LOSS_STD, TIER2, "nats/token",
           "standard deviation over the bucket's sequences of each one's weighted loss per valid token, w(t)·Σ CE / "
           "valid tokens (weighted by the unbiasing factors)", missing="fewer than two sequences in the bucket",
           diffusion_only=True),
    Metric(LOSS_ESTIMATOR_STDERR, TIER2, "nats/token",
           "standard error of train/loss as an estimate of the NELBO: the stratified variance formula over the "
           "buckets (an upper bound), B·S² of the rows under iid or adaptive sampling",
           missing="a batch of one sequence", diffusion_only=True),
    Metric(GRADIENT_NOISE_SCALE, TIER2, "sequences",
           "simple gradient noise scale tr(Σ)/|G|² (McCandlish et al. 2018) from the gradients of the batch and of "
           "its microbatches (or halves): about the critical batch size",
           missing="the step's |G|² estimate is not positive", diffusion_only=True),
    Metric(GRADIENT_NOISE_TRACE, TIER2, "",
           "unbiased estimate of tr(Σ), the per-sequence gradient covariance's trace (the noise scale's numerator)",
           diffusion_only=True),
    Metric(GRADIENT_SIGNAL, TIER2, "",
           "unbiased estimate of |G|², the true gradient's squared norm (the noise scale's denominator)",
           diffusion_only=True),
    Metric(BUCKET_GRADIENT_NORM, TIER2, "", "global L2 norm of the gradient of the bucket-restricted loss",
           diffusion_only=True),
    Metric(TIME_PROPOSAL_BIN, TIER2, "fraction",
           "the adaptive time sampler's probability q_k of bin k of [t_min, 1] this step drew from (adaptive only)",
           diffusion_only=True),
    Metric(GRADIENT_NORM_TOTAL, TIER2, "", "global L2 norm of the full gradient", diffusion_only=True),
    Metric(GRADIENT_RATIO, TIER2, "", "gradient_norm_high_corruption / gradient_norm_low_corruption",
           missing="the low bucket is empty or its gradient is zero", diffusion_only=True),
    Metric(WEIGHT_DIFFICULTY, TIER2, "", "Pearson correlation of loss weight and difficulty over masked valid tokens",
           missing="fewer than two masked tokens, or constant weights or difficulties", diffusion_only=True),
    Metric(AVG_LOSS_WEIGHT, TIER2, "", "mean loss weight w(t) over masked valid tokens", missing=_EMPTY_BATCH,
           diffusion_only=True),
    Metric(WEIGHT_STD, TIER2, "", "population standard deviation of those weights", missing=_EMPTY_BATCH,
           diffusion_only=True),
    Metric(AVG_PREDICTION_DIFFICULTY, TIER2, "",
           "mean of 1 − (largest predicted probability) over masked valid tokens", missing=_EMPTY_BATCH,
           diffusion_only=True),
    Metric(ATTENTION_ENTROPY_PROXY, TIER3, "", "variance of final hidden states across valid positions",
           diffusion_only=True),
    Metric(HIDDEN_STATE_NORM, TIER3, "", "mean L2 norm of final hidden states at valid positions", diffusion_only=True),
    Metric(SEQUENCE_DIVERSITY, TIER3, "", "standard deviation of final hidden states across valid positions",
           diffusion_only=True),
    Metric(ATTENTION_ENTROPY, TIER3, "nats", "mean entropy of the attention distributions, all layers",
           diffusion_only=True),
    Metric(LAYER_ATTENTION_ENTROPY, TIER3, "nats", "mean entropy of one layer's attention distributions",
           diffusion_only=True),
    Metric(TRAINING_TIME_HOURS, SUMMARY, "hours", "wall time of this invocation"),
    Metric(TOTAL_STEPS, SUMMARY, "steps", "steps trained"),
    Metric(FINAL_LOSS, SUMMARY, "nats/token", "the last logged train/loss", missing="no interval was logged"),
    Metric(BEST_VAL_LOSS, SUMMARY, "nats/token", "the lowest val/loss of the run", missing="no finite val/loss"),
    Metric(ALERTS_TOTAL, SUMMARY, "alerts", "health alerts started during the run"),
    Metric(ALERT_STARTS, SUMMARY, "alerts", "starts of one health rule's alert"),
    Metric(SAMPLE_TEXT, TIER1, "text", "a sample from the evaluated parameters", kind="text",
           diffusion_only=True),
    Metric(ALERT_TEXT, TIER1, "text", "a health alert's start or clear", kind="text"),
    Metric(HPARAMS_TEXT, SUMMARY, "text", "the resolved config, as a table", kind="text"),
)

# Running totals: an interval reports their latest value, not a mean.
CUMULATIVE = frozenset([SKIPPED_STEPS, CONSECUTIVE_SKIPPED_STEPS])
# What the train step returns and the loop averages over a logging interval.
TRAIN_STEP_NAMES = (TRAIN_LOSS, LEARNING_RATE, GRAD_NORM, SKIPPED_STEPS, CONSECUTIVE_SKIPPED_STEPS)
TIER1_STEP_NAMES = TRAIN_STEP_NAMES + (MASK_ACCURACY, TOTAL_MASKED_TOKENS, VALID_RATIO)


@functools.lru_cache(maxsize=4096)
def lookup(name: str) -> Metric | None:
    """The catalogue entry of a concrete name, or None if it is not catalogued."""
    return next((m for m in CATALOGUE if m.matches(name)), None)


def _concrete(entries: Iterable[Metric], **sizes) -> frozenset[str]:
    return frozenset(n for m in entries for n in m.expand(**sizes))


# Names whose NaN on the device means "missing" (an empty denominator), not a failure.
MISSING_WHEN_EMPTY = _concrete(m for m in CATALOGUE if m.missing is not None and m.tier != SUMMARY)


def scalar_names(objective: str, num_layers: int, rules: Sequence[str], tiers: Sequence[str] = (TIER1, TIER2, TIER3),
                 num_bins: int = 0) -> frozenset[str]:
    """Every scalar a run of `objective` ('diffusion' or 'ar') logs once each of `tiers` has
    fired, an evaluation has run and the run has finished (summary included); `num_bins`
    is the adaptive time proposal's (0 when time sampling is not adaptive)."""
    diffusion = objective == "diffusion"
    entries = [m for m in CATALOGUE if m.kind == "scalar" and (m.tier in tiers or m.tier == SUMMARY)
               and (diffusion or not m.diffusion_only)]
    return _concrete(entries, num_layers=num_layers, rules=rules, num_bins=num_bins)


def time_proposal(row: Mapping[str, float | None]) -> list[float]:
    """The adaptive time proposal's q over its bins from a row's `TIME_PROPOSAL_BIN` values
    ([] if the row has none, or any is missing)."""
    bins = []
    while TIME_PROPOSAL_BIN.format(bin=len(bins)) in row:
        bins.append(row[TIME_PROPOSAL_BIN.format(bin=len(bins))])
    return bins if all(q is not None for q in bins) else []


def tier_of(name: str) -> str | None:
    """The tier of a logged name (None for names the catalogue does not hold)."""
    metric = lookup(name)
    return None if metric is None else metric.tier
