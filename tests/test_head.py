"""The chunked output head (tdlm_jax.model.head): the same scores and gradients as whole
logits, to float rounding, whatever the chunking; and at most one chunk of logits live."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdlm_jax.diffusion.corruption import corrupt
from tdlm_jax.diffusion.loss import batch_scores, num_valid_tokens, weighted_token_losses
from tdlm_jax.model import head
from common import MODEL, make_process, model_parts, random_batch, scored

B, L, D, V, PREDICTABLE = 3, 7, 16, 37, 33


def problem(dtype=jnp.float32):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    hidden = jax.random.normal(k1, (B, L, D)).astype(dtype)
    kernel = jax.random.normal(k2, (D, V)) * 0.3
    targets = jax.random.randint(k3, (B, L), 0, PREDICTABLE)
    cotangent = jax.random.normal(k4, (B, L))  # the NELBO's per-token weights, zeros included
    return hidden, kernel, targets, cotangent.at[0, :3].set(0.0)


def whole_logits(hidden, kernel):
    logits = jnp.einsum("bld,dv->blv", hidden, kernel.astype(hidden.dtype), preferred_element_type=jnp.float32)
    return jnp.where(jnp.arange(V) < PREDICTABLE, logits, -jnp.inf)


@pytest.mark.parametrize("positions_per_chunk", [B * L, 5, 1])  # one chunk; 5 with a padded last; every position
def test_chunked_scores_and_gradients_equal_whole_logits(positions_per_chunk):
    hidden, kernel, targets, cotangent = problem()
    chunk_bytes = 4 * V * positions_per_chunk
    assert head.chunk_positions(B * L, V, chunk_bytes)[1] == positions_per_chunk
    chunked = head.chunked_scores(hidden, kernel, targets, PREDICTABLE, chunk_bytes=chunk_bytes)
    whole = head.scores_from_logits(whole_logits(hidden, kernel), targets)
    np.testing.assert_allclose(chunked.nll_BxL, whole.nll_BxL, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(chunked.predicted_BxL, whole.predicted_BxL)
    np.testing.assert_allclose(chunked.max_log_prob_BxL, whole.max_log_prob_BxL, rtol=1e-6, atol=1e-6)
    assert (np.asarray(whole.predicted_BxL) < PREDICTABLE).all()  # never an id that is not predicted

    def loss(score_fn):
        return lambda h, k: (score_fn(h, k).nll_BxL * cotangent).sum()

    got = jax.grad(loss(lambda h, k: head.chunked_scores(h, k, targets, PREDICTABLE, chunk_bytes)), (0, 1))(
        hidden, kernel)
    expected = jax.grad(loss(lambda h, k: head.scores_from_logits(whole_logits(h, k), targets)), (0, 1))(
        hidden, kernel)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
        assert float(jnp.abs(e).max()) > 1e-2  # not a comparison of zeros


def test_bf16_compute_runs_the_backward_in_bf16_against_the_float32_reference():
    hidden, kernel, targets, cotangent = problem(jnp.bfloat16)
    loss = lambda h, k: (head.chunked_scores(h, k, targets, PREDICTABLE, 4 * V * 5).nll_BxL * cotangent).sum()
    d_hidden, d_kernel = jax.grad(loss, (0, 1))(hidden, kernel)
    assert d_hidden.dtype == jnp.bfloat16 and d_kernel.dtype == jnp.float32
    reference = lambda h, k: (head.scores_from_logits(whole_logits(h.astype(jnp.float32), k), targets).nll_BxL
                              * cotangent).sum()
    r_hidden, r_kernel = jax.grad(reference, (0, 1))(hidden.astype(jnp.float32), kernel)
    np.testing.assert_allclose(np.asarray(d_hidden, np.float32), r_hidden, rtol=0.05, atol=0.02)
    np.testing.assert_allclose(d_kernel, r_kernel, rtol=0.05, atol=0.02)


def test_the_denoiser_s_scores_are_those_of_its_logits():
    graphdef, params = model_parts()
    from flax import nnx
    model = nnx.merge(graphdef, params)
    data = random_batch()
    batch = corrupt(make_process(), jax.random.key(2), data["tokens"], data["valid"])
    got = batch_scores(model, batch)
    expected = scored(model(batch.noisy_BxL, batch.valid_BxL, batch.t_B), batch)
    for name in ("nll_BxL", "predicted_BxL", "max_log_prob_BxL"):
        np.testing.assert_allclose(getattr(got, name), getattr(expected, name), rtol=1e-5, atol=1e-6, err_msg=name)
    loss = weighted_token_losses(got.nll_BxL, batch).sum() / num_valid_tokens(batch)
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert MODEL.vocab_size > MODEL.num_predictable  # the −inf ids are part of what is compared


def test_only_one_chunk_of_logits_is_live_in_the_compiled_gradient():
    """The compiled gradient of a 4096-position, 8192-id head holds ~1 chunk of float32
    logits (16 MB here), where the whole logits are 128 MB."""
    positions, d_model, vocab = 4096, 64, 8192
    hidden = jax.ShapeDtypeStruct((1, positions, d_model), jnp.float32)
    kernel = jax.ShapeDtypeStruct((d_model, vocab), jnp.float32)
    targets = jax.ShapeDtypeStruct((1, positions), jnp.int32)
    chunk_bytes = 16 * 2**20
    whole_bytes = 4 * positions * vocab

    def temp_bytes(score_fn):
        grad = jax.grad(lambda h, k, t: score_fn(h, k, t).nll_BxL.sum(), (0, 1))
        return jax.jit(grad).lower(hidden, kernel, targets).compile().memory_analysis().temp_size_in_bytes

    chunked = temp_bytes(lambda h, k, t: head.chunked_scores(h, k, t, vocab, chunk_bytes))
    plain = temp_bytes(lambda h, k, t: head.scores_from_logits(jnp.einsum("bld,dv->blv", h, k), t))
    assert plain >= 2 * whole_bytes  # the plain path: the logits and their gradient at least
    assert chunked <= 4 * chunk_bytes + 4 * 2**20, (chunked, plain)
