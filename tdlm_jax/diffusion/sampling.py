"""Samplers of the masked (absorbing-state) diffusion LM: ancestral, confidence-based and
first-hitting.

Conditioning is a template: `template_NxL` holds the known tokens, and [MASK] wherever a
token must be generated (a prompt is its tokens followed by masks; infilling is masks in
arbitrary spans). Known tokens are never changed, and only ids below `num_predictable`
are ever sampled, so no output contains [MASK] or [PAD].

"ancestral" and "confidence" walk the time grid t_k = 1 − k/steps (k = 0..steps) from t = 1 to t = 0.
From t to s < t a still-masked token is revealed with probability

    p(t, s) = (α(s) − α(t)) / (1 − α(t)),

the reverse process of the forward masking process (MDLM eq. 7, MD4 eq. 7); p = 1 on the
last step, so every mask is filled.

- "ancestral" (MDLM / MD4): each masked position is revealed independently with p(t, s),
  with a token drawn from the model (SUBS: revealed tokens are never changed again).
  MDLM's cache: when a step reveals nothing, the next step's input is the same, and so
  are its logits if the model does not read t; the denoiser is then not called again.
- "confidence" (MaskGIT; LLaDA's remasking): each step draws a candidate for every
  masked position and commits the n most confident, where n = R − ⌊R·(1 − p(t, s))⌋ for
  R masks left, i.e. the ancestral expected number rounded up. With the linear schedule
  this is LLaDA's near-uniform split (e.g. 10 masks in 4 steps: 3, 3, 2, 2); other
  schedules front- or back-load the reveals as their masking rate does. Confidence is the
  model's probability of the candidate (LLaDA's "low_confidence" remasking: the least
  confident stay masked), or a uniform random number ("random" remasking).

- "first_hitting" (Zheng et al. 2024, "Masked diffusion models are secretly time-agnostic
  masked models and exploit inaccurate categorical sampling"): the infinite-step limit of
  "ancestral", exactly, in one denoiser call per mask. In continuous time the masks of a row
  are revealed one at a time, each at an independent time drawn from the schedule, so for a
  denoiser that does not read t the order of reveals is a uniformly random permutation and
  the reveal times (the schedule) change nothing. Each call reveals one uniformly chosen
  mask of every row, with a token drawn from the model at that position: a batch of any
  size takes exactly as many calls as its rows have masks, whatever `steps` is (ignored).
  A time-conditioned model is refused: its calls would need the reveal times.

With `block_length` (LLaDA's semi-autoregressive sampling) the sequence is cut into
blocks of absolute positions [0, B), [B, 2B), ..., generated left to right with
steps // num_blocks steps each; only the current block's masks may be revealed, and
later blocks stay masked (the model sees them as masks). Blocks without masks (e.g. all
prompt) spend their steps without calling the model.

The model is given the step's grid time t (within the block), which only a time-conditioned
model reads. `nfe` counts the denoiser calls actually made. Every method shares the cache rule: the
model is called only when some position may be revealed and the input changed since the
last call (or the model is time-conditioned); so nfe ≤ steps.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from tdlm_jax.diffusion.schedules import Schedule
from tdlm_jax.errors import ConfigError

METHODS = ("ancestral", "confidence", "first_hitting")
REMASKING = ("low_confidence", "random")

# The sampler registry: the names `sampling.method` and `--sampler` take -> (method, remasking).
SAMPLERS = {
    "ancestral": ("ancestral", "low_confidence"),
    "confidence": ("confidence", "low_confidence"),
    "random_remask": ("confidence", "random"),
    "first_hitting": ("first_hitting", "low_confidence"),
}


def resolve_sampler(name: str) -> tuple[str, str]:
    """(method, remasking) of a sampler name; ConfigError if unknown."""
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}: set --sampler to one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]

ModelFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


class SampleResult(NamedTuple):
    """Generated tokens (template tokens kept, every mask filled) and the denoiser calls made."""

    tokens_NxL: jax.Array
    nfe: jax.Array  # int32 scalar


def filter_logits(logits_NxLxV: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
    """Temperature, then top-k, then top-p (nucleus) filtering; removed ids get −inf.

    top-k keeps the k largest logits (ties with the k-th are kept too); top-p keeps the
    smallest set of most likely ids whose probability mass is ≥ p (the most likely id is
    always kept). `temperature` must be > 0 here: temperature 0 is argmax, see
    `sample_tokens`. 0 disables top-k and 1 disables top-p.
    """
    logits_NxLxV = logits_NxLxV / temperature
    if 0 < top_k < logits_NxLxV.shape[-1]:
        kth_NxLx1 = lax.top_k(logits_NxLxV, top_k)[0][..., -1:]
        logits_NxLxV = jnp.where(logits_NxLxV < kth_NxLx1, -jnp.inf, logits_NxLxV)
    if top_p < 1.0:
        sorted_NxLxV = -jnp.sort(-logits_NxLxV, axis=-1)  # descending
        probs_NxLxV = jax.nn.softmax(sorted_NxLxV, axis=-1)
        # An id is kept if the mass of the ids before it is still short of p: this keeps
        # exactly the smallest prefix reaching p.
        mass_before_NxLxV = jnp.cumsum(probs_NxLxV, axis=-1) - probs_NxLxV
        kept_NxLxV = mass_before_NxLxV < top_p
        threshold_NxLx1 = jnp.min(jnp.where(kept_NxLxV, sorted_NxLxV, jnp.inf), axis=-1, keepdims=True)
        logits_NxLxV = jnp.where(logits_NxLxV < threshold_NxLx1, -jnp.inf, logits_NxLxV)
    return logits_NxLxV


SAMPLING_DTYPES = ("float32", "float64")


def sample_tokens(rng: jax.Array, logits_NxLxV: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, sampling_dtype: str = "float32") -> jax.Array:
    """Draws one id per position from the filtered logits; temperature 0 is argmax.

    The draw is Gumbel-max in `sampling_dtype`. In float32 the Gumbel noise cannot exceed
    about 16.6 (its uniforms stop 2^-24 short of 1), so ids more than ~21 nats below the top
    are never drawn and low-probability ids are drawn too rarely: a lower effective
    temperature, which makes generative perplexity look better than it is (Zheng et al.
    2024). float64 (traced with x64 on: `tdlm_jax.inference.generation` does this) moves the
    limit to ~43 nats.
    """
    if temperature == 0.0:
        return jnp.argmax(logits_NxLxV, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits_NxLxV.astype(sampling_dtype), temperature=temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)


def reveal_probability(schedule: Schedule, t: jax.Array, s: jax.Array) -> jax.Array:
    """p(t, s) = (α(s) − α(t)) / (1 − α(t)): a mask at time t is clean at time s < t."""
    alpha_t, alpha_s = schedule.alpha(t), schedule.alpha(s)
    return jnp.clip((alpha_s - alpha_t) / (1.0 - alpha_t), 0.0, 1.0)


def num_to_commit(num_masked_N: jax.Array, p_reveal: jax.Array) -> jax.Array:
    """R − ⌊R·(1 − p)⌋: the expected number of reveals R·p, rounded up (all of R when p = 1)."""
    # The small slack keeps float error (R·(1 − p) = 4.9999…) from committing one extra.
    remaining_N = jnp.floor(num_masked_N * (1.0 - p_reveal) + 1e-4).astype(jnp.int32)
    return num_masked_N - jnp.minimum(remaining_N, num_masked_N)


def select_top(score_NxL: jax.Array, eligible_NxL: jax.Array, n_N: jax.Array) -> jax.Array:
    """Marks the n highest-scoring eligible positions of each row (scores must lie in [0, 1])."""
    # Ineligible positions score −1, below any probability, so they rank last.
    keyed_NxL = jnp.where(eligible_NxL, score_NxL, -1.0)
    order_NxL = jnp.argsort(-keyed_NxL, axis=-1, stable=True)
    rank_NxL = jnp.argsort(order_NxL, axis=-1)
    return eligible_NxL & (rank_NxL < n_N[:, None])


def block_layout(length: int, block_length: int | None, steps: int) -> tuple[int, int, int]:
    """(block length, number of blocks, steps per block); no blocks = one block of the whole row."""
    block = length if block_length is None else min(block_length, length)
    num_blocks = -(-length // block)
    if steps < num_blocks:
        raise ConfigError(f"steps={steps} is fewer than the {num_blocks} blocks of length {block} in a "
                          f"length-{length} sequence: raise steps or block_length")
    return block, num_blocks, steps // num_blocks


def validate_options(*, steps: int, method: str, remasking: str, temperature: float, top_k: int,
                     top_p: float, block_length: int | None, sampling_dtype: str = "float32") -> None:
    """Raises ConfigError naming the first invalid sampling option."""
    if sampling_dtype not in SAMPLING_DTYPES:
        raise ConfigError(f"unknown sampling dtype {sampling_dtype!r}; allowed: {', '.join(SAMPLING_DTYPES)}")
    if sampling_dtype == "float64" and not jax.config.jax_enable_x64:
        raise ConfigError("float64 sampling must be traced with 64-bit types on: call generate inside "
                          "`with jax.enable_x64(True):` (tdlm_jax.inference.generation does)")
    if method not in METHODS:
        raise ConfigError(f"unknown sampling method {method!r}; allowed: {', '.join(METHODS)}")
    if remasking not in REMASKING:
        raise ConfigError(f"unknown remasking {remasking!r}; allowed: {', '.join(REMASKING)}")
    if steps < 1:
        raise ConfigError(f"steps must be at least 1, got {steps}")
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0 (0 is argmax), got {temperature}")
    if top_k < 0:
        raise ConfigError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p must lie in (0, 1] (1 disables it), got {top_p}")
    if block_length is not None and block_length < 1:
        raise ConfigError(f"block_length must be at least 1, got {block_length}")


def _candidates_and_scores(rng: jax.Array, logits_NxLxV: jax.Array, *, remasking: str,
                           **filters) -> tuple[jax.Array, jax.Array]:
    """The confidence method's candidate token per position and its score in [0, 1]: the
    model's probability of the candidate (low-confidence remasking) or a uniform draw (random
    remasking)."""
    sample_rng, score_rng = jax.random.split(rng)
    candidates_NxL = sample_tokens(sample_rng, logits_NxLxV, **filters)
    if remasking == "random":
        return candidates_NxL, jax.random.uniform(score_rng, candidates_NxL.shape)
    # LLaDA's confidence: the unfiltered model probability of the drawn token.
    probs_NxLxV = jax.nn.softmax(logits_NxLxV, axis=-1)
    return candidates_NxL, jnp.take_along_axis(probs_NxLxV, candidates_NxL[..., None], axis=-1)[..., 0]


def generate(model_fn: ModelFn, rng: jax.Array, template_NxL: jax.Array, *, mask_id: int,
             num_predictable: int, steps: int, method: str = "ancestral",
             schedule: Schedule = Schedule("linear"), temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, block_length: int | None = None, remasking: str = "low_confidence",
             time_conditioned: bool = False, sampling_dtype: str = "float32") -> SampleResult:
    """Fills every [MASK] of `template_NxL`; traceable, so it can run inside `jax.jit`.

    Args:
        model_fn: (noisy_NxL, valid_NxL, t_N) -> logits_NxLxV; valid is all True here.
        rng: a JAX PRNG key.
        template_NxL: known tokens, and `mask_id` where tokens are to be generated.
        mask_id: the [MASK] id.
        num_predictable: ids [0, num_predictable) are the only ones ever sampled.
        steps: the step budget (per run; split evenly over blocks).
        method: "ancestral" or "confidence" (see the module docstring).
        schedule: α(t), which sets how many tokens each step reveals.
        temperature, top_k, top_p: logit filters before sampling; temperature 0 is argmax.
        block_length: semi-autoregressive block length; None generates all positions at once.
        remasking: for "confidence": "low_confidence" or "random".
        time_conditioned: whether the model reads t; if so, logits are never reused.
        sampling_dtype: "float32" or "float64", the precision of the categorical draws (see
            `sample_tokens`); float64 must be traced with x64 enabled.

    Returns:
        SampleResult(tokens_NxL, nfe), nfe being the number of model calls made.
    """
    validate_options(steps=steps, method=method, remasking=remasking, temperature=temperature,
                     top_k=top_k, top_p=top_p, block_length=block_length, sampling_dtype=sampling_dtype)
    template_NxL = jnp.asarray(template_NxL, jnp.int32)
    if method == "first_hitting":
        if time_conditioned:
            raise ConfigError("first_hitting needs a denoiser that does not read t "
                              "(model.time_conditioning=False): use ancestral for this run")
        return first_hitting(model_fn, rng, template_NxL, mask_id=mask_id, num_predictable=num_predictable,
                             block_length=block_length, temperature=temperature, top_k=top_k, top_p=top_p,
                             sampling_dtype=sampling_dtype)
    batch, length = template_NxL.shape
    block, num_blocks, steps_per_block = block_layout(length, block_length, steps)
    valid_NxL = jnp.ones((batch, length), bool)
    positions_L = jnp.arange(length)
    logits_spec = jax.eval_shape(model_fn, template_NxL, valid_NxL, jnp.ones((batch,), jnp.float32))
    filters = dict(temperature=temperature, top_k=top_k, top_p=top_p, sampling_dtype=sampling_dtype)

    def step(i: jax.Array, carry: tuple) -> tuple:
        x_NxL, cache_NxLxV, stale, nfe = carry
        block_index, k = i // steps_per_block, i % steps_per_block
        t = 1.0 - k / steps_per_block
        s = 1.0 - (k + 1) / steps_per_block
        in_block_L = (positions_L >= block_index * block) & (positions_L < (block_index + 1) * block)
        eligible_NxL = (x_NxL == mask_id) & in_block_L
        # The cache is valid while the input is unchanged and t is not an input.
        call = jnp.any(eligible_NxL) & (stale | time_conditioned)
        logits_NxLxV = lax.cond(call, lambda: model_fn(x_NxL, valid_NxL, jnp.full((batch,), t, jnp.float32)),
                                lambda: cache_NxLxV)
        # Sampling among the predictable ids only is what guarantees no [MASK]/[PAD] output,
        # whatever the model puts at those ids.
        predictable_NxLxV = logits_NxLxV[..., :num_predictable]
        p_reveal = jnp.where(k == steps_per_block - 1, 1.0, reveal_probability(schedule, t, s))
        if method == "ancestral":
            # The reveal coins come first: a step that reveals nothing (most steps, when steps
            # exceed the masks) draws no token at all.
            sample_rng, coin_rng = jax.random.split(jax.random.fold_in(rng, i))
            reveal_NxL = eligible_NxL & (jax.random.uniform(coin_rng, eligible_NxL.shape) < p_reveal)
            candidates_NxL = lax.cond(jnp.any(reveal_NxL),
                                      lambda: sample_tokens(sample_rng, predictable_NxLxV, **filters),
                                      lambda: x_NxL)
        else:
            candidates_NxL, score_NxL = _candidates_and_scores(
                jax.random.fold_in(rng, i), predictable_NxLxV, remasking=remasking, **filters)
            n_N = num_to_commit(jnp.sum(eligible_NxL, axis=-1), p_reveal)
            reveal_NxL = select_top(score_NxL, eligible_NxL, n_N)
        new_NxL = jnp.where(reveal_NxL, candidates_NxL, x_NxL)
        stale = jnp.any(reveal_NxL) | (stale & ~call)
        return new_NxL, logits_NxLxV, stale, nfe + call.astype(jnp.int32)

    init = (template_NxL, jnp.zeros(logits_spec.shape, logits_spec.dtype), jnp.array(True), jnp.int32(0))
    tokens_NxL, _, _, nfe = lax.fori_loop(0, num_blocks * steps_per_block, step, init)
    return SampleResult(tokens_NxL=tokens_NxL, nfe=nfe)


def first_hitting(model_fn: ModelFn, rng: jax.Array, template_NxL: jax.Array, *, mask_id: int,
                  num_predictable: int, block_length: int | None = None, **filters) -> SampleResult:
    """The first-hitting sampler (see the module docstring): one call reveals one mask per row,
    chosen uniformly among the row's masks (in its leftmost unfinished block, with blocks)."""
    batch, length = template_NxL.shape
    block = length if block_length is None else min(block_length, length)
    block_of_L = jnp.arange(length) // block
    valid_NxL = jnp.ones((batch, length), bool)
    unread_t_N = jnp.ones((batch,), jnp.float32)  # the denoiser does not read t
    rows_N = jnp.arange(batch)

    def reveal_one(carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        x_NxL, nfe = carry
        masked_NxL = x_NxL == mask_id
        current_N = jnp.min(jnp.where(masked_NxL, block_of_L, length), axis=-1)  # leftmost block with masks
        eligible_NxL = masked_NxL & (block_of_L == current_N[:, None])
        pick_rng, token_rng = jax.random.split(jax.random.fold_in(rng, nfe))
        # A uniform score per eligible mask; the highest is a uniform choice among them.
        position_N = jnp.argmax(jnp.where(eligible_NxL, jax.random.uniform(pick_rng, (batch, length)), -1.0), -1)
        logits_NxLxV = model_fn(x_NxL, valid_NxL, unread_t_N)
        logits_Nx1xV = jnp.take_along_axis(logits_NxLxV, position_N[:, None, None], axis=1)[..., :num_predictable]
        token_N = sample_tokens(token_rng, logits_Nx1xV, **filters)[:, 0]
        active_N = jnp.any(eligible_NxL, axis=-1)  # a finished row keeps its tokens
        x_NxL = x_NxL.at[rows_N, position_N].set(jnp.where(active_N, token_N, x_NxL[rows_N, position_N]))
        return x_NxL, nfe + 1

    tokens_NxL, nfe = lax.while_loop(lambda carry: jnp.any(carry[0] == mask_id), reveal_one,
                                     (template_NxL, jnp.int32(0)))
    return SampleResult(tokens_NxL=tokens_NxL, nfe=nfe)
