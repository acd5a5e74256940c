"""Does the exact ELBO weight w(t) = −α′(t)/(1 − α(t)) train a better model than the
`uniform` and `clipped` (w ≤ diffusion.weight_clip_max) ablations? All three are judged on
val/loss, which is always the exact-weight NELBO on fixed batches, so the comparison is
fair; two seeds per weighting give each difference an error bar. Full size (base.py's 1200
steps): `python -m tdlm_jax.sweep experiments/loss_weighting.py --size=full
--workdir=runs/loss_weighting_full`.
"""

from typing import Any

from tdlm_jax.sweeps import runner

BASE_CONFIG = "configs/base.py"

# About 2 minutes a point on 2 idle CPU cores (base.py: ~0.4 s/step), 6 points ≈ 13 minutes;
# measured 22 minutes on 2 cores shared with other jobs.
# Research metrics every 100 steps, since base.py's 500 would never fire in 300 steps;
# samples at eval are off because nothing here compares them.
CPU_OVERRIDES: dict[str, Any] = {**runner.CPU_SIZE}

WEIGHTINGS = ("elbo", "uniform", "clipped")
SEEDS = (0, 1)


def get_sweep() -> list[dict[str, Any]]:
    """Every weighting at every seed."""
    return [{"diffusion.loss_weighting": w, "seed": s} for w in WEIGHTINGS for s in SEEDS]
