"""Effect of bf16 loss evaluation (sampler.probe_dtype=bfloat16) on chi, and its speed.

The same chains are run twice from the same seeds, once with float32 and once
with bf16 evaluation of the draw-time losses. SGLD steps are float32 in both,
so the trajectories are identical (checked) and every difference in chi is the
rounding of the observables. Reported per component: correlation of the two chi
vectors, |chi_bf16 - chi_fp32| in units of chi's standard error over chains
(median and 99th percentile), the relative L2 error, and the time spent evaluating losses.

    python benchmarks/bench_precision.py                       # embedded model, 3 components
    python benchmarks/bench_precision.py --components l0h0 l3.mlp --draws 10

Runs in-process (no Ray), on one torch thread unless --threads says otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from spectro.config import to_config
from spectro.estimator import susceptibility_from_arrays
from spectro.pipeline import prepare
from spectro.sampling import UnitRunner


def run(prepared, name: str, sampler, timers: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    problem = prepared.problem
    comp = problem.components(problem.model, [name])[0]
    runner = UnitRunner(problem, comp, range(sampler.num_chains), sampler, run_seed=sampler.seed)
    state = runner.start()
    s, p, dist = [], [], []
    for _ in range(sampler.num_draws):
        t0 = time.perf_counter()
        state, d = runner.next_draw(state)
        timers[sampler.probe_dtype] = timers.get(sampler.probe_dtype, 0.0) + time.perf_counter() - t0
        s.append(d.sampling_loss)
        p.append(d.probe_loss)
        dist.append(d.traces["distance"])
    return np.stack(s, 1), np.stack(p, 1).astype(np.float64), np.stack(dist, 1)


def eval_seconds(prepared, dtype: str, repeats: int = 3) -> float:
    """Median time of one probe-set evaluation at w*."""
    from spectro.device import eval_autocast

    problem = prepared.problem
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with eval_autocast("cpu", dtype):
            problem.per_token(problem.model, {}, problem.probe_ids)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--components", nargs="+", default=["l0h1", "l2.mlp", "unembed"])
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    config = to_config({"components": args.components,
                        "sampler": {"num_chains": args.chains, "num_draws": args.draws, "chain_group": args.chains}})
    prepared = prepare(config)
    s32 = config.sampler
    s16 = dataclasses.replace(s32, probe_dtype="bfloat16")
    timers: dict = {}
    full = {dt: run(prepared, "full", s, timers) for dt, s in (("float32", s32), ("bfloat16", s16))}
    print(f"embedded model, {prepared.problem.n_probe_tokens} probe tokens, {args.chains} chains x {args.draws} draws, "
          f"{args.threads} thread(s)")
    print(f"{'component':>10} {'corr':>8} {'rel L2':>8} {'median |d|/se':>14} {'p99 |d|/se':>11} {'max |dloss|':>12}")
    for name in args.components:
        out = {dt: run(prepared, name, s, timers) for dt, s in (("float32", s32), ("bfloat16", s16))}
        if not np.array_equal(out["float32"][2], out["bfloat16"][2]):
            raise SystemExit(f"{name}: trajectories differ between the two settings; the comparison is invalid")
        chi = {}
        for dt in ("float32", "bfloat16"):
            s, p, _ = out[dt]
            fs, fp, _ = full[dt]
            chi[dt] = susceptibility_from_arrays(s, p, prepared.problem.init_loss, fs, fp, form="peer")
        d = np.abs(chi["bfloat16"].chi - chi["float32"].chi)
        z = d / chi["float32"].chi_se
        r = np.corrcoef(chi["bfloat16"].chi, chi["float32"].chi)[0, 1]
        rel = np.linalg.norm(d) / np.linalg.norm(chi["float32"].chi)
        dl = np.nanmax(np.abs(out["bfloat16"][1] - out["float32"][1]))
        print(f"{name:>10} {r:8.5f} {rel:8.5f} {np.median(z):14.4f} {np.quantile(z, 0.99):11.3f} {dl:12.4f}")
    t32, t16 = eval_seconds(prepared, "float32"), eval_seconds(prepared, "bfloat16")
    print(f"probe evaluation at w*: float32 {t32:.3f} s, bfloat16 {t16:.3f} s (x{t32 / t16:.2f}); "
          f"whole draws incl. SGLD steps: float32 {timers['float32']:.1f} s, bfloat16 {timers['bfloat16']:.1f} s")


if __name__ == "__main__":
    main()
