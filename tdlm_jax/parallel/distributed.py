"""Joining a multi-host job: whether and how to call `jax.distributed.initialize()`.

`plan` is a pure function of the flags and the environment; `initialize` carries the plan
out. tdlm_jax.main calls both before anything touches the JAX backend, which
`jax.distributed.initialize` requires.

When to initialize:

* Manual setup: a coordinator address, process count and process id, from the flags
  `--coordinator_address`, `--num_processes`, `--process_id`, or else the environment
  variables JAX_COORDINATOR_ADDRESS (which JAX itself also reads), JAX_NUM_PROCESSES and
  JAX_PROCESS_ID. All three are needed unless a cluster is detected, in which case the given
  ones override what the cluster says. A process count of 1 means a single-process run.
* Cluster auto-detection, with the environment variables JAX's own cluster classes read
  (jax/_src/clusters): SLURM (SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID
  and SLURM_LOCALID all set, as inside `srun`), Open MPI (OMPI_MCA_orte_hnp_uri, as under
  `mpirun`), and Cloud TPU VMs (detected by JAX at import). JAX then finds the coordinator,
  count and id itself. A SLURM or MPI job of a single task stays single-process.
* `--cluster_detection_method` names one of JAX's methods explicitly (e.g. 'mpi4py' for
  other MPIs, or 'k8s'), which are opt-in because they need extra packages.
* Otherwise (a laptop, a single GPU machine) nothing is initialized.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

from tdlm_jax.errors import ConfigError

ENV_COORDINATOR_ADDRESS = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
OMPI_URI = "OMPI_MCA_orte_hnp_uri"
CLUSTER_DETECTION_METHODS = ("slurm", "ompi", "mpi4py", "gcetpu", "gketpu", "k8s")


@dataclasses.dataclass(frozen=True)
class Plan:
    """The arguments of `jax.distributed.initialize`; None leaves a value to JAX's detection."""

    source: str  # 'manual', 'slurm', 'ompi', 'tpu' or the explicit detection method
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    cluster_detection_method: str | None = None
    initialization_timeout: int = 300  # seconds to wait for every process to join

    def kwargs(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "source" and v is not None}


def _int_value(value: int | str | None, flag: str, env: str) -> int | None:
    if value is None or isinstance(value, int):
        return value
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{env}={value!r} is not an integer: set it (or --{flag}) to a whole number") from None


def detect_cluster(environ: Mapping[str, str], on_cloud_tpu: bool = False) -> str | None:
    """The multi-process environment this process runs in, or None: 'tpu', 'slurm' or 'ompi'."""
    if on_cloud_tpu:
        return "tpu"
    if all(v in environ for v in SLURM_VARS) and _task_count(environ, "SLURM_NTASKS") > 1:
        return "slurm"
    if OMPI_URI in environ and _task_count(environ, "OMPI_COMM_WORLD_SIZE") > 1:
        return "ompi"
    return None


def _task_count(environ: Mapping[str, str], name: str) -> int:
    """A launcher's task count; an unreadable one counts as many (JAX's detection then decides)."""
    try:
        return int(environ.get(name, "2"))
    except ValueError:
        return 2


def plan(*, coordinator_address: str | None = None, num_processes: int | None = None,
         process_id: int | None = None, cluster_detection_method: str | None = None,
         environ: Mapping[str, str] | None = None, on_cloud_tpu: bool = False) -> Plan | None:
    """How this process should join a multi-host job, or None for a single-process run.

    Flags (the keyword arguments) win over the environment variables; see the module
    docstring for the rules. Raises ConfigError for an incomplete or inconsistent setup.
    """
    environ = os.environ if environ is None else environ
    coordinator_address = coordinator_address or environ.get(ENV_COORDINATOR_ADDRESS) or None
    num_processes = _int_value(num_processes if num_processes is not None else environ.get(ENV_NUM_PROCESSES),
                               "num_processes", ENV_NUM_PROCESSES)
    process_id = _int_value(process_id if process_id is not None else environ.get(ENV_PROCESS_ID),
                            "process_id", ENV_PROCESS_ID)
    manual = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    if num_processes is not None and num_processes < 1:
        raise ConfigError(f"--num_processes={num_processes}: must be at least 1")
    if process_id is not None and (process_id < 0 or (num_processes is not None and process_id >= num_processes)):
        raise ConfigError(f"--process_id={process_id}: must be in [0, --num_processes)"
                          + (f" = [0, {num_processes})" if num_processes is not None else ""))
    if coordinator_address is not None and not _looks_like_host_port(coordinator_address):
        raise ConfigError(f"--coordinator_address={coordinator_address!r}: must be host:port of process 0, "
                          "e.g. 10.0.0.1:1234")

    if cluster_detection_method:
        if cluster_detection_method not in CLUSTER_DETECTION_METHODS:
            raise ConfigError(f"--cluster_detection_method={cluster_detection_method!r}: must be one of "
                              f"{', '.join(CLUSTER_DETECTION_METHODS)}")
        return Plan(source=cluster_detection_method, cluster_detection_method=cluster_detection_method, **manual)
    detected = detect_cluster(environ, on_cloud_tpu)
    if detected is not None:
        return Plan(source=detected, **manual)
    if all(v is None for v in manual.values()) or num_processes == 1:
        return None
    missing = [f"--{k} ({env})" for (k, v), env in zip(
        manual.items(), (ENV_COORDINATOR_ADDRESS, ENV_NUM_PROCESSES, ENV_PROCESS_ID)) if v is None]
    if missing:
        raise ConfigError(f"a multi-host run needs a coordinator address, a process count and a process id; "
                          f"missing {', '.join(missing)}: pass all three, or none for a single-process run")
    return Plan(source="manual", **manual)


def _looks_like_host_port(address: str) -> bool:
    host, _, port = address.rpartition(":")
    return bool(host) and port.isdigit()


def on_cloud_tpu() -> bool:
    """Whether JAX detected a Cloud TPU VM when it was imported (this does not start the backend)."""
    try:
        from jax._src import cloud_tpu_init  # private, hence the guard: a rename must not break CPU runs
    except ImportError:
        return False
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def initialize(the_plan: Plan | None) -> None:
    """Calls `jax.distributed.initialize` as planned; nothing for None or if already initialized.

    Must run before anything touches the backend (jax.devices(), any computation). A
    process that cannot join (a wrong address, a missing peer) fails after the plan's
    timeout with a one-line ConfigError instead of hanging.
    """
    import jax  # here, so that planning (and --help) does not import JAX

    if the_plan is None or jax.distributed.is_initialized():
        return
    try:
        jax.distributed.initialize(**the_plan.kwargs())
    except Exception as e:  # XlaRuntimeError (a timeout, a refused connection), RuntimeError, ValueError
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ConfigError(f"joining the multi-host job ({the_plan.source}) failed ({reason}): check that "
                          "every process was started with the same coordinator address and process count, "
                          "and a distinct process id") from e
