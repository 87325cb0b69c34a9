"""The sampling service: Ray actors holding model replicas run units of work.

A unit is (component, chain group, probe shard); with `sampler.probe_shards=1`
(the default) one shard holds every probe context. The driver plans every unit of a run
(each component plus `full`), skips units the store says are complete, and
hands the rest to actors as they free up, at most one in flight per actor
(`ray.wait`). Each actor loads the model once in `__init__` from a payload
`ray.put` once by the driver (the problem: model at w*, the fixed data; the
sampler config), then streams every unit's draws into `samples.zarr`.

Non-obvious choices:
- Progress is read from the store, not from the actors: the store is the
  source of truth, so the progress bar, wandb traces and resume all agree.
- A unit checkpoints (weights of the component, optimizer state, generator
  states, draw counter; with `store.probe=moments` also its chains' running
  float64 moment sums) after every chunk it writes, to
  `checkpoints/<component>__c<first>-<last>.pt`: serialised in memory, then
  written whole (`Location.write_bytes`: temp file + rename on local disk,
  one PUT on object storage); plain tensors, read back with
  `torch.load(weights_only=True)`.
- The store and checkpoints may be on object storage (`storage.uri`): actors
  and Ray Data workers open it from its URL with the AWS credentials of their
  own environment (inherited from the driver on a local cluster).
- Actors are created with `max_restarts=0`; when one dies (kill -9, OOM, its
  node removed) the driver re-queues its unit, which resumes from that unit's
  last checkpoint on whichever actor frees up first, and starts a replacement
  actor that joins once constructed (on a shrunken cluster it may never get
  resources; the run still finishes on the survivors). A unit that kills
  `max_unit_failures` actors fails the run with a clear error.
- Before any unit runs, the driver verifies the store (`SampleStore.verify`):
  a unit with a missing, truncated or corrupted committed chunk (crc32c) has
  its chunks and its checkpoint deleted and is sampled again from draw 0;
  its seeds depend only on the config, so the result is bit-identical. A
  checkpoint that cannot be read, or a unit with committed draws but no
  checkpoint, is treated the same way inside `run_unit`.
- A full disk (ENOSPC/EDQUOT/EFBIG) in an actor stops the run with
  DiskFullError; every chunk written before it is kept and checkpointed, so
  rerunning the same command after freeing space resumes. Any other task
  error stops the run with SamplingFailed naming the unit and the cause.
- With `store.probe=moments` a unit adds each block of draws to its chains'
  `estimator.ChainMoments` exactly as the covariance job adds a draws-mode
  chunk (same float32 probe losses, same blocks of Dc draws), so both modes
  give the same chi. The sums are published with the block (one of two
  alternating slots, `spectro.store.samples`) and saved in the checkpoint;
  a resumed unit restores them and re-adds the same draws, so its final sums
  are bit-identical to an uninterrupted run's. A resumed unit first sets the
  progress its checkpoint reached (the kill may have come before that write),
  so the slot it overwrites next is never the one `progress` points at.
- Probe shards: every shard unit of a chain group replays the same SGLD trajectory and evaluates only its
  probe contexts (`spectro.store.layout`: shard 0 alone writes the per-draw scalars; with
  `store.probe=moments` each shard keeps the sums of its tokens and its own copy of the scalar sums). Its
  checkpoint is its own (`...__c<first>-<last>__s<shard>.pt` when S > 1) and also records the sampling losses
  of every draw it made; the driver compares them with the stored ones at the end (`check_trajectories`, mmap:
  only that tensor is read) and fails the run if a shard made another trajectory (a nondeterministic kernel):
  its probe losses would belong to other chains.
- Checkpoint file names come from component names; `store.confined` refuses
  one that could write outside `checkpoints/`.
- Every actor is killed at the end (also on error): on a small node a later
  Ray Data job would otherwise wait forever for their CPUs (docs/architecture.md).
- torch threads per actor = its CPU share, so two actors on two cores do not
  oversubscribe, and results are the same whatever the number of actors.
- A unit hands its freed heap pages back to the OS once when it ends, and
  after a draw only if the actor grew past a slack (`device.HeapTrimmer`):
  trimming after every draw made the next draw fault them back in (measured
  in docs/performance.md). The unit's report counts its trims (`heap_trims`).
"""

from __future__ import annotations

import io
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import ray
import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from spectro import console, rundir
from spectro.config import SamplerConfig, SpectroConfig
from spectro.device import HeapTrimmer, apply_settings, gpu_request, resolve_device
from spectro.errors import DiskFullError, SpectroError
from spectro.estimator import ChainMoments
from spectro.sampling import Problem, UnitRunner
from spectro.store import TRACE_ARRAYS, SampleStore, confined, disk_full

log = logging.getLogger("spectro.service")


class SamplingFailed(SpectroError):
    """A unit could not be completed (it kept killing actors, or raised)."""


# ---------------------------------------------------------------- the unit (plain Python, no Ray)

def checkpoint_path(checkpoint_dir: rundir.PathLike, component: str, chains: Sequence[int],
                    shard: Optional[int] = None) -> rundir.Location:
    """A unit's checkpoint file; `shard` is None (or omitted) for a store without probe shards."""
    tail = "" if shard is None else f"__s{int(shard)}"
    return confined(checkpoint_dir, f"{component}__c{int(chains[0])}-{int(chains[-1])}{tail}.pt")


def unit_checkpoint(checkpoint_dir: rundir.PathLike, store: SampleStore, component: str, chains: Sequence[int],
                    shard: int) -> rundir.Location:
    """The checkpoint file of a unit of this store (no shard suffix without probe shards)."""
    return checkpoint_path(checkpoint_dir, component, chains, shard if store.layout.probe_shards > 1 else None)


def unit_name(component: str, chains: Sequence[int], shard: int = 0, shards: int = 1) -> str:
    return f"unit {component} chains {list(chains)}" + (f" probe shard {shard}/{shards}" if shards > 1 else "")


def _moment_arrays(moments: list[ChainMoments]) -> dict[str, np.ndarray]:
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


def _restore(runner: UnitRunner, store: SampleStore, ckpt_file: rundir.Location, component: str,
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


def run_unit(problem: Problem, store: SampleStore, component_name: str, chains: Sequence[int],
             sampler: SamplerConfig, run_seed: int, checkpoint_dir: rundir.PathLike, shard: int = 0) -> dict:
    """Sample one unit (its probe shard's contexts) into the store, resuming from its checkpoint if present."""
    component = problem.components(problem.model, [component_name])[0]
    runner = UnitRunner(problem, component, chains, sampler, run_seed,
                        probe_contexts=store.layout.shard_contexts(shard))
    ckpt_file = unit_checkpoint(checkpoint_dir, store, component_name, chains, shard)
    state, moments, history = _restore(runner, store, ckpt_file, component_name, chains, shard)
    if store.unit_progress(component_name, chains, shard).min() < state.draw:
        store.set_progress(component_name, chains, state.draw, shard)   # killed after its checkpoint, before this
    n_draws, chunk = store.layout.n_draws, store.layout.draw_chunk
    resumed_at = state.draw
    heap = HeapTrimmer()                 # freed heap pages back to the OS when the process grows (device.py)
    draws, buffer, sampling, probe = [], None, None, None
    while state.draw < n_draws:
        start = state.draw
        draws = []
        while state.draw < min(start + chunk, n_draws):
            state, d = runner.next_draw(state)
            draws.append(d)
            heap.after_draw()
        sampling = np.stack([d.sampling_loss for d in draws], 1)                  # (chains, n)
        history[:, start:state.draw] = sampling
        probe = np.stack([d.probe_loss for d in draws], 1)                        # (chains, n, tokens)
        sums = None
        if moments is not None:
            for k, m in enumerate(moments):
                m.add(sampling[k], probe[k], store.init_loss)
            sums = _moment_arrays(moments)
        store.write_block(
            component_name, chains, start, sampling_loss=sampling, moments=sums,
            probe_loss=probe if sums is None else None,
            traces={name: np.stack([getattr(d, name) for d in draws], 1) for name in TRACE_ARRAYS},
            diverged_at=state.diverged_at, shard=shard)
        buffer = io.BytesIO()
        ckpt = runner.checkpoint(state)
        ckpt["sampling_loss"] = torch.from_numpy(history[:, :state.draw].copy())
        if sums is not None:
            ckpt["moments"] = {k: torch.from_numpy(v) for k, v in sums.items()}
        torch.save(ckpt, buffer)                          # serialise in memory: a full disk raises a plain OSError
        ckpt_file.write_bytes(buffer.getbuffer())         # whole: the old checkpoint or the new one, never a part
        store.set_progress(component_name, chains, state.draw, shard)
    report = {"component": component_name, "chains": list(chains), "shard": shard, "resumed_at": resumed_at,
              "diverged_at": state.diverged_at.tolist()}
    del runner, state, draws, buffer, moments, sampling, probe   # the unit's caches, buffers: free them, trim once
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

    def run(self, component: str, chains: Sequence[int], shard: int = 0) -> dict:
        t0 = time.perf_counter()
        report = run_unit(self.problem, self.store, component, chains, self.payload.sampler,
                          self.payload.run_seed, self.payload.checkpoint_dir, shard)
        return {**report, "seconds": time.perf_counter() - t0, "pid": os.getpid(),
                "node": ray.get_runtime_context().get_node_id()}


# ---------------------------------------------------------------- the driver

def task_failure(unit: tuple, exc: RayTaskError, store: SampleStore) -> SpectroError:
    """The one clear error for a unit whose task raised (the actor is alive)."""
    original = getattr(exc, "cause", None)
    where = unit_name(*unit, store.layout.probe_shards)
    if disk_full(original):
        return DiskFullError(f"no space left on the device holding {store.path.parent} while writing {where}; "
                             f"every chunk committed before it is kept. Free space (or move the run directory "
                             f"to a larger disk) and rerun the same command to resume")
    if isinstance(original, SpectroError):
        return type(original)(f"{where}: {original}")
    detail = f"{type(original).__name__}: {original}" if original is not None else str(exc).splitlines()[0]
    return SamplingFailed(f"{where} failed ({detail}); the store keeps every committed chunk, rerun the same "
                          f"command to resume (see the Ray logs for the traceback)")


@dataclass
class SamplingReport:
    units_run: list = field(default_factory=list)
    units_skipped: int = 0
    actor_failures: int = 0
    units_repaired: list = field(default_factory=list)    # [{"component", "chains", "problem"}] re-sampled
    seconds: float = 0.0
    draws_per_second: float = 0.0
    actor_seconds: float = 0.0            # summed over units: time actors spent inside units
    actor_utilisation: float = 0.0        # actor_seconds / (num_actors x seconds): the rest is start-up and tail
    trajectories_checked: int = 0         # probe shard units whose sampling losses matched shard 0's


class Progress:
    """Sampling progress read from the store, shown by a view (spectro.console: a bar on a terminal, a plain
    line every 10 s otherwise)."""

    def __init__(self, store: SampleStore, view: Optional[console.ProgressView] = None):
        self.store, self.view = store, view or console.progress_view()
        L = store.layout
        self.total = len(L.components) * L.n_chains * L.n_draws
        self.start_done = int(store.progress().sum())
        self.t0 = self.last = time.monotonic()
        self.view.show(self.start_done, self.total, 0.0, float("inf"))

    def update(self, final: bool = False) -> Optional[int]:
        """Report progress when due (every `view.every_s`) or at the end.

        Between reports it reads nothing: the driver shares the machine with the actors, and reading the
        store's progress chunks once a second cost it a steady share of a core."""
        now = time.monotonic()
        if not final and now - self.last < self.view.every_s:
            return None
        done = int(self.store.progress().sum())
        rate = (done - self.start_done) / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        self.view.show(done, self.total, rate, eta, final)
        self.last = now
        return done

    def close(self) -> None:
        self.view.close()


def _creation_error(exc: Exception) -> Optional[str]:
    """The SpectroError message an actor's constructor raised, if that is why it died."""
    found = re.findall(r"spectro\.\w+\.(\w+Error): (.+)", str(exc))
    return f"{found[-1][0]}: {found[-1][1]}" if found else None


def ensure_ray(address: Optional[str], num_cpus: Optional[int] = None) -> bool:
    """Connect to (or start) Ray. Returns True if this call started it."""
    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        # join a cluster (also how a `ray job submit` driver finds its cluster)
        ray.init(address=address or os.environ["RAY_ADDRESS"], log_to_driver=True)
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
        source = str(ckpt_file.path) if ckpt_file.local else io.BytesIO(ckpt_file.read_bytes())
        history = torch.load(source, weights_only=True, mmap=ckpt_file.local).get("sampling_loss",
                                                                               torch.zeros(0, 0))
        ci, n = store.component_index(component), history.shape[1]
        if n and history.numpy().tobytes() != stored[ci, chains[0]:chains[-1] + 1, :n].tobytes():
            raise SamplingFailed(
                f"{unit_name(component, chains, shard, L.probe_shards)} made another SGLD trajectory than probe "
                f"shard 0 (their sampling losses differ), so its probe losses belong to other chains; sampling is "
                f"not deterministic on this device (rerun with sampler.probe_shards=1, or fresh=true)")
        compared += 1
    return compared


def sample(problem: Problem, store: SampleStore, config: SpectroConfig, checkpoint_dir: rundir.PathLike, *,
           on_poll: Optional[Callable[[SampleStore], None]] = None, poll_s: float = 1.0,
           max_unit_failures: int = 3, view: Optional[console.ProgressView] = None) -> SamplingReport:
    """Run every unit the store lacks on Ray actors; blocks until done. `view` shows the progress
    (default: spectro.console's choice)."""
    t0 = time.perf_counter()
    L = store.layout
    checkpoint_dir = rundir.location(checkpoint_dir)
    checkpoint_dir.mkdir()
    repaired = repair(store, checkpoint_dir)
    todo = [u for u in L.shard_units() if not store.unit_done(*u)]
    report = SamplingReport(units_skipped=len(L.shard_units()) - len(todo), units_repaired=repaired)
    if not todo:
        return report
    rc = config.ray
    threads = rc.torch_threads or max(1, int(rc.num_cpus_per_actor))
    payload_ref = ray.put(make_payload(problem, config.sampler, config.sampler.seed, store.path, checkpoint_dir))
    gpus = gpu_request(rc.num_gpus_per_actor, ray.cluster_resources().get("GPU", 0.0), rc.num_actors)
    if config.device.startswith("cuda") and gpus == 0:
        raise SamplingFailed(f"device={config.device} but the actors request no GPU (the Ray cluster has none); "
                             f"use device=auto or device=cpu")
    options = dict(num_cpus=rc.num_cpus_per_actor, num_gpus=gpus)
    progress = Progress(store, view)
    queue = list(todo)
    failures: dict[tuple, int] = {}
    live: dict[int, object] = {}          # actor id -> handle, constructed and usable
    idle: list[int] = []
    starting: dict = {}                   # ready-ref -> (actor id, handle), constructor still running
    inflight: dict = {}                   # result-ref -> (actor id, unit)
    next_id = iter(range(1 << 30))

    def start_actor() -> None:
        handle = SamplerActor.options(**options).remote(payload_ref, threads, config.device, rc.gpu_memory_fraction)
        starting[handle.pid.remote()] = (next(next_id), handle)

    def lose(actor_id: int, unit: Optional[tuple], exc: Exception) -> None:
        report.actor_failures += 1
        handle = live.pop(actor_id, None)
        if handle is not None:
            ray.kill(handle, no_restart=True)
        if unit is not None:
            failures[unit] = failures.get(unit, 0) + 1
            log.warning("actor running %s died (%s); re-queuing it from its last checkpoint",
                        unit_name(*unit, L.probe_shards), type(exc).__name__)
            if failures[unit] >= max_unit_failures:
                raise SamplingFailed(f"{unit_name(*unit, L.probe_shards)} lost {failures[unit]} actors; "
                                     f"giving up (see the Ray logs for why the workers died)") from exc
            queue.insert(0, unit)
        start_actor()                     # replacement; used once it is constructed (it may wait for resources)

    try:
        for _ in range(min(rc.num_actors, len(todo))):
            start_actor()
        while queue or inflight:
            while idle and queue:
                actor_id = idle.pop()
                unit = queue.pop(0)
                inflight[live[actor_id].run.remote(*unit)] = (actor_id, unit)
            ready, _ = ray.wait(list(inflight) + list(starting), num_returns=1, timeout=poll_s)
            progress.update()
            if on_poll is not None:
                on_poll(store)
            for ref in ready:
                if ref in starting:
                    actor_id, handle = starting.pop(ref)
                    try:
                        ray.get(ref)
                    except (RayActorError, ActorDiedError, ActorUnavailableError) as exc:
                        reason = _creation_error(exc)
                        if reason:                # deterministic (bad device, bad config): retrying cannot help
                            raise SamplingFailed(f"a sampler actor could not start: {reason}") from exc
                        if report.actor_failures >= max_unit_failures * max(1, len(todo)):
                            raise SamplingFailed("sampler actors keep dying while starting; see the Ray logs") from exc
                        lose(actor_id, None, exc)
                        continue
                    live[actor_id] = handle
                    idle.append(actor_id)
                    continue
                actor_id, unit = inflight.pop(ref)
                try:
                    report.units_run.append(ray.get(ref))
                    idle.append(actor_id)
                except (RayActorError, ActorDiedError, ActorUnavailableError) as exc:
                    lose(actor_id, unit, exc)
                except RayTaskError as exc:
                    raise task_failure(unit, exc, store) from None
        progress.update(final=True)
        if on_poll is not None:
            on_poll(store)
        if L.probe_shards > 1:
            report.trajectories_checked = check_trajectories(store, checkpoint_dir)
    finally:
        progress.close()
        for handle in list(live.values()) + [h for _, h in starting.values()]:
            ray.kill(handle, no_restart=True)
    report.seconds = time.perf_counter() - t0
    done = sum(len(u["chains"]) * (L.n_draws - u["resumed_at"]) for u in report.units_run) / L.probe_shards
    report.draws_per_second = done / report.seconds if report.seconds > 0 else 0.0
    report.actor_seconds = sum(u["seconds"] for u in report.units_run)
    report.actor_utilisation = report.actor_seconds / (rc.num_actors * report.seconds) if report.seconds > 0 else 0.0
    return report
