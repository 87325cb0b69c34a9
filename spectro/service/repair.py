"""The store's checks around sampling: repair before any unit runs, the probe shards' trajectories after.

Non-obvious choices:
- Before any unit runs, the driver verifies the store (`SampleStore.verify`):
  a unit with a missing, truncated or corrupted committed chunk (crc32c) has
  its chunks and its checkpoint deleted and is sampled again from draw 0;
  its seeds depend only on the config, so the result is bit-identical. (A
  checkpoint that cannot be read, or a unit with committed draws but no
  checkpoint, is treated the same way when the unit starts:
  `spectro.service.checkpoints.restore`.)
- Probe shards: every shard unit of a chain group replays the same SGLD
  trajectory, and its checkpoint records the sampling losses of every draw
  it made. At the end the driver compares them with the stored ones (shard
  0's) and fails the run if a shard made another trajectory (a
  nondeterministic kernel): its probe losses would belong to other chains.
"""

from __future__ import annotations

import logging

from spectro import rundir
from spectro.errors import SamplingFailed
from spectro.service.checkpoints import sampling_history, unit_checkpoint
from spectro.service.units import unit_name
from spectro.store import SampleStore

log = logging.getLogger("spectro.service")


def repair(store: SampleStore, checkpoint_dir: rundir.PathLike) -> list[dict]:
    """Verify every committed chunk; reset the units with a bad one (chunks, then checkpoint).
    Call only while no actor writes to the store."""
    bad = store.verify(remove_partial=True)
    for unit in bad:
        log.warning("%s: %s; sampling this unit again from draw 0",
                    unit_name(unit["component"], unit["chains"], unit["shard"], store.layout.probe_shards),
                    unit["problem"])
        store.reset_unit(unit["component"], unit["chains"], unit["shard"])
        unit_checkpoint(checkpoint_dir, store, unit["component"], unit["chains"], unit["shard"]).unlink(missing_ok=True)
    for leftover in rundir.location(checkpoint_dir).glob("*.tmp"):
        leftover.unlink(missing_ok=True)                 # a checkpoint a killed actor was writing
    return bad


def check_trajectories(store: SampleStore, checkpoint_dir: rundir.PathLike) -> int:
    """With probe shards: every shard unit's recorded sampling losses equal the stored ones (shard 0's), bit for
    bit; SamplingFailed naming the first unit that differs. Returns the number of shard units compared."""
    L = store.layout
    stored = store.read("sampling_loss")
    compared = 0
    for component, chains, shard in L.shard_units():
        ckpt_file = unit_checkpoint(checkpoint_dir, store, component, chains, shard)
        if shard == 0 or not ckpt_file.exists():
            continue
        history = sampling_history(ckpt_file)
        ci, n = store.component_index(component), history.shape[1]
        if n and history.numpy().tobytes() != stored[ci, chains[0]:chains[-1] + 1, :n].tobytes():
            raise SamplingFailed(
                f"{unit_name(component, chains, shard, L.probe_shards)} made another SGLD trajectory than probe "
                f"shard 0 (their sampling losses differ), so its probe losses belong to other chains; sampling is "
                f"not deterministic on this device (rerun with sampler.probe_shards=1, or fresh=true)")
        compared += 1
    return compared
