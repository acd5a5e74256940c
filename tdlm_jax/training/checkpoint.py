"""Saving and restoring the training state and the data-iterator position.

This is the only module of the project that imports orbax, so API changes of orbax stay
contained here. A checkpoint at `<directory>/<step>` holds these items:

  * `train_state`: the training state (params, optimizer state, step counter, raw uint32
    RNG key data) as plain nested dicts of arrays (`to_plain`), written with orbax's
    StandardSave, so plain orbax reads it without this project:
        ocp.StandardCheckpointer().restore("/abs/path/to/<workdir>/checkpoints/<step>/train_state")
    gives {"params": {"blocks": {"0": {"attn": {"qkv": {"kernel": array}}}}}, "opt_state":
    {"1": {"0": {"count", "mu", "nu"}}}, "step", ...}: the names of the parameters and of
    optax's state fields, list positions as "0", "1", ... Checkpoints written before this
    layout hold the pytree itself as `state` instead (flax's boxes as `value` keys); they
    restore as before;
  * `data` (optional): the position of a grain `DatasetIterator`, written by grain's own
    orbax handler as one small JSON file per process;
  * `log` (optional): a JSON tree, the training loop's metric log (open interval, health
    monitor); checkpoints written before it existed restore without it.

Saves are asynchronous: `save` returns once the arrays are copied off the device and the
iterator position is written; the array files are written in a background thread.
`wait_until_finished` / `close` block until that is done.
"""

import os
import re
import sys
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from tdlm_jax.errors import CheckpointError
from tdlm_jax.metrics import jsonl

# Item names inside a step directory; changing them breaks existing checkpoints.
_TRAIN_STATE = "train_state"
_OLD_STATE = "state"  # the pytree as is, before the plain layout
_DATA = "data"
_LOG = "log"
_MAX_REASON_CHARS = 200


def _short_reason(error: BaseException) -> str:
    """First line of an exception message, clipped: tensorstore errors span pages."""
    lines = str(error).strip().splitlines()
    first = lines[0] if lines else ""
    if len(first) > _MAX_REASON_CHARS:
        first = first[:_MAX_REASON_CHARS] + "..."
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def _is_abandoned_read_noise(unraisable: Any) -> bool:
    """Whether an unraisable-exception report is debris of a failed orbax restore or save.

    When one array fails to restore (or to save, e.g. on a full disk), orbax abandons the
    I/O of the other arrays on a closed event loop. Their coroutines later turn GeneratorExit into an exception that
    dumps a page of TensorStore spec each, and tensorstore callbacks report "Event loop
    is closed"; both would bury the one-line CheckpointError.
    """
    coroutine_name = getattr(unraisable.object, "__name__", None)
    if coroutine_name == "_read_array_index_and_device_put":
        return True
    return (
        unraisable.object is None
        and isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == "Event loop is closed"
    )


def _silence_abandoned_io() -> None:
    """Drops the reports of `_is_abandoned_read_noise` from now on; others pass through.

    Installed with the first Checkpointer: a failed save prints this debris before its
    error reaches us, so installing the filter after the failure would be too late.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_tdlm_abandoned_read_filter", False):
        return

    def hook(unraisable: Any) -> None:
        if not _is_abandoned_read_noise(unraisable):
            previous(unraisable)

    hook._tdlm_abandoned_read_filter = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def _check_abstract_state(abstract_state: Any) -> None:
    """Rejects abstract leaves without a sharding, which orbax would place arbitrarily."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state):
        if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
            raise ValueError(
                f"abstract_state leaf {jax.tree_util.keystr(path)} has no sharding; "
                "build it with jax.ShapeDtypeStruct(shape, dtype, sharding=...)"
            )


def _names(path: tuple[Any, ...]) -> tuple[str, ...]:
    """A leaf's path as names: dict keys, field names, list positions; the trailing `value` of
    a flax Variable (a box around the array, not a name of the model's) left out."""
    names = tuple(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path)
    if len(path) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        return names[:-1]
    return names


def to_plain(tree: Any) -> dict[str, Any]:
    """`tree`'s leaves in nested dicts keyed by `_names`: what plain orbax restores."""
    plain: dict[str, Any] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        *parents, last = _names(path)
        node = plain
        for name in parents:
            node = node.setdefault(name, {})
        if last in node:
            raise ValueError(f"two leaves of the state are both named {'/'.join(_names(path))}")
        node[last] = leaf
    return plain


def from_plain(plain: dict[str, Any], like: Any) -> Any:
    """The tree of `like`'s structure holding the leaves of `plain` (`to_plain` of such a tree)."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    leaves = []
    for path, _ in paths:
        node = plain
        for name in _names(path):
            node = node[name]
        leaves.append(node)
    return jax.tree_util.tree_unflatten(treedef, leaves)


class ProcessCountMismatch(CheckpointError):
    """A resume with another number of processes than the checkpoint's: no older one helps."""


def _listdir(path: str) -> list[str]:
    return os.listdir(path) if os.path.isdir(path) else []


class Checkpointer:
    """Keeps the latest `max_to_keep` checkpoints of a training run in `directory`."""

    def __init__(self, directory: str, *, max_to_keep: int = 3) -> None:
        """Opens (creating if needed) the checkpoint directory.

        Args:
            directory: where step directories are written; relative paths are made
                absolute because orbax's tensorstore backend rejects relative ones, and
                only does so in its background thread.
            max_to_keep: how many of the most recent checkpoints to keep.
        """
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        _silence_abandoned_io()
        self._directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            create=True,
            # `max_to_keep` is deprecated in favour of a preservation policy.
            preservation_policy=ocp.checkpoint_managers.LatestN(n=max_to_keep),
        )
        try:
            self._manager = ocp.CheckpointManager(self._directory, options=options)
        except Exception as e:
            raise CheckpointError(
                f"checkpoint directory {self._directory} could not be opened "
                f"({_short_reason(e)}): check that it is a writable directory, "
                "or use a new --workdir"
            ) from e

    @property
    def directory(self) -> str:
        """The absolute checkpoint directory."""
        return self._directory

    def step_directory(self, step: int) -> str:
        """The directory that holds (or would hold) the checkpoint of `step`."""
        return os.path.join(self._directory, str(step))

    def latest_step(self) -> int | None:
        """The most recent finished checkpoint step, or None if there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """All finished checkpoint steps, ascending."""
        return sorted(self._manager.all_steps())

    def quarantine(self, step: int) -> str:
        """Moves an unreadable checkpoint aside (to `<checkpoints>-corrupt/<step>`) and returns
        where; the step can then be saved again, and the evidence is kept for inspection."""
        source = self.step_directory(step)
        target_dir = self._directory.rstrip(os.sep) + "-corrupt"
        os.makedirs(target_dir, exist_ok=True)
        target = os.path.join(target_dir, f"{step}")
        suffix = 1
        while os.path.exists(target):
            target, suffix = os.path.join(target_dir, f"{step}.{suffix}"), suffix + 1
        os.rename(source, target)
        self._manager.reload()
        return target

    def save(self, step: int, state: Any, data_iterator: Any = None, log_state: dict | None = None) -> None:
        """Starts saving `state` (and the iterator position, and the loop's `log_state`) as the
        checkpoint of `step`.

        The caller decides when to save: orbax's own save-interval policy is bypassed.
        Saving a step that already has a checkpoint does nothing (e.g. the final save of
        a run resumed at its last step). The iterator position is captured before this
        returns, so the caller may keep iterating right away.
        """
        step = int(step)
        if step in self._manager.all_steps():
            logging.info("Checkpoint at %s already exists; not saving it again.", self.step_directory(step))
            return
        items = {_TRAIN_STATE: ocp.args.StandardSave(to_plain(state))}
        if data_iterator is not None:
            items[_DATA] = grain.checkpoint.CheckpointSave(data_iterator)
        if log_state is not None:
            items[_LOG] = ocp.args.JsonSave(jsonl.to_json_tree(log_state))
        try:
            # force=True: without it orbax silently skips saves that its default policy
            # dislikes, e.g. a step below the latest one after a rollback.
            self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:
            raise CheckpointError(
                f"checkpoint at {self.step_directory(step)} could not be written "
                f"({_short_reason(e)}): check free disk space and permissions of "
                f"{self._directory}"
            ) from e

    def restore(self, step: int, abstract_state: Any, data_iterator: Any = None) -> Any:
        """Restores the state of checkpoint `step`, and the iterator position in place.

        Args:
            step: a step from `all_steps()`.
            abstract_state: pytree of `jax.ShapeDtypeStruct` with `.sharding` set, with
                the structure, shapes and dtypes of the saved state. Arrays are restored
                with those shardings and cast to those dtypes.
            data_iterator: a grain `DatasetIterator` built like the saved one; its
                position is set to the saved one.

        Returns:
            The restored state pytree.

        Raises:
            CheckpointError: the checkpoint is missing, corrupt or does not match.
        """
        step = int(step)
        _check_abstract_state(abstract_state)
        self.wait_until_finished()  # a checkpoint still being written cannot be read
        if data_iterator is not None:
            self._check_process_count(step)
        plain = os.path.isdir(os.path.join(self.step_directory(step), _TRAIN_STATE))
        target = to_plain(abstract_state) if plain else abstract_state
        name = _TRAIN_STATE if plain else _OLD_STATE
        items = {name: ocp.args.StandardRestore(target)}
        if data_iterator is not None:
            items[_DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._restore_items(step, items)[name]
        return from_plain(restored, abstract_state) if plain else restored

    def _check_process_count(self, step: int) -> None:
        """Each process's data position is its own file (`process_<i>-of-<n>.json`), so a job
        with another number of processes cannot continue the data stream."""
        written = {int(m.group(1)) for name in _listdir(os.path.join(self.step_directory(step), _DATA))
                   if (m := re.fullmatch(r"process_\d+-of-(\d+)\.json", name))}
        if written and written != {jax.process_count()}:
            raise ProcessCountMismatch(
                f"checkpoint {self.step_directory(step)} was written by a {max(written)}-process job and this "
                f"job has {jax.process_count()}: resume with {max(written)} processes (each one's data position "
                "is saved), or start a new --workdir")

    def restore_log(self, step: int) -> dict | None:
        """The `log_state` saved with checkpoint `step`, or None if it has none."""
        if not os.path.isdir(os.path.join(self.step_directory(step), _LOG)):
            return None
        return jsonl.from_json_tree(self._restore_items(int(step), {_LOG: ocp.args.JsonRestore()})[_LOG])

    def _restore_items(self, step: int, items: dict[str, Any]) -> Any:
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            _silence_abandoned_io()
            raise CheckpointError(
                f"checkpoint at {self.step_directory(step)} could not be restored "
                f"({_short_reason(e)}): delete that step directory to fall back to an "
                "earlier one, or use a new --workdir"
            ) from e

    def wait_until_finished(self) -> None:
        """Blocks until every started save is on disk (and old steps are deleted)."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise CheckpointError(
                f"a checkpoint in {self._directory} could not be written "
                f"({_short_reason(e)}): check free disk space and permissions of that directory"
            ) from e

    def close(self) -> None:
        """Waits for pending saves, then releases orbax's resources.

        Raises CheckpointError if a pending save failed; orbax's close would only raise
        the same error again, so it is not attempted then.
        """
        self.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
