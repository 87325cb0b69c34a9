"""The driver's progress display of a sampling run, read from the store.

Progress is read from the store, not from the actors: the store is the
source of truth, so the progress bar, wandb traces and resume all agree.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Optional

import numpy as np

from spectro.store import SampleStore

log = logging.getLogger("spectro.service")


class Progress:
    """A progress bar on a terminal, plain log lines otherwise; reads the store."""

    def __init__(self, store: SampleStore, stream=None, every_s: float = 10.0):
        self.store, self.stream = store, stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        L = store.layout
        self.total = len(L.components) * L.n_chains * L.n_draws
        self.start_done = int(store.progress().sum())
        self.t0 = self.last = time.monotonic()
        self.every_s = every_s

    def update(self, final: bool = False) -> Optional[int]:
        """Report progress when due (every `every_s` in a log, every 2 s on a terminal) or at the end.

        Between reports it reads nothing: the driver shares the machine with the actors, and reading the
        store's progress chunks once a second cost it a steady share of a core."""
        now = time.monotonic()
        if not final and now - self.last < (2.0 if self.tty else self.every_s):
            return None
        done = int(self.store.progress().sum())
        rate = (done - self.start_done) / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        msg = (f"sampling {done}/{self.total} chain-draws ({100 * done / self.total:.0f}%), "
               f"{rate:.2f} draws/s, ETA {eta:.0f}s" if np.isfinite(eta) else
               f"sampling {done}/{self.total} chain-draws, warming up")
        if self.tty:
            width = 30
            filled = int(width * done / self.total)
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {msg}   ")
            if final:
                self.stream.write("\n")
            self.stream.flush()
        else:
            log.info(msg)
        self.last = now
        return done
