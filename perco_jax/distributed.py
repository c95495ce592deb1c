"""Multi-process start-up: `jax.distributed.initialize` from explicit flags or the cluster's environment.

    initialize(coordinator_address=None, num_processes=None, process_id=None) -> bool

Call it first, before anything touches jax devices (jax.devices(), jax.process_count(), any
computation): JAX fixes the backend then. Three cases, in this order:

1. Explicit flags (`--coordinator HOST:PORT --num-processes N --process-id I`): passed to
   `jax.distributed.initialize` as they are, after a consistency check (one ValueError naming
   every problem). `--num-processes 1` without a coordinator is a plain single-process run.
2. A multi-process environment (`detect_cluster`): a SLURM step with more than one task (srun),
   Open MPI's mpirun with more than one rank, a Cloud TPU VM / TPU pod (TPU_WORKER_HOSTNAMES,
   TPU_PROCESS_ADDRESSES, MEGASCALE_* or the TPU device files), or JAX_COORDINATOR_ADDRESS set.
   `jax.distributed.initialize()` is then called without arguments so that JAX's own cluster
   detection fills them in (JAX_NUM_PROCESSES / JAX_PROCESS_ID, when set beside
   JAX_COORDINATOR_ADDRESS, are passed on, since JAX does not read them itself).
3. Otherwise nothing happens: one process.

Idempotent: a second call returns True without initialising again (a call whose explicit flags
differ from the first call's is refused).
"""
from __future__ import annotations

import glob
import importlib.util
import os
from typing import Mapping

import jax

# the explicit arguments of the call that initialised (None: initialised from the environment)
_initialised_with: dict | None = None


def _as_int(name: str, value, problems: list[str]) -> int | None:
    if value is None:
        return None
    try:
        out = int(value)
        if isinstance(value, float) and out != value:
            raise ValueError
    except (TypeError, ValueError):
        problems.append(f"{name}={value!r} is not an integer")
        return None
    return out


def validate_flags(coordinator_address: str | None = None, num_processes=None, process_id=None) -> dict | None:
    """The explicit flags as {coordinator_address, num_processes, process_id} (None when none is
    given); one ValueError listing every inconsistency otherwise."""
    coordinator_address = coordinator_address or None
    if coordinator_address is None and num_processes is None and process_id is None:
        return None
    problems: list[str] = []
    n = _as_int("num_processes", num_processes, problems)
    i = _as_int("process_id", process_id, problems)
    if n is not None and n < 1:
        problems.append(f"num_processes={n} must be >= 1")
    if i is not None and i < 0:
        problems.append(f"process_id={i} must be >= 0")
    if i is not None and n is not None and n >= 1 and i >= n:
        problems.append(f"process_id={i} must be < num_processes={n} (ids are 0..{n - 1})")
    if coordinator_address is not None:
        host, sep, port = str(coordinator_address).rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            problems.append(f"coordinator_address={coordinator_address!r} is not HOST:PORT (e.g. 10.0.0.1:1234)")
        if num_processes is None:
            problems.append("a coordinator_address needs num_processes (and process_id)")
    if process_id is not None and num_processes is None:
        problems.append("process_id needs num_processes")
    if n is not None and n > 1:
        if coordinator_address is None:
            problems.append(f"num_processes={n} needs coordinator_address=HOST:PORT (process 0's address)")
        if process_id is None:
            problems.append(f"num_processes={n} needs this process's process_id (0..{n - 1})")
    if problems:
        raise ValueError("inconsistent distributed flags: " + "; ".join(problems))
    return {"coordinator_address": coordinator_address, "num_processes": n,
            "process_id": 0 if i is None else i}


def _on_cloud_tpu_vm() -> bool:
    """A Cloud TPU VM (libtpu installed and TPU chips attached); JAX then finds the pod's
    processes itself (single-host VMs come out as one process)."""
    if importlib.util.find_spec("libtpu") is None:
        return False
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def _count(value: str | None) -> int:
    try:
        return int(value) if value is not None else 0
    except ValueError:
        return 0


def detect_cluster(environ: Mapping[str, str] | None = None) -> str | None:
    """What multi-process environment this process runs in (a short description), or None."""
    env = os.environ if environ is None else environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    # an srun step (the variables JAX's SLURM detection reads) with more than one task
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(k in env for k in slurm) and _count(env["SLURM_NTASKS"]) > 1:
        return f"SLURM ({env['SLURM_NTASKS']} tasks)"
    if "OMPI_MCA_orte_hnp_uri" in env and _count(env.get("OMPI_COMM_WORLD_SIZE")) > 1:
        return f"Open MPI ({env['OMPI_COMM_WORLD_SIZE']} ranks)"
    hosts = [h for h in (env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or "").split(",")
             if h.strip()]
    if len(hosts) > 1:
        return f"TPU pod ({len(hosts)} hosts)"
    if _count(env.get("MEGASCALE_NUM_SLICES")) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "TPU multislice"
    if environ is None and _on_cloud_tpu_vm():
        return "Cloud TPU VM"
    return None


def initialize(coordinator_address: str | None = None, num_processes=None, process_id=None) -> bool:
    """Start jax.distributed when this is a multi-process run; True if it is (now) initialised.

    Must run before any jax call that initialises the backend (a RuntimeError says so otherwise).
    """
    global _initialised_with
    explicit = validate_flags(coordinator_address, num_processes, process_id)
    if jax.distributed.is_initialized():
        if explicit is not None and _initialised_with is not None and explicit != _initialised_with:
            raise ValueError(f"jax.distributed is already initialised with {_initialised_with}; "
                             f"cannot initialise again with {explicit}")
        return True
    if explicit is not None:
        if explicit["num_processes"] == 1 and explicit["coordinator_address"] is None:
            return False  # one process: nothing to coordinate
        kwargs = explicit
    else:
        source = detect_cluster()
        if source is None:
            return False
        kwargs = {}
        if source == "JAX_COORDINATOR_ADDRESS" and (os.environ.get("JAX_NUM_PROCESSES")
                                                    or os.environ.get("JAX_PROCESS_ID")):
            kwargs = validate_flags(os.environ["JAX_COORDINATOR_ADDRESS"], os.environ.get("JAX_NUM_PROCESSES"),
                                    os.environ.get("JAX_PROCESS_ID"))
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:
        raise RuntimeError(f"jax.distributed.initialize failed ({e}); perco_jax.distributed.initialize must "
                           "run before anything touches jax devices") from e
    _initialised_with = explicit
    return True
