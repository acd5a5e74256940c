"""AdamW with linear warmup, a decay schedule and global-norm gradient clipping."""

from __future__ import annotations

from typing import Callable

import optax

DECAY_SCHEDULES = ("cosine", "linear", "constant")


def learning_rate_schedule(peak: float, num_steps: int, warmup_steps: int, decay: str,
                           min_ratio: float) -> Callable:
    """Linear warmup from 0 to `peak`, then `decay` down to `min_ratio`·peak at `num_steps`."""
    warmup = optax.linear_schedule(0.0, peak, max(warmup_steps, 1))
    decay_steps = max(num_steps - warmup_steps, 1)
    if decay == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=min_ratio)
    elif decay == "linear":
        after = optax.linear_schedule(peak, peak * min_ratio, decay_steps)
    elif decay == "constant":
        after = optax.constant_schedule(peak)
    else:
        raise ValueError(f"unknown decay {decay!r}; allowed: {', '.join(DECAY_SCHEDULES)}")
    return optax.join_schedules([warmup, after], [warmup_steps])


def make_optimizer(schedule: Callable, *, weight_decay: float, b1: float, b2: float,
                   grad_clip_norm: float) -> optax.GradientTransformation:
    """AdamW on the clipped gradient. `grad_clip_norm` <= 0 turns clipping off."""
    adamw = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay)
    if grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(grad_clip_norm), adamw)
    return adamw
