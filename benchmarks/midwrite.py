"""fault_injection.py's `midwrite` fault: the store's real write path (SampleStore.write_block, what actors
run) in a process of its own, writing 4 MB chunks round after round, frozen (SIGSTOP) at random moments until
it is caught with a chunk half on disk (zarr's `<chunk>.<uuid>.partial`), then SIGKILLed there. Afterwards
every chunk must decode to the values of one whole write, and verify must remove the killed writer's temp
files."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common import ROOT, make_store, tiny_config, tiny_problem

# The writer's process: every chunk rewritten round after round, values in [rnd, rnd + 0.5) (`expected_round`
# recomputes a round).
WRITER = """
import sys, numpy as np
from spectro.store import SampleStore, TRACE_ARRAYS
store = SampleStore.open(sys.argv[1], mode="r+")
L = store.layout
print("ready", flush=True)
for rnd in range(1, 10**6):
    noise = np.random.default_rng(rnd)
    for comp, chains in L.units():
        for d0 in range(0, L.n_draws, L.draw_chunk):
            g, n = len(chains), min(L.draw_chunk, L.n_draws - d0)
            store.write_block(comp, chains, d0, sampling_loss=np.full((g, n), rnd, float),
                              probe_loss=(rnd + 0.5 * noise.random((g, n, L.n_tokens))).astype(np.float32),
                              traces={t: np.full((g, n), rnd, float) for t in TRACE_ARRAYS}, diverged_at=np.full(g, -1))
    print(rnd, flush=True)
"""


def kill_mid_write(proc, store_path: Path, rng, tries: int = 2000) -> bool:
    """Freeze the writer at random moments until it is caught with a chunk half-written (zarr's
    `<chunk>.<uuid>.partial` temp file exists), then SIGKILL it there."""
    import psutil

    ps = psutil.Process(proc.pid)
    for _ in range(tries):
        time.sleep(rng.uniform(0.0, 0.01))
        proc.send_signal(signal.SIGSTOP)
        while ps.status() != psutil.STATUS_STOPPED:             # the signal is asynchronous
            time.sleep(0.0005)
        if list(store_path.rglob("*.partial")):
            proc.send_signal(signal.SIGKILL)
            return True
        proc.send_signal(signal.SIGCONT)
    proc.send_signal(signal.SIGKILL)
    return False


def expected_round(layout, rnd: int) -> dict:
    """What WRITER puts in every chunk in round `rnd` (same generator, same order)."""
    noise = np.random.default_rng(rnd)
    out = {}
    for comp, chains in layout.units():
        for d0 in range(0, layout.n_draws, layout.draw_chunk):
            g, n = len(chains), min(layout.draw_chunk, layout.n_draws - d0)
            out[(comp, chains[0], d0)] = (rnd + 0.5 * noise.random((g, n, layout.n_tokens))).astype(np.float32)
    return out


def fault_midwrite(rng, rounds, work, tally):
    """`rounds` writers killed mid-write, each on the store the last one left; the outcome goes to `tally`."""
    from types import SimpleNamespace

    from spectro.store import SampleStore

    problem = tiny_problem()
    big = SimpleNamespace(probe_ids=problem.probe_ids.repeat(400, 1), init_loss=problem.init_loss)
    store = make_store(work / "midwrite" / "samples.zarr", big, tiny_config(num_draws=4, checkpoint_every=4))
    L = store.layout
    for r in range(rounds):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(store.path)], cwd=ROOT, stdout=subprocess.PIPE,
                                text=True)
        proc.stdout.readline()
        proc.stdout.readline()
        hit = kill_mid_write(proc, store.path, rng)
        proc.wait(timeout=30)
        torn = len(list(store.path.rglob("*.partial")))
        store = SampleStore.open(store.path, mode="r+")
        problems = store.verify(remove_partial=True)
        probe = store.read("probe_loss")
        rounds_seen, bad = set(), 0
        cache: dict = {}
        for comp, chains in L.units():
            ci = L.components.index(comp)
            got = probe[ci, chains[0]:chains[-1] + 1]
            k = int(np.floor(got.min()))
            for cand in (k, k - 1):
                exp = cache.setdefault(cand, expected_round(L, cand))[(comp, chains[0], 0)]
                if exp.tobytes() == got.tobytes():
                    rounds_seen.add(cand)
                    break
            else:
                bad += 1
        left = len(list(store.path.rglob("*.partial")))
        tally.add("SIGKILL mid-chunk-write (store write path)", int(hit), problems == [] and left == 0, bad,
                  bad == 0, f"{torn} half-written chunk file(s) at the kill, removed by verify; every chunk "
                            f"bit-identical to a whole write of round(s) {sorted(rounds_seen)}")
