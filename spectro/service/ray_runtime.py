"""Starting, joining and stopping Ray for the sampling service.

`ensure_ray` joins the cluster at `ray.address` (or `RAY_ADDRESS`, which is how
a `ray job submit` driver finds its cluster), else starts a private local
instance; `shutdown_ray` stops only an instance this driver started.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import ray

log = logging.getLogger("spectro")


def ensure_ray(address: Optional[str], num_cpus: Optional[int] = None) -> bool:
    """Connect to (or start) Ray. Returns True if this call started it."""
    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        # join a cluster (also how a `ray job submit` driver finds its cluster)
        where = address or os.environ["RAY_ADDRESS"]
        ray.init(address=where, log_to_driver=True)
        log.info("joined the Ray cluster at %s (%s CPUs)", where, ray.cluster_resources().get("CPU", 0))
    else:
        # "local": a private instance even if `ray start` left a cluster on this machine.
        # Ray starts workers at nice 15 by default: on a shared node they then lose the CPU to any
        # normal-priority process (docs/performance.md); the sampler actors are the work, so run them at nice 0.
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    return True


def shutdown_ray() -> None:
    """Stop the Ray instance `ensure_ray` started (the driver's own; a joined cluster keeps running)."""
    ray.shutdown()


def ray_version() -> str:
    """The Ray library's version, for a run's provenance."""
    return ray.__version__
