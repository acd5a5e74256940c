"""Host-side handling of the step's metrics: interval means kept on the device, and the
conversion of fetched values into what the writers receive.

The train loop adds each step's tier-1 metrics into a running (sum, count) pytree with a
jitted add, so nothing is copied to the host between logging steps. A metric that can be
undefined for a batch (a ratio with an empty denominator: an empty bucket's accuracy, a
correlation over constant weights; the catalogue's `missing`) is NaN on the device; such
NaNs are left out of interval means and are written as missing (None), never as 0. A NaN
in any other metric is a real numerical failure and is written as NaN.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from tdlm_jax.metrics.catalogue import CUMULATIVE, MISSING_WHEN_EMPTY


def empty_interval(names: tuple[str, ...]) -> dict[str, tuple[jax.Array, jax.Array]]:
    return {name: (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)) for name in names}


@jax.jit
def accumulate(interval: dict, metrics: Mapping[str, jax.Array]) -> dict:
    """Adds one step's tier-1 metrics to the interval's (sum, count) pairs, on the device."""
    out = {}
    for name, (total, count) in interval.items():
        value = metrics[name].astype(jnp.float32)
        if name in CUMULATIVE:
            out[name] = (value, jnp.ones((), jnp.float32))
            continue
        skip = jnp.isnan(value) if name in MISSING_WHEN_EMPTY else jnp.zeros((), bool)
        out[name] = (total + jnp.where(skip, 0.0, value), count + jnp.where(skip, 0.0, 1.0))
    return out


def interval_means(interval_host: Mapping[str, tuple[float, float]]) -> dict[str, float | None]:
    """Means of a fetched interval; None where every step's value was undefined."""
    return {name: (float(total) / float(count) if count > 0 else None)
            for name, (total, count) in interval_host.items()}


def perplexity(nats_per_token: float) -> float:
    """exp of a loss in nats, inf where it overflows (above 709.78 nats): never an OverflowError."""
    try:
        return math.exp(nats_per_token)
    except OverflowError:
        return math.inf


def to_host_scalars(values: Mapping[str, jax.Array | np.ndarray | float]) -> dict[str, float | None]:
    """Fetched device scalars as Python floats, with undefined ratios as None (missing)."""
    out = {}
    for name, value in values.items():
        x = float(np.asarray(value))
        out[name] = None if (name in MISSING_WHEN_EMPTY and math.isnan(x)) else x
    return out
