"""Everything about a run's workdir: what it holds, that it is writable and holds nothing
else, that one process writes it, that a resume does not change what the run computes, that
a finished run is left alone, and cutting its files back to the checkpoint a run resumes from.

    <workdir>/config.json          the resolved config (written when new or changed)
              metrics.jsonl        one row per logged step and tier (`tdlm_jax.metrics.jsonl`)
              alerts.jsonl         health alert starts and clears
              summary.json         written when the run finishes
              checkpoints/<step>/  orbax checkpoints: train state, data position, metric log
              tokenizer_info.json  the tokenizer's special ids
              compilation_cache/   compiled steps (training.compilation_cache_dir)
              events.out.tfevents.*  TensorBoard
              .lock                the running process's pid and host
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import socket
from collections.abc import Iterator

import jax
import ml_collections
from absl import logging

from tdlm_jax.data.dataset import TOKENIZER_INFO
from tdlm_jax.errors import CheckpointError, ConfigError
from tdlm_jax.metrics import catalogue, jsonl
from tdlm_jax.metrics.jsonl import ALERTS_FILE, CONFIG_FILE, METRICS_FILE, SAMPLES_FILE, SUMMARY_FILE
from tdlm_jax.metrics.writers import drop_events_after, flatten_hparams
from tdlm_jax.training import config as config_lib
from tdlm_jax.training.compilation import CACHE_SUBDIR
from tdlm_jax.training.setup import CHECKPOINTS

# The files that mark a directory as a run's. The last two are written first (tokenizer_info.json
# by build_run, the compilation cache before it).
RUN_FILES = (CONFIG_FILE, METRICS_FILE, CHECKPOINTS, TOKENIZER_INFO, CACHE_SUBDIR)
# The row files a resume cuts back to its checkpoint.
ROW_FILES = (METRICS_FILE, ALERTS_FILE, SAMPLES_FILE)
LOCK_FILE = ".lock"  # hidden: every host's start-up checks see it as no "other file"

# Keys a resumed run may not change: they define the parameters' shapes, what the data
# iterator's saved position means, or what the loss and the research metrics mean (the
# forward process, the buckets). Everything else (steps, frequencies, learning rate,
# evaluation, logging) may change, and the changes are logged.
STRUCTURAL_KEYS = ("model.", "data.", "diffusion.", "metrics.bucket_edges", "training.batch_size", "seed")
# Keys under those prefixes that change how the run computes or reads, not what it computes:
# evaluation size, input workers and cache location, attention kernel, rematerialization.
CHANGEABLE_KEYS = ("data.eval_batch_size", "data.num_eval_batches", "data.worker_count",
                   "data.prefetch_buffer_size", "data.cache_dir", "model.attention_impl", "model.remat",
                   "model.remat_policy")


def ensure_writable(workdir: str) -> None:
    """A clear error now, rather than a traceback at the first checkpoint or metric write,
    and never a run written into a directory that holds something else (e.g. --workdir=.)."""
    # Hidden files are not "other files": every host of a job runs this at once, and another
    # host's write probe or half-written record (.tokenizer_info.json.*.tmp) may be there.
    others = [n for n in os.listdir(workdir) if not n.startswith(".")] if os.path.isdir(workdir) else []
    if others and not any(os.path.exists(os.path.join(workdir, name)) for name in RUN_FILES):
        raise CheckpointError(f"workdir {workdir} holds other files and no tdlm_jax run: pass a new or empty "
                              "--workdir (the default is runs/<config name>)")
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test.{jax.process_index()}")  # hosts may share the workdir
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(f"workdir {workdir} is not writable ({e.strerror}): free disk space or fix "
                              "permissions, or pass another --workdir")


@contextlib.contextmanager
def locked(workdir: str) -> Iterator[None]:
    """Holds the workdir's exclusive lock while the block runs: one writer per run.

    An advisory `flock` on <workdir>/.lock, which records the holder's pid and host. The
    kernel releases it when the holder dies, however it dies, so a stale lock is simply taken
    over (with a warning naming the dead holder). A multi-host job is one run: only process 0
    takes the lock, the other hosts write no run files.
    """
    if jax.process_index() != 0:
        yield
        return
    path = os.path.join(workdir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise CheckpointError(f"workdir {workdir} is in use by {_holder(fd) or 'another process'}: wait for it "
                                  "to finish or stop it, or pass another --workdir") from None
        previous = _holder(fd)
        if previous:
            logging.warning("took over the lock of %s, which is no longer running", previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # a clean exit leaves no holder to report
    finally:
        os.close(fd)  # releases the lock


def _holder(fd: int) -> str:
    """'process <pid> on <host>' as the lock file records it, or '' if it records none."""
    fields = os.pread(fd, 256, 0).decode(errors="replace").split()
    return f"process {fields[0]} on {fields[1]}" if len(fields) == 2 else ""


def has_checkpoint(workdir: str) -> bool:
    checkpoints = os.path.join(workdir, CHECKPOINTS)
    return os.path.isdir(checkpoints) and any(n.isdigit() for n in os.listdir(checkpoints))


def check_config_change(config: ml_collections.ConfigDict, workdir: str) -> bool:
    """Compares the config with the one the workdir's run saved and refuses structural changes;
    returns whether config.json needs writing (a new run, or an accepted change)."""
    saved_config = jsonl.read_json(os.path.join(workdir, CONFIG_FILE))
    if saved_config is None or not has_checkpoint(workdir):
        return True  # nothing to resume, so nothing to contradict
    saved = flatten_hparams(saved_config)
    current = flatten_hparams(json.loads(config.to_json_best_effort()))
    # A key the saved run predates (added by a later version) counts as unchanged at its default.
    defaults = config_lib.base_defaults()
    changed = {k: (saved.get(k), current.get(k)) for k in sorted(saved.keys() | current.keys())
               if saved.get(k) != current.get(k)
               and not (k not in saved and k in defaults and current.get(k) == defaults[k])}
    if not changed:
        return False
    described = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
    structural = [k for k in changed if k.startswith(STRUCTURAL_KEYS) and k not in CHANGEABLE_KEYS]
    if structural and not config.training.get("allow_config_change", False):
        raise ConfigError(f"config error: resuming {workdir} with a different {', '.join(structural)} "
                          f"({described}): use a new --workdir, or --config.training.allow_config_change=true")
    logging.warning("resuming %s with a changed config: %s", workdir, described)
    return True


def is_finished(workdir: str, restored_step: int, num_steps: int) -> bool:
    """Whether the run restored at `restored_step` already finished its `num_steps`: then it is
    left untouched, with one line saying so. Fewer steps than it has trained are refused."""
    if restored_step > num_steps:
        raise ConfigError(f"config error: training.num_steps={num_steps} is below step {restored_step}, which "
                          f"{workdir} has already trained to: raise it, or use a new --workdir")
    summary = jsonl.read_json(os.path.join(workdir, SUMMARY_FILE)) or {}
    if restored_step == num_steps and summary.get(catalogue.TOTAL_STEPS) == num_steps:
        logging.warning("run finished at step %d of %d; raise training.num_steps to continue, or use a new "
                        "--workdir", restored_step, num_steps)
        return True
    return False


def _is_summary_row(row: dict) -> bool:
    return all(catalogue.tier_of(name) == catalogue.SUMMARY for name in row if name != "step")


def start(workdir: str, config: ml_collections.ConfigDict, resume_step: int, write_config: bool) -> None:
    """Process 0's bookkeeping before the first step: every file of the run cut back to
    `resume_step` (the later rows and TensorBoard events would appear twice: the resumed run
    logs those steps again, and a kill may have left a torn last line; an earlier summary
    belongs to a shorter run this one continues), and the config recorded if `write_config`."""
    for name in ROW_FILES:
        path = os.path.join(workdir, name)
        dropped = jsonl.drop_rows_after(path, resume_step, also=_is_summary_row)
        if dropped:
            logging.info("%s: dropped %d row(s) after step %d, which this run logs again", path, dropped, resume_step)
    drop_events_after(workdir, resume_step)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(workdir, SUMMARY_FILE))
    if write_config:
        with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def best_logged_val_loss(workdir: str, up_to_step: int) -> float:
    """The best val/loss already logged by earlier runs of this workdir, up to the resume step."""
    if not up_to_step:
        return math.inf
    values = [row[catalogue.VAL_LOSS] for row in jsonl.read(os.path.join(workdir, METRICS_FILE))
              if row.get(catalogue.VAL_LOSS) is not None and row["step"] <= up_to_step]
    return min(values, default=math.inf)


def write_summary(workdir: str, summary: dict) -> None:
    with open(os.path.join(workdir, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=2)
