"""How far is the masked diffusion model's likelihood bound from an autoregressive model's
exact likelihood at an equal token budget? Both points share base.py's data, tokenizer,
transformer, batch size, seq_len and number of steps, and differ only in `model.kind`
(diffusion vs ar), so val/loss (the diffusion NELBO, an upper bound, vs the AR exact NLL,
both in nats per byte) compares the objectives; two seeds each give error bars. The AR
points log no diffusion metrics (— in the comparison). Full size (base.py's 1200 steps):
`python -m tdlm_jax.sweep experiments/diffusion_vs_ar.py --size=full
--workdir=runs/diffusion_vs_ar_full`.
"""

from typing import Any

from tdlm_jax.sweeps import runner

BASE_CONFIG = "configs/base.py"

# 4 points × 300 steps: about 10 minutes on 2 idle CPU cores.
CPU_OVERRIDES: dict[str, Any] = {**runner.CPU_SIZE}

KINDS = ("diffusion", "ar")
SEEDS = (0, 1)


def get_sweep() -> list[dict[str, Any]]:
    """Both objectives at every seed, everything else equal."""
    return [{"model.kind": k, "seed": s} for k in KINDS for s in SEEDS]
