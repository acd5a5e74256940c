"""Which noise schedule α(t) trains the best model at a fixed budget: `linear` (1 − t, with
the ELBO weight 1/t), `cosine`, `polynomial` (1 − t^k, diffusion.polynomial_power) or
`loglinear` (MDLM)? In continuous time the NELBO is invariant to the schedule, so any gap
in val/loss (exact-weight NELBO on fixed batches) comes from the variance of the training
estimator and where it spends its masking rates; two seeds per schedule give the gaps
error bars. Full size (base.py's 1200 steps): `python -m tdlm_jax.sweep
experiments/schedule.py --size=full --workdir=runs/schedule_full`.
"""

from typing import Any

from tdlm_jax.sweeps import runner

BASE_CONFIG = "configs/base.py"

# 8 points × 200 steps: about 14 minutes on 2 idle CPU cores.
CPU_OVERRIDES: dict[str, Any] = {**runner.CPU_SIZE, "training.num_steps": 200}

SCHEDULES = ("linear", "cosine", "polynomial", "loglinear")
SEEDS = (0, 1)


def get_sweep() -> list[dict[str, Any]]:
    """Every schedule at every seed."""
    return [{"diffusion.schedule": s, "seed": seed} for s in SCHEDULES for seed in SEEDS]
