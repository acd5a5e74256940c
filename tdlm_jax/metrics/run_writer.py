"""The writers of a run: TensorBoard, metrics.jsonl and the console on process 0, plus
Weights & Biases when `logging.wandb_project` is set; nothing on the other processes."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax

from tdlm_jax.metrics import writers
from tdlm_jax.metrics.console import Console
from tdlm_jax.metrics.jsonl import METRICS_FILE
from tdlm_jax.metrics.wandb_writer import WandbWriter


def create_default_writer(
    workdir: str,
    *,
    is_primary: bool | None = None,
    wandb_project: str = "",
    wandb_entity: str = "",
    config: Mapping[str, Any] | None = None,
    console: writers.MetricWriter | None = None,
) -> writers.MetricWriter:
    """TensorBoard at `workdir` + `workdir/metrics.jsonl` + console on process 0.

    Other processes get a `NullWriter`, since every process sees the same (all-reduced)
    metrics and only one copy should land on disk. `is_primary` overrides the check.

    A non-empty `wandb_project` adds a `WandbWriter` (run name: the workdir's basename;
    wandb files and the persisted run id under `workdir`) whose run config is `config`.
    `wandb_entity` "" uses wandb's default entity. wandb itself is imported only then.
    `console` is the console's writer (the trainer's has the progress bar), by default a
    `tdlm_jax.metrics.console.Console` without one.

    A resumed run's files (rows and TensorBoard events) are cut back to its checkpoint by
    `tdlm_jax.training.rundir` before this opens them.
    """
    if is_primary is None:
        is_primary = jax.process_index() == 0
    if not is_primary:
        return writers.NullWriter()
    wandb_writers: list[writers.MetricWriter] = []
    if wandb_project:
        # Created first, so that a missing wandb or a failed login raises before any other
        # writer has opened a file.
        wandb_writers.append(WandbWriter(
            project=wandb_project,
            entity=wandb_entity or None,
            run_name=os.path.basename(os.path.normpath(os.path.abspath(workdir))),
            config=config if config is not None else {},
            directory=workdir,
        ))
    return writers.MultiWriter([
        writers.TensorBoardWriter(workdir),
        writers.JsonlWriter(os.path.join(workdir, METRICS_FILE)),
        console if console is not None else Console(num_steps=0, terminal=False),
        *wandb_writers,
    ])
