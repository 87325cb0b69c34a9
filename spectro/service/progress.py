"""The driver's progress of a sampling run, read from the store and shown by a `spectro.console` view.

Progress is read from the store, not from the actors: the store is the
source of truth, so the progress bar, wandb traces and resume all agree.
"""

from __future__ import annotations

import time
from typing import Optional

from spectro import console
from spectro.store import SampleStore


class Progress:
    """Sampling progress read from the store, shown by a view (spectro.console: a bar on a terminal, a plain
    line every 10 s otherwise)."""

    def __init__(self, store: SampleStore, view: Optional[console.ProgressView] = None, draws: Optional[int] = None):
        self.store, self.view = store, view or console.progress_view()
        L = store.layout
        self.draws = draws or L.n_draws         # the draws this call samples to (a round's end, or the store's size)
        self.total = len(L.components) * L.n_chains * self.draws
        self.start_done = self._done()
        self.t0 = self.last = time.monotonic()
        self.view.show(self.start_done, self.total, 0.0, float("inf"))

    def update(self, final: bool = False) -> Optional[int]:
        """Report progress when due (every `view.every_s`) or at the end.

        Between reports it reads nothing: the driver shares the machine with the actors, and reading the
        store's progress chunks once a second cost it a steady share of a core."""
        now = time.monotonic()
        if not final and now - self.last < self.view.every_s:
            return None
        done = self._done()
        rate = (done - self.start_done) / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        self.view.show(done, self.total, rate, eta, final)
        self.last = now
        return done

    def _done(self) -> int:
        """Chain-draws committed, counted up to the draws this call samples to."""
        return int(self.store.progress().clip(max=self.draws).sum())

    def close(self) -> None:
        self.view.close()
