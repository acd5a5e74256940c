"""Does stratified time sampling (a fixed number of sequences per corruption bucket,
reweighted to stay unbiased) reduce the noise of training compared with drawing t iid?
Compare the train/loss curves' step-to-step noise, the research/gradient_norm_* per bucket
(iid batches leave buckets under- or over-filled, so their norms jump) and val/loss
(exact-weight NELBO on fixed batches), with three seeds per method for error bars. Full
size (base.py's 1200 steps): `python -m tdlm_jax.sweep experiments/time_sampling.py
--size=full --workdir=runs/time_sampling_full`.
"""

from typing import Any

from tdlm_jax.sweeps import runner

BASE_CONFIG = "configs/base.py"

# 6 points × 300 steps: about 15 minutes on 2 idle CPU cores. Logging every 25 steps, so the
# loss curves have enough points to show their noise; research metrics every 50.
CPU_OVERRIDES: dict[str, Any] = {**runner.CPU_SIZE, "training.logging_steps": 25, "training.detailed_metrics_steps": 50}

METHODS = ("stratified", "iid")
SEEDS = (0, 1, 2)


def get_sweep() -> list[dict[str, Any]]:
    """Every time-sampling method at every seed."""
    return [{"diffusion.time_sampling": m, "seed": s} for m in METHODS for s in SEEDS]
