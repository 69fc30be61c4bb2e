"""Multi-process runs on JAX's own distributed runtime (``jax.distributed``), set up from the
environment before anything touches a device.

Where the process count and rank come from, first match wins:

=============  ==============================================================================
explicit       ``T5X_LITE_COORDINATOR`` (host:port of process 0), ``T5X_LITE_NUM_PROCESSES``,
               ``T5X_LITE_PROCESS_ID`` -- all three, or an error naming the missing ones
               (``launch/local.sh`` and ``launch/multihost.sh`` set them)
slurm          ``srun`` with more than one task: JAX's own SLURM detection
ompi           ``mpirun`` of Open MPI 4 (``OMPI_MCA_orte_hnp_uri``): JAX's own detection
single         none of the above: one process, nothing to join
=============  ==============================================================================

Also read: ``T5X_LITE_LOCAL_DEVICE_IDS`` (GPUs this process drives, e.g. ``0,1,2,3``; under
SLURM and Open MPI derived from the GPUs the scheduler made visible and the tasks per node),
``T5X_LITE_INIT_TIMEOUT`` (seconds every process waits for all to join; default 300) and
``T5X_LITE_CPU_DEVICES`` (N fake CPU devices per process, with gloo collectives across
processes: multi-process runs on a machine without accelerators).

A run that does not fully join within the timeout stops every process; JAX's coordinator
(process 0) then names the processes that never connected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
from typing import Mapping, Optional
from unittest import mock

from t5x_lite.config import ConfigError

EXPLICIT_VARS = ("T5X_LITE_COORDINATOR", "T5X_LITE_NUM_PROCESSES", "T5X_LITE_PROCESS_ID")
LOCAL_DEVICES_VAR = "T5X_LITE_LOCAL_DEVICE_IDS"
TIMEOUT_VAR = "T5X_LITE_INIT_TIMEOUT"
CPU_DEVICES_VAR = "T5X_LITE_CPU_DEVICES"
DEFAULT_TIMEOUT_S = 300
# What JAX's SLURM detection reads (jax/_src/clusters/slurm_cluster.py).
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
OMPI_URI_VAR = "OMPI_MCA_orte_hnp_uri"

_JOINED: Optional["Launch"] = None


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process takes part in the run.

    ``coordinator``/``num_processes``/``process_id`` are None where JAX's cluster detection
    fills them in (slurm, ompi); ``local_device_ids`` None = every device the process sees.
    """

    source: str  # "single" | "explicit" | "slurm" | "ompi"
    coordinator: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    local_device_ids: Optional[tuple[int, ...]] = None
    cpu_devices: Optional[int] = None
    timeout_s: int = DEFAULT_TIMEOUT_S

    @property
    def multi_process(self) -> bool:
        return self.source != "single"


# ------------------------------------------------------------------ environment


def _int_var(env: Mapping[str, str], name: str, minimum: int, hint: str = "") -> Optional[int]:
    text = env.get(name)
    if text is None or text == "":
        return None
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ConfigError(f"{name}={text!r} must be an integer >= {minimum}{hint}")
    return value


def _device_ids(text: str, name: str) -> tuple[int, ...]:
    try:
        ids = tuple(int(x) for x in text.split(","))
    except ValueError:
        ids = ()
    if not ids or min(ids) < 0 or len(set(ids)) != len(ids):
        raise ConfigError(f"{name}={text!r} must list distinct device indices, e.g. 0,1,2,3")
    return ids


def _check_coordinator(address: str) -> str:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"T5X_LITE_COORDINATOR={address!r} must be HOST:PORT of process 0, e.g. 10.0.0.1:12355")
    return address


def _local_device_ids(env: Mapping[str, str], local_rank: int, tasks_here: int) -> Optional[tuple[int, ...]]:
    """GPUs a scheduled task drives, as indices into the devices it sees.

    JAX's detection pins task ``local_rank`` to GPU ``local_rank``: right for one task per GPU
    with all GPUs visible, wrong for one task per node (it would drive GPU 0 only) and for
    tasks the scheduler already bound to their own GPU (index ``local_rank`` does not exist).
    """
    if env.get(LOCAL_DEVICES_VAR):
        return _device_ids(env[LOCAL_DEVICES_VAR], LOCAL_DEVICES_VAR)
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if not visible:
        return None  # no GPU list from the scheduler (CPU nodes): JAX's default
    count = len(visible.split(","))
    if tasks_here == 1 or count == 1 or env.get("SLURM_GPUS_PER_TASK"):
        return tuple(range(count))  # every visible GPU is this task's
    if count % tasks_here:
        raise ConfigError(
            f"{count} GPUs are visible to {tasks_here} tasks on this node, which does not split evenly; "
            f"set {LOCAL_DEVICES_VAR} (e.g. 0,1) for each task, or run one task per GPU or per node")
    per_task = count // tasks_here
    return tuple(range(local_rank * per_task, (local_rank + 1) * per_task))


def _slurm(env: Mapping[str, str], timeout_s: int, cpu_devices: Optional[int]) -> Optional[Launch]:
    """A ``srun`` step of several tasks; None for a single-task job."""
    ntasks = _int_var(env, "SLURM_STEP_NUM_TASKS", 1) or _int_var(env, "SLURM_NTASKS", 1) or 1
    if ntasks == 1:
        return None
    missing = [v for v in SLURM_VARS if v not in env]
    if missing:
        raise ConfigError(
            f"SLURM job {env.get('SLURM_JOB_ID')} has {ntasks} tasks but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set: start every task with `srun t5x-lite ...` "
            "(see launch/slurm.sbatch), not directly from the batch script")
    nodes = _int_var(env, "SLURM_STEP_NUM_NODES", 1) or _int_var(env, "SLURM_NNODES", 1) or 1
    return Launch("slurm", num_processes=ntasks, process_id=int(env["SLURM_PROCID"]),
                  local_device_ids=_local_device_ids(env, int(env["SLURM_LOCALID"]), max(1, ntasks // nodes)),
                  cpu_devices=cpu_devices, timeout_s=timeout_s)


def _ompi(env: Mapping[str, str], timeout_s: int, cpu_devices: Optional[int]) -> Optional[Launch]:
    """An Open MPI ``mpirun`` of several ranks; None outside one."""
    size = _int_var(env, "OMPI_COMM_WORLD_SIZE", 1) or 1
    if size == 1:
        return None
    if OMPI_URI_VAR not in env:
        raise ConfigError(
            f"Open MPI started {size} ranks but {OMPI_URI_VAR} is not set (Open MPI 5 / PMIx, which JAX does "
            "not detect): also export T5X_LITE_COORDINATOR=<host of rank 0>:<free port>, "
            "T5X_LITE_NUM_PROCESSES=$OMPI_COMM_WORLD_SIZE and T5X_LITE_PROCESS_ID=$OMPI_COMM_WORLD_RANK")
    local = _int_var(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0) or 0
    tasks_here = _int_var(env, "OMPI_COMM_WORLD_LOCAL_SIZE", 1) or 1
    return Launch("ompi", num_processes=size, process_id=_int_var(env, "OMPI_COMM_WORLD_RANK", 0),
                  local_device_ids=_local_device_ids(env, local, tasks_here),
                  cpu_devices=cpu_devices, timeout_s=timeout_s)


def from_environment(env: Optional[Mapping[str, str]] = None) -> Launch:
    """Read how this process joins the run from ``env`` (default ``os.environ``); touches no device.

    Raises ConfigError for a half-described run (some explicit variables set but not all,
    a SLURM job of several tasks outside ``srun``...) and for malformed values.
    """
    env = os.environ if env is None else env
    timeout_s = _int_var(env, TIMEOUT_VAR, 1, " (seconds)") or DEFAULT_TIMEOUT_S
    cpu_devices = _int_var(env, CPU_DEVICES_VAR, 1, " (fake CPU devices per process)")
    given = [v for v in EXPLICIT_VARS if env.get(v)]
    if given:
        missing = [v for v in EXPLICIT_VARS if not env.get(v)]
        if missing:
            raise ConfigError(
                f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} set but {', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not: a multi-process run needs all of "
                f"{', '.join(EXPLICIT_VARS)} on every process (or none, for one process)")
        num = _int_var(env, "T5X_LITE_NUM_PROCESSES", 1)
        pid = _int_var(env, "T5X_LITE_PROCESS_ID", 0)
        if pid >= num:
            raise ConfigError(f"T5X_LITE_PROCESS_ID={pid} must be below T5X_LITE_NUM_PROCESSES={num} "
                              f"(processes are numbered 0..{num - 1})")
        ids = _device_ids(env[LOCAL_DEVICES_VAR], LOCAL_DEVICES_VAR) if env.get(LOCAL_DEVICES_VAR) else None
        return Launch("explicit", _check_coordinator(env["T5X_LITE_COORDINATOR"]), num, pid, ids,
                      cpu_devices, timeout_s)
    launch = _ompi(env, timeout_s, cpu_devices) if OMPI_URI_VAR in env or "OMPI_COMM_WORLD_SIZE" in env else None
    if launch is None and "SLURM_JOB_ID" in env:
        launch = _slurm(env, timeout_s, cpu_devices)
    if launch is not None:
        return launch
    if env.get(LOCAL_DEVICES_VAR):
        raise ConfigError(f"{LOCAL_DEVICES_VAR} is set but no multi-process run is described: also set "
                          f"{', '.join(EXPLICIT_VARS)}, or start under srun / mpirun")
    return Launch("single", cpu_devices=cpu_devices, timeout_s=timeout_s)


# ----------------------------------------------------------------------- joining


def _configure_cpu(launch: Launch) -> None:
    """``T5X_LITE_CPU_DEVICES=N``: N fake CPU devices in this process, and gloo for collectives
    between processes (JAX's default CPU collectives in 0.10, stated so that it stays so)."""
    import jax

    if launch.cpu_devices is None:
        return
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", launch.cpu_devices)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


@contextlib.contextmanager
def _coordinator_names_missing(timeout_s: int):
    """Make JAX's coordinator give up on registration at ``timeout_s``, before the processes do.

    ``jax.distributed.initialize`` leaves the coordinator's registration deadline at its
    default (much longer than ``initialization_timeout``), so a process that never joins ends
    the run with a bare DEADLINE_EXCEEDED. When the coordinator's deadline passes first, its
    error names the missing processes ("Some timed out task names: 2") in every joined
    process's log. JAX has no public argument for it (0.10, 0.11), hence this narrow patch of
    the one factory call; without that private function the run still works, unnamed.
    """
    from jax._src import distributed as jax_distributed

    factory = getattr(jax_distributed._jax, "get_distributed_runtime_service", None)
    if factory is None:
        yield
        return

    def service(*args, **kwargs):
        try:
            return factory(*args, cluster_register_timeout=timeout_s, **kwargs)
        except TypeError:  # a jaxlib without that argument
            return factory(*args, **kwargs)

    with mock.patch.object(jax_distributed._jax, "get_distributed_runtime_service", service):
        yield


def _timeout_notice(launch: Launch, where: str) -> threading.Timer:
    """Explains, just before JAX stops the process, what a join timeout means."""

    def notice():
        print(f"t5x_lite.distributed: {where} has waited {launch.timeout_s} s ({TIMEOUT_VAR}) for all "
              f"{launch.num_processes or 'scheduled'} processes to join jax.distributed, and stops. JAX's "
              "coordinator (process 0) names the processes that never joined after 'Some timed out task "
              "names:' (T5X_LITE_PROCESS_ID / SLURM_PROCID / MPI rank); without that line, the coordinator "
              f"itself ({launch.coordinator or 'process 0'}) never came up. Check that they were started, with "
              f"the same coordinator and process count; read their logs; or raise {TIMEOUT_VAR}.",
              file=sys.stderr, flush=True)

    timer = threading.Timer(max(0.5, launch.timeout_s - 0.5), notice)
    timer.daemon = True
    return timer


def join(launch: Launch) -> None:
    """``jax.distributed.initialize`` for ``launch`` (configures CPU devices first)."""
    import jax
    from jax._src import distributed as jax_distributed

    _configure_cpu(launch)
    if not launch.multi_process:
        return
    where = (f"process {launch.process_id} of {launch.num_processes}" if launch.process_id is not None
             else "this process")
    timer = _timeout_notice(launch, where)
    timer.start()
    try:
        with _coordinator_names_missing(launch.timeout_s):
            jax.distributed.initialize(
                coordinator_address=launch.coordinator,
                num_processes=launch.num_processes,
                process_id=launch.process_id,
                local_device_ids=list(launch.local_device_ids) if launch.local_device_ids is not None else None,
                # Explicit: no cluster detection (it would pin GPUs to SLURM_LOCALID inside an allocation).
                cluster_detection_method="deactivate" if launch.source == "explicit" else launch.source,
                # The processes' own deadline comes after the coordinator's (see above).
                initialization_timeout=launch.timeout_s + 10,
            )
    finally:
        timer.cancel()
    devices = jax.local_devices()
    print(f"t5x_lite.distributed: process {jax.process_index()} of {jax.process_count()} joined "
          f"({launch.source}, coordinator {jax_distributed.global_state.coordinator_address}): {len(devices)} local "
          f"{devices[0].platform} devices, {jax.device_count()} in all", flush=True)


def initialize(env: Optional[Mapping[str, str]] = None) -> Launch:
    """Join the run the environment describes (once per process; later calls return the same)."""
    global _JOINED
    if _JOINED is None:
        launch = from_environment(env)
        join(launch)
        _JOINED = launch
    return _JOINED


@contextlib.contextmanager
def main_process_first(name: str):
    """Process 0 runs the block first (it may write shared files: tokenizer, token cache,
    config); the other processes wait for it, then run the block and find those files.
    Needs the work dir on a file system every process sees (as Orbax checkpoints do)."""
    import jax

    if jax.process_count() == 1:
        yield
        return
    from jax.experimental.multihost_utils import sync_global_devices

    if jax.process_index() != 0:
        sync_global_devices(f"t5x_lite {name}")
    yield
    if jax.process_index() == 0:
        sync_global_devices(f"t5x_lite {name}")
