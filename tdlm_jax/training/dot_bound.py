"""The step against its own matmuls timed alone: what bounds MFU (`bench --mode=dots`).

A model's FLOPs are its matmuls', so a step can reach the MFU target only if its matmuls,
at the shapes the config gives them, run near the peak. This module lists every
`dot_general` in the jaxpr of the ordinary train step, with how many times a step runs it
(the body of a `scan`, such as the gradient-accumulation loop, counts once per iteration;
of a `cond`'s branches, the one with the most matmul FLOPs), times each distinct one alone
as a jitted program in the same round-robin as the step itself, and adds them up.

The sum is what the matmuls alone cost at the speed XLA runs them on their own. If it is
close to the step's time, the step is bound by its matmuls' shapes, not by the work
around them, and MFU cannot pass the rate of those matmuls against the peak, unless XLA
overlaps independent ones: on a multi-core CPU the step can be faster than the sum of its parts.
The attention of cuDNN (a custom call, not a `dot_general`) is not listed.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np

from tdlm_jax.errors import ConfigError
from tdlm_jax.training import benchmark


@dataclasses.dataclass(frozen=True)
class Dot:
    """One distinct `dot_general`: its operands' shapes and dtypes and its parameters."""

    lhs: tuple[int, ...]
    rhs: tuple[int, ...]
    lhs_dtype: str
    rhs_dtype: str
    dimension_numbers: Any  # ((lhs contracting, rhs contracting), (lhs batch, rhs batch))
    out_dtype: str  # the result's (a `preferred_element_type` of None and of the inputs' dtype alike)

    @property
    def flops(self) -> int:
        """2 · (output elements) · (contracted size)."""
        (lc, rc), (lb, _) = self.dimension_numbers
        batch = int(np.prod([self.lhs[i] for i in lb]))
        contracted = int(np.prod([self.lhs[i] for i in lc]))
        lhs_free = int(np.prod(self.lhs)) // (batch * contracted)
        rhs_free = int(np.prod(self.rhs)) // (batch * int(np.prod([self.rhs[i] for i in rc])))
        return 2 * batch * lhs_free * rhs_free * contracted

    def label(self) -> str:
        (lc, rc), (lb, rb) = self.dimension_numbers
        batch = f" batch {tuple(lb)}·{tuple(rb)}" if lb else ""
        out = f" → {self.out_dtype}" if self.out_dtype != self.lhs_dtype else ""
        return (f"{self.lhs_dtype}{list(self.lhs)} · {self.rhs_dtype}{list(self.rhs)} "
                f"contract {tuple(lc)}·{tuple(rc)}{batch}{out}")


def count_dots(jaxpr: jex.Jaxpr, times: int = 1, counts: collections.Counter | None = None
               ) -> collections.Counter:
    """{Dot: how many times one call of `jaxpr` runs it}, through every nested jaxpr."""
    counts = collections.Counter() if counts is None else counts
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            lhs, rhs = (v.aval for v in eqn.invars)
            counts[Dot(tuple(lhs.shape), tuple(rhs.shape), str(lhs.dtype), str(rhs.dtype),
                       eqn.params["dimension_numbers"], str(eqn.outvars[0].aval.dtype))] += times
        elif name == "cond":  # one branch runs: count the costliest
            branches = [count_dots(b.jaxpr) for b in eqn.params["branches"]]
            costliest = max(branches, key=lambda c: sum(d.flops * n for d, n in c.items()))
            for dot, n in costliest.items():
                counts[dot] += n * times
        elif name == "while":
            raise ConfigError("--mode=dots: the step has a while loop, whose trip count a jaxpr does not "
                              "say; only scans and conds are counted")
        else:
            repeat = eqn.params["length"] if name == "scan" else 1
            for sub in jex.jaxprs_in_params(eqn.params):
                count_dots(sub, times * repeat, counts)
    return counts


def dot_fn(dot: Dot) -> Callable[[], jax.Array]:
    """A zero-argument callable running `dot` alone, jitted, on random operands."""
    key_l, key_r = jax.random.split(jax.random.key(0))
    operand = lambda key, shape, dtype: jax.random.normal(key, shape, jnp.float32).astype(dtype)
    lhs, rhs = operand(key_l, dot.lhs, dot.lhs_dtype), operand(key_r, dot.rhs, dot.rhs_dtype)
    run = jax.jit(lambda a, b: jax.lax.dot_general(a, b, dot.dimension_numbers,
                                                   preferred_element_type=dot.out_dtype))
    return lambda: run(lhs, rhs)


def run_dots(setup: benchmark.Setup, *, steps: int, repeats: int, peak_tflops: float = 0.0,
             matmul: tuple[int, Any, int] | None = None) -> dict[str, Any]:
    """The ordinary step and each of its distinct dots, timed round-robin (beside the peak's
    matmul where the peak is measured); per dot its count per step, median seconds and
    FLOP/s; and the totals, as seconds and as fractions of the peak."""
    if jax.device_count() != 1:
        raise ConfigError(f"--mode=dots times one device's matmuls, and jax sees {jax.device_count()} devices: "
                          "run it on one (for fake CPU devices, without --xla_force_host_platform_device_count)")
    closed = jax.make_jaxpr(lambda s, t, v: setup.train_fn(s, t, v, detailed=False))(
        setup.state, setup.tokens, setup.valid)
    counts = count_dots(closed.jaxpr)
    dots = sorted(counts, key=lambda d: -d.flops * counts[d])
    variants: dict[str, Callable[[], Any]] = {"step": setup.step(setup.train_fn, detailed=False)}
    variants.update({f"dot {i}": dot_fn(dot) for i, dot in enumerate(dots)})
    timed = benchmark.time_against_peak(variants, steps=steps, repeats=repeats, peak_tflops=peak_tflops,
                                        matmul=matmul)
    seconds = {name: float(np.median(t)) for name, t in timed.seconds.items()}
    rows = [{"dot": dot.label(), "count": counts[dot], "seconds": seconds[f"dot {i}"],
             "flops_per_second": dot.flops / seconds[f"dot {i}"]} for i, dot in enumerate(dots)]
    alone = sum(row["seconds"] * row["count"] for row in rows)
    flops = sum(dot.flops * counts[dot] for dot in dots)
    peak = timed.peak.flops_per_second
    return {"dots": rows, "step_seconds": seconds["step"], "dots_alone_seconds": alone,
            "dot_flops_per_step": flops, "peak_flops_per_second": peak, "peak_source": timed.peak.source,
            # The step's matmul FLOPs per second of the step, and per second of the matmuls alone:
            # the second is the MFU of a step that ran only its matmuls, one after another.
            "step_dot_fraction_of_peak": flops / seconds["step"] / peak,
            "dots_alone_fraction_of_peak": flops / alone / peak}
