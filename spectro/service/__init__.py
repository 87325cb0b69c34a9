"""The sampling service: Ray actors holding model replicas run units of work.

A unit is (component, chain group, probe shard); with `sampler.probe_shards=1`
(the default) one shard holds every probe context. The driver verifies and
repairs the store, plans every unit of a run (each component plus `full`),
skips units the store says are complete, and hands the rest to actors as they
free up, at most one in flight per actor. Each actor loads the model once from
a payload the driver puts into the object store once (the problem: model at
w*, the fixed data; the sampler config), then streams every unit's draws into
`samples.zarr`, checkpointing after every chunk.

    checkpoints   a unit's checkpoint: file name, contents, save and restore
    units         `run_unit` (plain Python, no Ray) and the `SamplerActor` that runs units
    scheduler     `Scheduler` (units to actors, failures, replacements) and `sample`, the whole store
    repair        the store's checks: repair before sampling, the probe shards' trajectories after
    progress      the driver's progress display, read from the store
    ray_runtime   starting, joining and stopping Ray

The public names are re-exported here (`from spectro.service import sample`).
"""

from spectro.errors import SamplingFailed
from spectro.service.checkpoints import checkpoint_path, unit_checkpoint
from spectro.service.progress import Progress
from spectro.service.ray_runtime import ensure_ray, ray_version, shutdown_ray
from spectro.service.repair import check_trajectories, repair
from spectro.service.scheduler import SamplingReport, Scheduler, sample, task_failure
from spectro.service.units import Payload, SamplerActor, make_payload, run_unit, unit_name

__all__ = ["Payload", "Progress", "SamplerActor", "SamplingFailed", "SamplingReport", "Scheduler",
           "check_trajectories", "checkpoint_path", "ensure_ray", "make_payload", "ray_version", "repair",
           "run_unit", "sample", "shutdown_ray", "task_failure", "unit_checkpoint", "unit_name"]
