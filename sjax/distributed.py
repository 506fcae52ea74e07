"""Multi-host start-up: JAX's multi-controller runtime, only when launched across hosts.

Every process runs the same program on its own devices; `jax.distributed.initialize` joins
them into one global device list. It is called only when a multi-process launch is visible:
a Cloud TPU pod slice (TPU_WORKER_HOSTNAMES lists more than one host), or coordinator
address / process count / process id given by flags or environment variables
(SJAX_COORDINATOR, SJAX_NUM_PROCESSES, SJAX_PROCESS_ID, or JAX's own JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID). A single-host run is left untouched.

A dead peer is detected by the coordination service's heartbeat: the survivors fail with an
error after `heartbeat_s` instead of waiting forever in a collective.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

ENV = {"coordinator": ("SJAX_COORDINATOR", "JAX_COORDINATOR_ADDRESS"),
       "num_processes": ("SJAX_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
       "process_id": ("SJAX_PROCESS_ID", "JAX_PROCESS_ID")}


@dataclasses.dataclass(frozen=True)
class Launch:
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    tpu_pod: bool = False

    @property
    def multi_process(self) -> bool:
        return self.tpu_pod or (self.num_processes or 1) > 1


def detect(environ=os.environ) -> Launch:
    """What the environment says about this launch (no side effects)."""
    def first(keys):
        return next((environ[k] for k in keys if environ.get(k)), None)

    n, pid = first(ENV["num_processes"]), first(ENV["process_id"])
    hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    return Launch(first(ENV["coordinator"]), int(n) if n else None, int(pid) if pid else None,
                  tpu_pod=len(hosts) > 1)


def initialize(launch: Launch | None = None, heartbeat_s: int = 30, log=None) -> bool:
    """Join the multi-process runtime if this is a multi-process launch; True if joined."""
    launch = launch or detect()
    if not launch.multi_process:
        return False
    if not launch.tpu_pod:  # CPU processes need a collectives backend (GPUs use NCCL anyway)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if launch.tpu_pod and launch.coordinator is None:
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_s)  # auto-detected
    else:
        jax.distributed.initialize(launch.coordinator, launch.num_processes, launch.process_id,
                                   heartbeat_timeout_seconds=heartbeat_s)
    (log or (lambda s: print(s, file=sys.stderr, flush=True)))(
        f"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} "
        f"local of {jax.device_count()} devices ({jax.local_devices()[0].device_kind})")
    return True


def is_main() -> bool:
    """Only process 0 writes manifests, reports and metrics."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here for all the others (nothing to wait for on one process):
    what process 0 wrote before it is there for every process to read after it."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def from_main(x):
    """Process 0's value of `x` (a bool or an array of one shape everywhere) on every
    process. A decision read off the shared run folder (is this unit done?) must be the
    same everywhere, or the processes' collectives diverge; process 0, its only writer, is
    the one that knows."""
    if jax.process_count() == 1:
        return x
    out = multihost_utils.broadcast_one_to_all(np.asarray(x))
    return out.item() if np.ndim(out) == 0 else np.asarray(out)
