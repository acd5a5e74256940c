"""Does variance-aware time sampling let the exact ELBO weight train as well as the biased
weightings? Five designs, three seeds each: t drawn `iid`, `stratified` (the default) or
`adaptive` (importance sampling from a learned proposal q, reweighted by p/q) with the exact
weight, and the `uniform` and `clipped` weightings under stratified sampling, which buy
lower variance with bias. Compare best val/loss (always the exact-weight NELBO on fixed
batches), the per-bucket gradient norms and their balance, and the estimator's own noise
(research/loss_estimator_stderr). The spread of the training-loss estimate at one fixed
checkpoint under each design comes from `experiments/loss_estimate_spread.py` on this
sweep's runs. Full size (base.py's 1200 steps): `python -m tdlm_jax.sweep
experiments/time_sampling.py --size=full --workdir=runs/time_sampling_full`.
"""

from typing import Any

from tdlm_jax.sweeps import runner

BASE_CONFIG = "configs/base.py"

# 15 points × 300 steps: about 30 minutes on 2 idle CPU cores. Research metrics every 50
# steps, so the adaptive proposal (uniform for its first 100 steps) is seen as it moves.
CPU_OVERRIDES: dict[str, Any] = {**runner.CPU_SIZE, "training.logging_steps": 25, "training.detailed_metrics_steps": 50}

DESIGNS = (
    {"diffusion.time_sampling": "stratified", "diffusion.loss_weighting": "elbo"},
    {"diffusion.time_sampling": "iid", "diffusion.loss_weighting": "elbo"},
    {"diffusion.time_sampling": "adaptive", "diffusion.loss_weighting": "elbo"},
    {"diffusion.time_sampling": "stratified", "diffusion.loss_weighting": "uniform"},
    {"diffusion.time_sampling": "stratified", "diffusion.loss_weighting": "clipped"},
)
SEEDS = (0, 1, 2)


def get_sweep() -> list[dict[str, Any]]:
    """Every design at every seed."""
    return [{**design, "seed": s} for design in DESIGNS for s in SEEDS]
