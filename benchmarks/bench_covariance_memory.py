"""Memory of the covariance job as the probe set grows 10x.

    python benchmarks/bench_covariance_memory.py [--tokens 40000] [--factor 10]

Writes synthetic sample stores (real Zarr v3 through SampleStore, 5
components incl. full, 4 chains, 20 draws) with T and factor*T probe tokens,
runs the Ray Data covariance job on each, and prints the peak resident memory
of the job's worker tasks and of the driver, and the wall time. With
token-block tasks the worker peak should stay roughly flat while the data
grows 10x (a dense (draws x tokens) approach grows linearly).
"""

import argparse
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def synthetic_store(path: Path, n_tokens: int, seed: int = 0):
    from spectro.config import as_dict, to_config
    from spectro.store import TRACE_ARRAYS, Layout, ProbeTable, SampleStore

    comps = ["full", "a", "b", "c", "d"]
    N, D, G, Dc = 4, 20, 4, 10
    layout = Layout.plan(comps, N, D, n_tokens, 2, G, Dc)
    probe = ProbeTable(input_ids=np.zeros((n_tokens, 2), np.int64), context=np.arange(n_tokens),
                       position=np.ones(n_tokens), token_id=np.zeros(n_tokens),
                       text=["t"] * n_tokens, source=["s"] * n_tokens)
    cfg = as_dict(to_config({}))
    store = SampleStore.create_or_open(path, layout, fingerprint={"n": n_tokens}, config=cfg, model={}, data={},
                                       init_loss=3.0, probe=probe)
    rng = np.random.default_rng(seed)
    for comp, chains in layout.units():
        for d0 in range(0, D, Dc):
            s = 3.0 + 0.01 * rng.standard_normal((len(chains), Dc))
            l = (3.0 + rng.standard_normal((len(chains), Dc, n_tokens))).astype(np.float32)
            store.write_block(comp, chains, d0, sampling_loss=s, probe_loss=l,
                              traces={k: np.zeros((len(chains), Dc)) for k in TRACE_ARRAYS},
                              diverged_at=np.full(len(chains), -1))
        store.set_progress(comp, chains, D)
    return store


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=40000)
    ap.add_argument("--factor", type=int, default=10)
    args = ap.parse_args()
    import ray

    from spectro.susceptibilities import compute

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    for T in (args.tokens, args.tokens * args.factor):
        with tempfile.TemporaryDirectory() as d:
            # the store is written by a child process so the driver's peak measures the job alone
            ctx = multiprocessing.get_context("spawn")
            proc = ctx.Process(target=synthetic_store, args=(Path(d) / "samples.zarr", T))
            proc.start()
            proc.join()
            dense_mb = 5 * 4 * 20 * T * 4 / 2**20
            t0 = time.perf_counter()
            out = compute(Path(d), nbeta=5.77)
            wall = time.perf_counter() - t0
            driver = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # lifetime peak: monotone
            rows.append((T, dense_mb, out["blocks"], out["peak_rss_mb"], driver, wall))
            print(f"tokens {T:,}: {out['blocks']} blocks, worker peak {out['peak_rss_mb']:.0f} MB, "
                  f"driver peak {driver:.0f} MB, probe_loss {dense_mb:.0f} MB on disk uncompressed, {wall:.1f}s", flush=True)
    ray.shutdown()
    print()
    print("| probe tokens | probe_loss size | blocks | worker peak RSS | driver peak RSS | wall |")
    print("|---|---|---|---|---|---|")
    for T, mb, b, w, dr, wall in rows:
        print(f"| {T:,} | {mb:,.0f} MB | {b} | {w:.0f} MB | {dr:.0f} MB | {wall:.1f} s |")
    print(f"worker peak ratio ({args.factor}x tokens): {rows[1][3] / rows[0][3]:.2f}x")


if __name__ == "__main__":
    main()
