"""An optional Weights & Biases `MetricWriter`, enabled by `config.logging.wandb_project`.

wandb is imported only when a `WandbWriter` is created, so the package and its tests
work without it (`pip install -e '.[wandb]'` adds it).

wandb requires the step of each `log` call to be non-decreasing and drops, with a
warning, anything logged to a step below its current one. The trainer writes several
rows at one step (the tier-1 row, the research row and the validation row at step 500),
so this writer merges the rows of a step into one and hands it to wandb, committed,
only when a later step arrives, on `flush` and on `close`.
"""

import html
import os
import uuid
from collections.abc import Mapping
from typing import Any

from absl import logging

from tdlm_jax.errors import ConfigError
from tdlm_jax.metrics.writers import MetricWriter, as_scalar

# The run id of a workdir, so that a resumed run (same workdir) continues its wandb run.
RUN_ID_FILENAME = "wandb_run_id.txt"

_NOT_INSTALLED = (
    "logging.wandb_project is set but wandb is not installed: pip install -e '.[wandb]' "
    "or set --config.logging.wandb_project=''"
)


def load_or_create_run_id(directory: str, new_id: str) -> str:
    """Returns the run id stored in `<directory>/wandb_run_id.txt`, storing `new_id` if none is.

    The file is written through a temporary file and a rename, so that a run killed
    while writing it cannot leave an empty id behind.
    """
    path = os.path.join(directory, RUN_ID_FILENAME)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            run_id = f.read().strip()
        if run_id:
            return run_id
    os.makedirs(directory, exist_ok=True)
    tmp_path = f"{path}.tmp"
    with open(tmp_path, "w", encoding="utf-8") as f:
        f.write(new_id + "\n")
    os.replace(tmp_path, path)
    return new_id


def _plain(value: Any) -> Any:
    """Converts a ConfigDict (or any mapping) into nested plain dicts for wandb's config."""
    if hasattr(value, "to_dict"):  # ml_collections.ConfigDict is not a Mapping
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


class WandbWriter(MetricWriter):
    """Logs scalars, texts and hyperparameters to one wandb run.

    Scalars of `None` (missing) are skipped, never logged as 0; NaN and +-inf are logged
    as floats. Texts are logged as `wandb.Html` (an escaped `<pre>` block, so that the
    newlines of generated samples survive), which also works offline. Hyperparameters
    update the run config.
    """

    def __init__(
        self,
        *,
        project: str,
        entity: str | None,
        run_name: str,
        config: Mapping[str, Any],
        directory: str,
        run_id: str | None = None,
    ) -> None:
        """Starts (or resumes) the wandb run.

        Args:
            project: the wandb project.
            entity: the team or user; `None` or "" uses wandb's default.
            run_name: the run's display name.
            config: the resolved config, logged as the run config.
            directory: where wandb keeps its files (`<directory>/wandb/`); also where
                the run id is persisted when `run_id` is `None`.
            run_id: the wandb run id; `None` reads it from (or creates it in)
                `<directory>/wandb_run_id.txt`, so that restarting in the same
                directory continues the same wandb run.
        """
        try:
            import wandb  # pylint: disable=import-outside-toplevel
        except ImportError as e:
            raise ConfigError(_NOT_INSTALLED) from e
        self._wandb = wandb
        os.makedirs(directory, exist_ok=True)
        if run_id is None:
            # Random rather than a hash of the path: a deleted and recreated workdir
            # starts a new wandb run instead of appending to the old one's history.
            run_id = load_or_create_run_id(directory, uuid.uuid4().hex[:12])
        try:
            self._run = wandb.init(
                project=project,
                entity=entity or None,
                name=run_name,
                id=run_id,
                resume="allow",  # continue the run of this id if it exists, else create it
                dir=directory,
                config=_plain(config),
            )
        except wandb.errors.Error as e:
            # E.g. no API key or no server: a user error, reported in one line.
            raise ConfigError(
                f"could not start the wandb run ({e}); run `wandb login`, set WANDB_MODE=offline "
                "or set --config.logging.wandb_project=''"
            ) from e
        # The pending step's merged row; it reaches wandb once the step is over.
        self._pending_step: int | None = None
        self._pending: dict[str, Any] = {}
        # A resumed run continues after its last logged step; wandb would drop earlier ones.
        self._next_step = int(self._run.starting_step)
        self._warned_old_step = False

    def _stage(self, step: int, values: Mapping[str, Any]) -> None:
        """Adds `values` to the row of `step`, committing the pending row if `step` is later."""
        step = int(step)
        if self._pending_step is not None and step > self._pending_step:
            self._commit()
        current = self._next_step if self._pending_step is None else self._pending_step
        if step < current:
            # wandb would drop it with a warning per call; one clear warning is enough, and
            # training goes on (TensorBoard and metrics.jsonl still get every row). This
            # happens when a run resumes from a checkpoint older than its last logged
            # step, or when a step is written to again after `flush`.
            if not self._warned_old_step:
                logging.warning(
                    "wandb: dropping metrics of step %d (and of any later such step): the "
                    "wandb run is already at step %d (a run resumed from an earlier "
                    "checkpoint, or a write after flush() at the same step)", step, current)
                self._warned_old_step = True
            return
        self._pending_step = step
        self._pending.update(values)

    def _commit(self) -> None:
        """Logs the pending row, committed, so that wandb writes it now."""
        if self._pending_step is None:
            return
        if self._pending:  # a step whose values were all missing does not reach wandb
            self._run.log(self._pending, step=self._pending_step, commit=True)
            self._next_step = self._pending_step + 1
        self._pending_step, self._pending = None, {}

    def write_scalars(self, step: int, scalars: Mapping[str, float | None]) -> None:
        values: dict[str, Any] = {}
        for key, value in scalars.items():
            # as_scalar keeps counters as ints and gives NaN/inf as Python floats, which
            # wandb records as NaN/Infinity.
            value = as_scalar(value)
            if value is not None:  # missing: no point on the curve rather than a 0
                values[key] = value
        self._stage(step, values)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        values = {
            key: self._wandb.Html(f"<pre>{html.escape(text)}</pre>", inject=False)
            for key, text in texts.items()
        }
        self._stage(step, values)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        # The trainer also passes the config at init; a later update may change values.
        self._run.config.update(_plain(hparams), allow_val_change=True)

    def flush(self) -> None:
        # Hands the pending row to wandb now, but that ends its step for wandb: a later
        # row at the same step is dropped (with a warning). The trainer never flushes
        # mid-step; it only closes.
        self._commit()

    def close(self) -> None:
        self._finish(exit_code=0)

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        # A run that ends with an exception shows up as failed in the wandb UI.
        self._finish(exit_code=0 if exc_type is None else 1)

    def _finish(self, exit_code: int) -> None:
        if self._run is None:  # already closed
            return
        self._commit()
        self._run.finish(exit_code=exit_code)
        self._run = None
