"""The driver's scheduler: units of work to actors, failures, replacements; `sample` runs a whole store.

The driver plans every unit of a run (each component plus `full`), skips units
the store says are complete, and hands the rest to actors as they free up, at
most one in flight per actor (`ray.wait` on the in-flight results and the
actors still starting).

Non-obvious choices:
- Actors are created with `max_restarts=0`; when one dies (kill -9, OOM, its
  node removed) the driver re-queues its unit, which resumes from that unit's
  last checkpoint on whichever actor frees up first, and starts a replacement
  actor that joins once constructed (on a shrunken cluster it may never get
  resources; the run still finishes on the survivors). A unit that kills
  `max_unit_failures` actors fails the run with a clear error.
- An actor whose constructor raised a SpectroError (a bad device, a bad
  config) fails the run at once: a replacement would fail the same way.
- A full disk (ENOSPC/EDQUOT/EFBIG) in an actor stops the run with
  DiskFullError; every chunk written before it is kept and checkpointed, so
  rerunning the same command after freeing space resumes. Any other task
  error stops the run with SamplingFailed naming the unit and the cause.
- Every actor is killed at the end (also on error): on a small node a later
  Ray Data job would otherwise wait forever for their CPUs (docs/architecture.md).
"""

from __future__ import annotations

import itertools
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from spectro import console, rundir
from spectro.config import SpectroConfig
from spectro.errors import DiskFullError, SamplingFailed, SpectroError
from spectro.sampling import Problem
from spectro.service.progress import Progress
from spectro.service.repair import check_trajectories, repair
from spectro.service.units import actor_starter, unit_name
from spectro.store import SampleStore, disk_full

log = logging.getLogger("spectro.service")

ACTOR_LOST = (RayActorError, ActorDiedError, ActorUnavailableError)


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


def _creation_error(exc: Exception) -> Optional[str]:
    """The SpectroError message an actor's constructor raised, if that is why it died."""
    found = re.findall(r"spectro\.\w+\.(\w+Error): (.+)", str(exc))
    return f"{found[-1][0]}: {found[-1][1]}" if found else None


class Scheduler:
    """Units to actors, one in flight per actor; re-queues the unit of an actor that dies and starts a
    replacement. `new_actor()` starts one actor and returns its handle (`units.actor_starter`)."""

    def __init__(self, units: list[tuple], new_actor: Callable[[], object], store: SampleStore,
                 max_unit_failures: int, stop_at: Optional[int] = None):
        self.queue = list(units)              # units not yet handed out, next first
        self.stop_at = stop_at                # every unit runs until its chains have this many draws
        self.new_actor = new_actor
        self.store = store
        self.max_unit_failures = max_unit_failures
        self.max_actor_failures = max_unit_failures * max(1, len(units))   # while starting, over the run
        self.failures: dict[tuple, int] = {}  # unit -> actors it lost
        self.actor_failures = 0
        self.live: dict[int, object] = {}     # actor id -> handle, constructed and usable
        self.idle: list[int] = []             # ids of live actors without a unit
        self.starting: dict = {}              # ready-ref -> (actor id, handle), constructor still running
        self.inflight: dict = {}              # result-ref -> (actor id, unit)
        self.done: list[dict] = []            # the reports of the units run, in the order they finished
        self._ids = itertools.count()

    @property
    def busy(self) -> bool:
        """Units are still queued or running."""
        return bool(self.queue or self.inflight)

    def start_actor(self) -> None:
        """Start an actor; it joins the idle ones once its constructor has run."""
        handle = self.new_actor()
        self.starting[handle.pid.remote()] = (next(self._ids), handle)

    def dispatch(self) -> None:
        """Hand queued units to idle actors."""
        while self.idle and self.queue:
            actor_id = self.idle.pop()
            unit = self.queue.pop(0)
            self.inflight[self.live[actor_id].run.remote(*unit, stop_at=self.stop_at)] = (actor_id, unit)

    def wait(self, timeout_s: float) -> list:
        """The refs (a finished unit, or an actor constructed) ready within `timeout_s`: at most one."""
        ready, _ = ray.wait(list(self.inflight) + list(self.starting), num_returns=1, timeout=timeout_s)
        return ready

    def handle(self, ref) -> None:
        """Take in one ready ref: an actor ready (or dead while starting), or a unit's result."""
        if ref in self.starting:
            self._started(ref)
        else:
            self._finished(ref)

    def _started(self, ref) -> None:
        actor_id, handle = self.starting.pop(ref)
        try:
            ray.get(ref)
        except ACTOR_LOST as exc:
            reason = _creation_error(exc)
            if reason:                        # deterministic (bad device, bad config): retrying cannot help
                raise SamplingFailed(f"a sampler actor could not start: {reason}") from exc
            if self.actor_failures >= self.max_actor_failures:
                raise SamplingFailed("sampler actors keep dying while starting; see the Ray logs") from exc
            self._lose(actor_id, None, exc)
            return
        self.live[actor_id] = handle
        self.idle.append(actor_id)

    def _finished(self, ref) -> None:
        actor_id, unit = self.inflight.pop(ref)
        try:
            self.done.append(ray.get(ref))
            self.idle.append(actor_id)
        except ACTOR_LOST as exc:
            self._lose(actor_id, unit, exc)
        except RayTaskError as exc:
            raise task_failure(unit, exc, self.store) from None

    def _lose(self, actor_id: int, unit: Optional[tuple], exc: Exception) -> None:
        """An actor died (running `unit`, or while starting): re-queue the unit first, start a replacement."""
        self.actor_failures += 1
        handle = self.live.pop(actor_id, None)
        if handle is not None:
            ray.kill(handle, no_restart=True)
        if unit is not None:
            shards = self.store.layout.probe_shards
            self.failures[unit] = self.failures.get(unit, 0) + 1
            log.warning("actor running %s died (%s); re-queuing it from its last checkpoint",
                        unit_name(*unit, shards), type(exc).__name__)
            if self.failures[unit] >= self.max_unit_failures:
                raise SamplingFailed(f"{unit_name(*unit, shards)} lost {self.failures[unit]} actors; "
                                     f"giving up (see the Ray logs for why the workers died)") from exc
            self.queue.insert(0, unit)
        self.start_actor()                    # replacement; used once it is constructed (it may wait for resources)

    def stop(self) -> None:
        """Kill every actor, constructed or still starting."""
        for handle in list(self.live.values()) + [h for _, h in self.starting.values()]:
            ray.kill(handle, no_restart=True)


def sample(problem: Problem, store: SampleStore, config: SpectroConfig, checkpoint_dir: rundir.PathLike, *,
           on_poll: Optional[Callable[[SampleStore], None]] = None, poll_s: float = 1.0,
           max_unit_failures: int = 3, view: Optional[console.ProgressView] = None,
           stop_at: Optional[int] = None) -> SamplingReport:
    """Run every unit the store lacks on Ray actors; blocks until done. `view` shows the progress
    (default: spectro.console's choice). `stop_at` (a multiple of the draw chunk, at most n_draws; default
    n_draws): stop every unit once its chains have that many draws; a later call with a larger one continues."""
    t0 = time.perf_counter()
    L = store.layout
    stop_at = check_stop_at(stop_at, L)
    checkpoint_dir = rundir.location(checkpoint_dir)
    checkpoint_dir.mkdir()
    repaired = repair(store, checkpoint_dir)
    todo = [u for u in L.shard_units() if not store.unit_done(*u, draws=stop_at)]
    report = SamplingReport(units_skipped=len(L.shard_units()) - len(todo), units_repaired=repaired)
    if not todo:
        return report
    scheduler = Scheduler(todo, actor_starter(problem, store, config, checkpoint_dir), store, max_unit_failures,
                          stop_at=stop_at)
    progress = Progress(store, view, draws=stop_at)
    try:
        for _ in range(min(config.ray.num_actors, len(todo))):
            scheduler.start_actor()
        while scheduler.busy:
            scheduler.dispatch()
            ready = scheduler.wait(poll_s)
            progress.update()
            if on_poll is not None:
                on_poll(store)
            for ref in ready:
                scheduler.handle(ref)
        progress.update(final=True)
        if on_poll is not None:
            on_poll(store)
        if L.probe_shards > 1:
            report.trajectories_checked = check_trajectories(store, checkpoint_dir)
    finally:
        progress.close()
        report.units_run, report.actor_failures = scheduler.done, scheduler.actor_failures
        scheduler.stop()
    return _timed(report, L, config.ray.num_actors, time.perf_counter() - t0, stop_at)


def check_stop_at(stop_at: Optional[int], L) -> int:
    """The draws every unit runs to: `stop_at` (a multiple of the draw chunk, at most n_draws), or n_draws."""
    if stop_at is None:
        return L.n_draws
    if not (0 < stop_at <= L.n_draws and (stop_at % L.draw_chunk == 0 or stop_at == L.n_draws)):
        raise SamplingFailed(f"cannot stop sampling at draw {stop_at}: it must be a multiple of the draw chunk "
                             f"({L.draw_chunk}, sampler.checkpoint_every) between 1 and the store's {L.n_draws} draws")
    return int(stop_at)


def _timed(report: SamplingReport, L, num_actors: int, seconds: float, stop_at: int) -> SamplingReport:
    """The report with the run's wall time, draw rate and actor utilisation."""
    report.seconds = seconds
    done = sum(len(u["chains"]) * (stop_at - u["resumed_at"]) for u in report.units_run) / L.probe_shards
    report.draws_per_second = done / report.seconds if report.seconds > 0 else 0.0
    report.actor_seconds = sum(u["seconds"] for u in report.units_run)
    report.actor_utilisation = report.actor_seconds / (num_actors * report.seconds) if report.seconds > 0 else 0.0
    return report
