"""A batched two-operand einsum that folds a `jax.vmap` axis into its own batch axis.

Tier 2's per-row gradients (`metrics.research.per_row_bucket_gradients`) run the model
under a `jax.vmap` over rows, so the attention core's batched matmuls, [B·N, L, H] in the
model, become [rows, B·N, L, H] with two batch dimensions. XLA:CPU keeps both and runs
them at about 0.6 of the speed of the same matmuls with one batch dimension of rows × B·N
(docs/performance.md, "The peak in two layouts, and what bounds MFU"). `folded_einsum`
computes the same einsum, but under `vmap` it reshapes [V, X, ...] to [V·X, ...] (free:
the two axes are adjacent and major) and back, in the forward pass and in both matmuls
of its backward pass, under any number of nested `vmap`s.

`jax.custom_batching.custom_vmap` gives the batching rule; it has no reverse-mode rule of
its own, so the einsum is also a `jax.custom_vjp` whose backward pass is two more folded
einsums, the same contractions autodiff would take. Values and gradients equal
`jnp.einsum`'s (tested, also under nested `vmap`s and with one operand unbatched).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp


def _terms(spec: str) -> tuple[str, str, str]:
    inputs, out = spec.split("->")
    a, b = inputs.split(",")
    return a, b, out


@functools.lru_cache(maxsize=None)
def _folded(spec: str, preferred_element_type: Any):
    """The einsum `spec` (every term starting with the shared batch index) as a custom_vmap
    function whose batching rule folds the vmap axis into that batch index."""
    einsum = functools.partial(jnp.einsum, spec, preferred_element_type=preferred_element_type)

    @jax.custom_batching.custom_vmap
    def run(a, b):
        return einsum(a, b)

    @run.def_vmap
    def fold(axis_size, in_batched, a, b):
        a, b = (x if batched else jnp.broadcast_to(x, (axis_size, *x.shape)) for x, batched in zip((a, b), in_batched))
        merged = lambda x: x.reshape(axis_size * x.shape[1], *x.shape[2:])
        out = run(merged(a), merged(b))  # itself folded again under an outer vmap
        return out.reshape(axis_size, -1, *out.shape[1:]), True

    return run


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def folded_einsum(spec: str, a: jax.Array, b: jax.Array, preferred_element_type: Any = None) -> jax.Array:
    """`jnp.einsum(spec, a, b, preferred_element_type=...)` for a batched contraction whose
    three terms all start with the same batch index (e.g. "xqh,xkh->xqk"), and in which
    every other index appears in exactly two terms; under `vmap` the vmapped axis is folded
    into the batch index (module docstring)."""
    return _folded(spec, preferred_element_type)(a, b)


def _forward(spec, a, b, preferred_element_type):
    return folded_einsum(spec, a, b, preferred_element_type), (a, b)


def _backward(spec, preferred_element_type, residuals, g):
    a, b = residuals
    ta, tb, to = _terms(spec)
    # Each index of a term is in exactly one other: the cotangent of an operand is the
    # einsum of the output's cotangent with the other operand, onto that operand's indices.
    da = _folded(f"{to},{tb}->{ta}", jnp.float32)(g, b)
    db = _folded(f"{to},{ta}->{tb}", jnp.float32)(g, a)
    return da.astype(a.dtype), db.astype(b.dtype)


folded_einsum.defvjp(_forward, _backward)
