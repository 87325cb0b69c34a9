"""A unit's checkpoint: its file name, what it holds, saving and restoring it.

A unit checkpoints after every chunk it writes to the store, to
`checkpoints/<component>__c<first>-<last>.pt` (`...__s<shard>.pt` with probe
shards, S > 1). It holds the runner's state (`UnitRunner.checkpoint`: the
component's weights, optimizer state, generator states, draw counter), the
sampling losses of every draw made so far (`sampling_loss`, chains x draws)
and, with `store.probe=moments`, the chains' running float64 moment sums
(`moments`: n, phi, phi2, phiD, D).

Non-obvious choices:
- Serialised in memory, then written whole (`Location.write_bytes`: temp file
  + rename on local disk, one PUT on object storage): the old checkpoint or
  the new one, never a part; a full disk raises a plain OSError before the
  file is touched. Plain tensors only, read back with
  `torch.load(weights_only=True)`.
- A checkpoint that cannot be read, or whose draws are not all on disk, or a
  unit with committed draws but no checkpoint: the unit's chunks and
  checkpoint are deleted and it is sampled again from draw 0. Its seeds
  depend only on the config, so the result is bit-identical.
- With `store.probe=moments` the sums saved here are the ones published with
  the block; a resumed unit restores them and re-adds the same draws, so its
  final sums are bit-identical to an uninterrupted run's.
- The sampling losses let the driver check that every probe shard of a chain
  group made the same trajectory (`spectro.service.repair.check_trajectories`),
  reading only that tensor (mmap on local disk).
- File names come from component names; `store.confined` refuses one that
  could write outside `checkpoints/`.
"""

from __future__ import annotations

import io
import logging
from typing import Optional, Sequence

import numpy as np
import torch

from spectro import rundir
from spectro.estimator import ChainMoments
from spectro.sampling import UnitRunner, UnitState
from spectro.store import SampleStore, confined

log = logging.getLogger("spectro.service")


def checkpoint_path(checkpoint_dir: rundir.PathLike, component: str, chains: Sequence[int],
                    shard: Optional[int] = None) -> rundir.Location:
    """A unit's checkpoint file; `shard` is None (or omitted) for a store without probe shards."""
    tail = "" if shard is None else f"__s{int(shard)}"
    return confined(checkpoint_dir, f"{component}__c{int(chains[0])}-{int(chains[-1])}{tail}.pt")


def unit_checkpoint(checkpoint_dir: rundir.PathLike, store: SampleStore, component: str, chains: Sequence[int],
                    shard: int) -> rundir.Location:
    """The checkpoint file of a unit of this store (no shard suffix without probe shards)."""
    return checkpoint_path(checkpoint_dir, component, chains, shard if store.layout.probe_shards > 1 else None)


def moment_arrays(moments: list[ChainMoments]) -> dict[str, np.ndarray]:
    """A unit's chains' sums as arrays: n, phi, phi2 (chains,) and phiD, D (chains, tokens)."""
    return {"n": np.array([m.n for m in moments], dtype=np.int64),
            "phi": np.array([m.s_phi for m in moments], dtype=np.float64),
            "phi2": np.array([m.s_phi2 for m in moments], dtype=np.float64),
            "phiD": np.stack([m.s_phiD for m in moments]), "D": np.stack([m.s_D for m in moments])}


def _moments_from(ckpt: dict, n_chains: int, n_tokens: int, draw: int) -> list[ChainMoments]:
    """The chains' sums saved in a checkpoint; ValueError (an unusable checkpoint) if absent or inconsistent."""
    if "moments" not in ckpt:
        raise ValueError("the checkpoint holds no moment sums (store.probe=moments needs them)")
    a = {k: v.numpy() for k, v in ckpt["moments"].items()}
    if a["phiD"].shape != (n_chains, n_tokens) or a["D"].shape != (n_chains, n_tokens) or not (a["n"] == draw).all():
        raise ValueError(f"the checkpoint's moment sums do not match {n_chains} chains x {n_tokens} tokens "
                         f"at draw {draw}")
    return [ChainMoments(n_tokens, n=int(a["n"][k]), s_phi=float(a["phi"][k]), s_phi2=float(a["phi2"][k]),
                         s_phiD=a["phiD"][k].astype(np.float64), s_D=a["D"][k].astype(np.float64))
            for k in range(n_chains)]


def restore(runner: UnitRunner, store: SampleStore, ckpt_file: rundir.Location, component: str,
            chains: Sequence[int], shard: int = 0):
    """(state, moments, history) of the unit from its checkpoint; from draw 0 (its chunks deleted) if there is
    none or it is unreadable. `moments`: the chains' running sums with store.probe=moments, else None; `history`:
    (chains, n_draws) sampling losses of the draws made so far (NaN where unknown)."""
    history = np.full((len(chains), store.layout.n_draws), np.nan)
    by_moments = store.layout.probe == "moments"
    t0, t1 = store.layout.shard_tokens(shard)
    n_tokens = t1 - t0                                # the unit's sums cover its probe shard's tokens
    if ckpt_file.exists():
        try:
            ckpt = torch.load(io.BytesIO(ckpt_file.read_bytes()), weights_only=True)
            state = runner.restore(ckpt)
            moments = _moments_from(ckpt, len(chains), n_tokens, state.draw) if by_moments else None
            problem = store.check_unit(component, chains, state.draw, shard)   # the draws before it: on disk
            if problem is None:
                if "sampling_loss" in ckpt:
                    history[:, :state.draw] = ckpt["sampling_loss"].numpy()
                return state, moments, history
            log.warning("%s chains %s: %s; sampling this unit again from draw 0", component, list(chains), problem)
        except Exception as exc:  # truncated/corrupted file: pickle, zip and key errors all mean "unusable"
            log.warning("checkpoint %s is unreadable (%s: %s); sampling %s chains %s again from draw 0",
                        ckpt_file, type(exc).__name__, exc, component, list(chains))
    if store.unit_progress(component, chains, shard).max() > 0:
        store.reset_unit(component, chains, shard)     # committed draws without a usable checkpoint: start over
    ckpt_file.unlink(missing_ok=True)
    return runner.start(), ([ChainMoments(n_tokens) for _ in chains] if by_moments else None), history


def save(ckpt_file: rundir.Location, runner: UnitRunner, state: UnitState, history: np.ndarray,
         sums: Optional[dict[str, np.ndarray]]) -> None:
    """Write the unit's checkpoint at `state.draw`: the runner's state, the sampling losses of its draws so far
    (`history[:, :state.draw]`) and, with store.probe=moments, the chains' sums `sums` (`moment_arrays`)."""
    buffer = io.BytesIO()
    ckpt = runner.checkpoint(state)
    ckpt["sampling_loss"] = torch.from_numpy(history[:, :state.draw].copy())
    if sums is not None:
        ckpt["moments"] = {k: torch.from_numpy(v) for k, v in sums.items()}
    torch.save(ckpt, buffer)                          # serialise in memory: a full disk raises a plain OSError
    ckpt_file.write_bytes(buffer.getbuffer())         # whole: the old checkpoint or the new one, never a part


def sampling_history(ckpt_file: rundir.Location) -> torch.Tensor:
    """The sampling losses (chains, draws made) a checkpoint records; (0, 0) if it records none. Reads only that
    tensor from a local file (mmap)."""
    source = str(ckpt_file.path) if ckpt_file.local else io.BytesIO(ckpt_file.read_bytes())
    return torch.load(source, weights_only=True, mmap=ckpt_file.local).get("sampling_loss", torch.zeros(0, 0))
