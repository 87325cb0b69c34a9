"""A unit of work and the actor that runs units.

`run_unit` is plain Python (no Ray): it samples one (component, chain group,
probe shard) into the store, resuming from its checkpoint. `SamplerActor` holds
one model replica, loaded once in `__init__` from a `Payload` the driver puts
into the object store once per run (the problem: model at w*, the fixed data;
the sampler config), and runs units on it.

Non-obvious choices:
- With `store.probe=moments` a unit adds each block of draws to its chains'
  `estimator.ChainMoments` exactly as the covariance job adds a draws-mode
  chunk (same float32 probe losses, same blocks of Dc draws), so both modes
  give the same chi. The sums are published with the block (one of two
  alternating slots, `spectro.store.samples`) and saved in the checkpoint.
  A resumed unit first sets the progress its checkpoint reached (the kill may
  have come before that write), so the slot it overwrites next is never the
  one `progress` points at.
- Probe shards: every shard unit of a chain group replays the same SGLD
  trajectory and evaluates only its probe contexts (`spectro.store.layout`:
  shard 0 alone writes the per-draw scalars; with `store.probe=moments` each
  shard keeps the sums of its tokens and its own copy of the scalar sums).
- The store and checkpoints may be on object storage (`storage.uri`): actors
  open it from its URL with the AWS credentials of their own environment
  (inherited from the driver on a local cluster).
- torch threads per actor = its CPU share, so two actors on two cores do not
  oversubscribe, and results are the same whatever the number of actors.
- A unit may stop early, at `stop_at` draws (a multiple of the draw chunk):
  it has then checkpointed exactly as after any chunk, and a later call
  with a larger `stop_at` continues from that checkpoint as a resume after a
  crash does. The generators' states are in the checkpoint, so where the
  rounds cut changes no draw.
- A unit hands its freed heap pages back to the OS once when it ends, and
  after a draw only if the actor grew past a slack (`device.HeapTrimmer`):
  trimming after every draw made the next draw fault them back in (measured
  in docs/performance.md). The unit's report counts its trims (`heap_trims`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import ray
import torch

from spectro import rundir
from spectro.config import SamplerConfig, SpectroConfig
from spectro.device import HeapTrimmer, apply_settings, gpu_request, resolve_device
from spectro.errors import SamplingFailed
from spectro.sampling import Problem, UnitRunner
from spectro.service.checkpoints import moment_arrays, restore, save, unit_checkpoint
from spectro.store import TRACE_ARRAYS, SampleStore


def unit_name(component: str, chains: Sequence[int], shard: int = 0, shards: int = 1) -> str:
    return f"unit {component} chains {list(chains)}" + (f" probe shard {shard}/{shards}" if shards > 1 else "")


# ---------------------------------------------------------------- the unit (plain Python, no Ray)

def _next_block(runner: UnitRunner, state, stop: int, heap: HeapTrimmer) -> tuple:
    """(state, draws) after the unit's draws up to draw `stop` (the next chunk boundary, or the last draw)."""
    draws = []
    while state.draw < stop:
        state, d = runner.next_draw(state)
        draws.append(d)
        heap.after_draw()
    return state, draws


def run_unit(problem: Problem, store: SampleStore, component_name: str, chains: Sequence[int],
             sampler: SamplerConfig, run_seed: int, checkpoint_dir: rundir.PathLike, shard: int = 0,
             stop_at: Optional[int] = None) -> dict:
    """Sample one unit (its probe shard's contexts) into the store, resuming from its checkpoint if present, until
    its chains have `stop_at` draws committed (default: the store's n_draws; a round of `spectro.rounds`)."""
    component = problem.components(problem.model, [component_name])[0]
    runner = UnitRunner(problem, component, chains, sampler, run_seed,
                        probe_contexts=store.layout.shard_contexts(shard))
    ckpt_file = unit_checkpoint(checkpoint_dir, store, component_name, chains, shard)
    state, moments, history = restore(runner, store, ckpt_file, component_name, chains, shard)
    if store.unit_progress(component_name, chains, shard).min() < state.draw:
        store.set_progress(component_name, chains, state.draw, shard)   # killed after its checkpoint, before this
    n_draws, chunk = stop_at or store.layout.n_draws, store.layout.draw_chunk
    resumed_at = state.draw
    heap = HeapTrimmer()                 # freed heap pages back to the OS when the process grows (device.py)
    draws, sampling, probe = [], None, None
    while state.draw < n_draws:
        start = state.draw
        state, draws = _next_block(runner, state, min(start + chunk, n_draws), heap)
        sampling = np.stack([d.sampling_loss for d in draws], 1)                  # (chains, n)
        history[:, start:state.draw] = sampling
        probe = np.stack([d.probe_loss for d in draws], 1)                        # (chains, n, tokens)
        sums = None
        if moments is not None:
            for k, m in enumerate(moments):
                m.add(sampling[k], probe[k], store.init_loss)
            sums = moment_arrays(moments)
        store.write_block(
            component_name, chains, start, sampling_loss=sampling, moments=sums,
            probe_loss=probe if sums is None else None,
            traces={name: np.stack([d.traces[name] for d in draws], 1) for name in TRACE_ARRAYS},
            diverged_at=state.diverged_at, shard=shard)
        save(ckpt_file, runner, state, history, sums)
        store.set_progress(component_name, chains, state.draw, shard)
    report = {"component": component_name, "chains": list(chains), "shard": shard, "resumed_at": resumed_at,
              "diverged_at": state.diverged_at.tolist()}
    del runner, state, draws, moments, sampling, probe   # the unit's caches, buffers: free them, trim once
    heap.reset()                         # the next unit allocates differently: start it from a trimmed heap
    return {**report, "heap_trims": heap.trims}


# ---------------------------------------------------------------- shipping the model once

@dataclass(frozen=True)
class Payload:
    """Everything an actor needs, `ray.put` once per run."""
    problem: Problem                      # on the CPU; the actor moves it to its device
    sampler: SamplerConfig
    run_seed: int
    store_path: str
    checkpoint_dir: str


def make_payload(problem: Problem, sampler: SamplerConfig, run_seed: int, store_path: rundir.PathLike,
                 checkpoint_dir: rundir.PathLike) -> Payload:
    return Payload(problem=problem.to("cpu"), sampler=sampler, run_seed=run_seed, store_path=str(store_path),
                   checkpoint_dir=str(checkpoint_dir))


@ray.remote(max_restarts=0)
class SamplerActor:
    """Holds one model replica; runs units of work into the store."""

    def __init__(self, payload: Payload, torch_threads: int, device: str, memory_fraction: float = 0.0):
        torch.set_num_threads(max(1, torch_threads))
        self.device = resolve_device(device)
        self.settings = apply_settings(self.device, payload.sampler.tf32, memory_fraction)
        self.payload = payload
        self.problem = payload.problem.to(self.device)
        self.store = SampleStore.open(payload.store_path, mode="r+")

    def pid(self) -> int:
        return os.getpid()

    def describe(self) -> dict:
        """Where this replica runs and what was set (device, TF32, memory cap, threads)."""
        return {**self.settings, "threads": torch.get_num_threads(), "pid": os.getpid(),
                "gpu_ids": ray.get_runtime_context().get_accelerator_ids().get("GPU", [])}

    def run(self, component: str, chains: Sequence[int], shard: int = 0, stop_at: Optional[int] = None) -> dict:
        t0 = time.perf_counter()
        report = run_unit(self.problem, self.store, component, chains, self.payload.sampler,
                          self.payload.run_seed, self.payload.checkpoint_dir, shard, stop_at)
        return {**report, "seconds": time.perf_counter() - t0, "pid": os.getpid(),
                "node": ray.get_runtime_context().get_node_id()}


def actor_starter(problem: Problem, store: SampleStore, config: SpectroConfig,
                  checkpoint_dir: rundir.PathLike) -> Callable[[], object]:
    """A function that starts one sampler actor of this run (the payload is put into the object store here,
    once); SamplingFailed if `device` asks for a GPU the cluster does not have."""
    rc = config.ray
    threads = rc.torch_threads or max(1, int(rc.num_cpus_per_actor))
    payload_ref = ray.put(make_payload(problem, config.sampler, config.sampler.seed, store.path, checkpoint_dir))
    gpus = gpu_request(rc.num_gpus_per_actor, ray.cluster_resources().get("GPU", 0.0), rc.num_actors)
    if config.device.startswith("cuda") and gpus == 0:
        raise SamplingFailed(f"device={config.device} but the actors request no GPU (the Ray cluster has none); "
                             f"use device=auto or device=cpu")
    options = dict(num_cpus=rc.num_cpus_per_actor, num_gpus=gpus)
    return lambda: SamplerActor.options(**options).remote(payload_ref, threads, config.device, rc.gpu_memory_fraction)
