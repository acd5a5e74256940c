"""`model.folded_einsum`: jnp.einsum's values and gradients, with a vmap axis folded into the batch axis."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdlm_jax.model.folded_einsum import folded_einsum
from tdlm_jax.training import dot_bound

KEYS = jax.random.split(jax.random.key(0), 3)
Q = jax.random.normal(KEYS[0], (3, 6, 5, 4))  # [vmap, batch, queries, head]
K = jax.random.normal(KEYS[1], (3, 6, 7, 4))
W = jax.random.normal(KEYS[2], (6, 5, 7))


def attention_loss(einsum, q, k):
    """Attention of one vmapped element: scores, softmax, probs · values (k as the values)."""
    scores = einsum("xqh,xkh->xqk", q, k)
    out = einsum("xqk,xkh->xqh", jax.nn.softmax(scores, axis=-1), k)
    return (out ** 2).sum() + (scores * W).sum()


PLAIN = lambda spec, a, b: jnp.einsum(spec, a, b)
FOLDED = lambda spec, a, b: folded_einsum(spec, a, b)
GRAD = lambda einsum: jax.grad(lambda q, k: attention_loss(einsum, q, k), argnums=(0, 1))


@pytest.mark.parametrize("name, transform", [
    ("no vmap", lambda einsum: GRAD(einsum)(Q[0], K[0])),
    ("vmap of grad", lambda einsum: jax.vmap(GRAD(einsum))(Q, K)),
    ("one operand unbatched", lambda einsum: jax.vmap(GRAD(einsum), in_axes=(0, None))(Q, K[0])),
    ("nested vmaps", lambda einsum: jax.vmap(jax.vmap(
        lambda q, k: GRAD(einsum)(q[None], k[None])))(Q, K)),
])
def test_values_and_gradients_are_einsums(name, transform):
    for plain, folded in zip(jax.tree.leaves(transform(PLAIN)), jax.tree.leaves(transform(FOLDED))):
        np.testing.assert_allclose(folded, plain, rtol=1e-6, atol=1e-5)  # summation order only
    forward = lambda einsum: jax.vmap(lambda q, k: einsum("xqh,xkh->xqk", q, k))(Q, K)
    np.testing.assert_allclose(forward(FOLDED), forward(PLAIN), rtol=1e-6, atol=1e-6)


def test_under_vmap_every_matmul_of_forward_and_backward_has_one_batch_dimension():
    def batch_dims(einsum):
        jaxpr = jax.make_jaxpr(jax.vmap(GRAD(einsum)))(Q, K).jaxpr
        return sorted({len(dot.dimension_numbers[1][0]) for dot in dot_bound.count_dots(jaxpr)})

    assert batch_dims(PLAIN) == [2]  # jax's own batching keeps the vmap axis beside the batch axis
    assert batch_dims(FOLDED) == [1]  # folded: [3 · 6, ...]
