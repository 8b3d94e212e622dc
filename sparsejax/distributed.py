"""Multi-process (multi-host) start-up: `jax.distributed.initialize()` when, and only when, the program
was launched as several processes.

Three ways to launch several processes:
- explicitly: every process gets the same `coordinator_address` ("host:port" of process 0) and
  `num_processes`, and its own `process_id` (train.py: `--coordinator_address --num_processes
  --process_id`; or the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
  JAX_PROCESS_ID);
- SLURM (`srun` with more than one task): detected from SLURM_JOB_ID / SLURM_NTASKS / SLURM_PROCID;
- Open MPI (`mpirun -n N`): detected from OMPI_COMM_WORLD_SIZE;
- Cloud TPU VMs (`gcloud compute tpus tpu-vm ssh NAME --worker=all --command="python train.py ..."`):
  detected from libtpu and the TPU device files; jax.distributed.initialize() is then always called
  (a single-host TPU VM becomes a one-process cluster).
For SLURM, MPI and TPU, jax's own cluster detection fills in the coordinator and the ranks.
Must be called before anything touches a jax device.
"""
from __future__ import annotations

import glob
import importlib.util
import os

import jax
from absl import logging


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _on_cloud_tpu_vm() -> bool:
    """libtpu is installed and TPU chips are attached (without initialising any jax backend)."""
    return importlib.util.find_spec("libtpu") is not None and bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def _cluster_process_count() -> int:
    """Process count announced by a cluster launcher in the environment (1 if none)."""
    if "SLURM_JOB_ID" in os.environ and "SLURM_PROCID" in os.environ:
        return _int_env("SLURM_NTASKS") or _int_env("SLURM_STEP_NUM_TASKS") or 1
    if "OMPI_MCA_orte_hnp_uri" in os.environ or "OMPI_COMM_WORLD_SIZE" in os.environ:
        return _int_env("OMPI_COMM_WORLD_SIZE") or 1
    hosts = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES")
    if hosts:
        return len([h for h in hosts.split(",") if h.strip()])
    return 1


def maybe_initialize(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
    """Initializes jax's distributed runtime for a multi-process launch; returns whether it did.

    Explicit arguments win over the environment. A single-process launch (no arguments, no cluster
    environment with more than one process) does nothing and returns False.
    """
    if jax.distributed.is_initialized():
        return True
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None:
        num_processes = _int_env("JAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _int_env("JAX_PROCESS_ID")
    explicit = [coordinator_address is not None, num_processes is not None, process_id is not None]
    if any(explicit):
        if not all(explicit):
            raise ValueError(
                "a multi-process launch needs all of coordinator_address, num_processes and process_id; "
                f"got coordinator_address={coordinator_address!r}, num_processes={num_processes!r}, "
                f"process_id={process_id!r}")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"process_id={process_id} must be in [0, num_processes={num_processes}) "
                             "and num_processes >= 1")
        if num_processes == 1:
            return False
        logging.info("jax.distributed.initialize(coordinator=%s, num_processes=%d, process_id=%d)",
                     coordinator_address, num_processes, process_id)
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
        return True
    count = _cluster_process_count()
    if count > 1 or _on_cloud_tpu_vm():
        logging.info("cluster launch detected (%d processes announced, Cloud TPU VM: %s); "
                     "jax.distributed.initialize()", count, _on_cloud_tpu_vm())
        jax.distributed.initialize()
        return True
    return False
