"""How large R-hat gets when the chains mix perfectly: the diagnostic's null for a run's layout.

A run computes R-hat per component over the antithetic pairs' mean phi traces
(spectro.susceptibilities.diagnostics): with 4 chains that is 2 units of D
draws each, rank-normalised and split. With so few units R-hat is itself noisy,
and the run takes its maximum over every component, so a sampler that mixes
perfectly still exceeds a fixed threshold in some runs. This script gives that
rate for a run:

- per component: R-hat, bulk ESS, and the lag-1 autocorrelation of the pair
  means (pooled over units), read from the run's samples.zarr;
- the null: independent AR(1) traces with each component's own lag-1
  autocorrelation and the run's units and draws (what a sampler whose only
  memory is its measured step-to-step correlation produces), simulated
  `--reps` times; per component the share of null runs with an R-hat at least
  the observed one (p), and over the whole run the share whose largest R-hat
  exceeds the threshold, and the null's 95% / 99% quantiles of that maximum.

A component with a small p has a slow mode its lag-1 autocorrelation does not
show (it has not mixed); a run-wide rate near 1 says the threshold cannot be met
at this layout whatever the sampler does (more units or less correlated draws
would be needed).

    python benchmarks/bench_rhat_null.py runs/seed0 --reps 400
    python benchmarks/bench_rhat_null.py --rho 0.06 0.32 --units 2 4 --draws 40 --components 23

The second form needs no run: the null rate for given correlations and layouts
(how many units, draws and components a run would have).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spectro.store.samples import SampleStore  # noqa: E402
from spectro.reliability import ar1, lag1, not_mixed, rank_rhat, rhat_null_p  # noqa: E402
from spectro.susceptibilities import antithetic, diagnostics, select_chains, unit_phi  # noqa: E402


def read_run(store: SampleStore) -> dict[str, tuple[np.ndarray, float, float]]:
    """Per component with >= 2 units: (its pair-mean phi traces (units, draws), R-hat, bulk ESS), the traces and
    diagnostics exactly as the pipeline takes them (spectro.susceptibilities)."""
    sel = select_chains(store)
    diag = diagnostics(store, sel, nbeta=1.0, rhat_threshold=np.inf)    # R-hat and ESS; this script draws the null
    s, paired = store.read("sampling_loss"), antithetic(store)              # (C, N, D)
    out = {}
    for ci, name in enumerate(store.layout.components):
        _, _, phi = unit_phi(s, store.init_loss, sel, ci, paired)
        if phi is not None and len(phi) >= 2:
            out[name] = (phi, float(diag["rhat"][ci]), float(diag["ess_bulk"][ci]))
    return out


def flagged(x: np.ndarray, r: np.ndarray, threshold: float, rng: np.random.Generator) -> bool:
    """Whether the pipeline's rule (spectro.reliability.not_mixed) flags any component of one run: x (components,
    units, draws), r its R-hats. Nulls are drawn for the components above the threshold in order, until one flags."""
    p = np.full(r.shape, np.nan)
    for j in np.flatnonzero(r > threshold):
        p[j] = rhat_null_p(x[j], r[j], rng)
        if not_mixed(r, p, threshold)[j]:
            return True
    return False


def layouts(args) -> int:
    """The null rate of `largest R-hat > threshold` for given correlations and layouts; with --verdict also the
    rate of the pipeline's "not mixed" (above the threshold and beyond the component's own null, family-wise)."""
    rng = np.random.default_rng(args.seed)
    head = f"| lag-1 | units | draws | components | share of null runs with largest R-hat > {args.threshold} | "
    print(head + "median | 99% |" + (" share flagged \"not mixed\" |" if args.verdict else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if args.verdict else ""))
    for rho in args.rho:
        for units in args.units:
            x = ar1(rng, rho, (args.reps, args.components, units, args.draws))
            r = rank_rhat(x)                                                  # (reps, components)
            mx = r.max(1)
            row = (f"| {rho:.2f} | {units} | {args.draws} | {args.components} | {(mx > args.threshold).mean():.2f} | "
                   f"{np.median(mx):.3f} | {np.quantile(mx, 0.99):.3f} |")
            if args.verdict:
                row += f" {np.mean([flagged(x[i], r[i], args.threshold, rng) for i in range(args.reps)]):.3f} |"
            print(row, flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", nargs="?", help="a run directory with samples.zarr")
    ap.add_argument("--reps", type=int, default=400, help="simulated null runs")
    ap.add_argument("--threshold", type=float, default=1.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rho", type=float, nargs="+", help="without a run: lag-1 correlations to simulate")
    ap.add_argument("--units", type=int, nargs="+", default=[2], help="with --rho: units per component")
    ap.add_argument("--draws", type=int, default=40, help="with --rho: draws per unit")
    ap.add_argument("--components", type=int, default=23, help="with --rho: components per run")
    ap.add_argument("--verdict", action="store_true",
                    help="with --rho: also the share of null runs the pipeline flags \"not mixed\"")
    args = ap.parse_args()
    if (args.run is None) == (args.rho is None):
        ap.error("give a run directory or --rho, not both")
    if args.rho is not None:
        return layouts(args)
    store = SampleStore.open(Path(args.run) / "samples.zarr")
    runs = read_run(store)
    if not runs or next(iter(runs.values()))[0].shape[1] < 4:
        raise SystemExit(f"{args.run}: R-hat needs at least 2 units of 4 draws each; this run has "
                         f"{store.layout.n_chains} chain(s) of {store.layout.n_draws} draw(s)")
    traces = {n: phi for n, (phi, _, _) in runs.items()}
    obs = {n: (r, e, lag1(traces[n])) for n, (_, r, e) in runs.items()}
    rng = np.random.default_rng(args.seed)
    null = np.stack([rank_rhat(ar1(rng, obs[n][2], (args.reps, *traces[n].shape))) for n in traces], 1)  # (reps, C)
    units, draws = next(iter(traces.values())).shape
    print(f"{args.run}: {len(traces)} components, {units} units (pair means) x {draws} draws; "
          f"null: {args.reps} simulated runs of AR(1) traces at each component's lag-1 autocorrelation")
    print("| component | R-hat | bulk ESS | lag-1 | p (null R-hat >= observed) |")
    print("|---|---|---|---|---|")
    for j, (n, (r, e, a)) in enumerate(obs.items()):
        print(f"| {n} | {r:.3f} | {e:.0f} | {a:.2f} | {(null[:, j] >= r).mean():.3f} |")
    mx = null.max(1)
    observed = max(r for r, _, _ in obs.values())
    print(f"largest R-hat: observed {observed:.3f}; null median {np.median(mx):.3f}, 95% {np.quantile(mx, 0.95):.3f}, "
          f"99% {np.quantile(mx, 0.99):.3f}; share of null runs whose largest R-hat exceeds {args.threshold}: "
          f"{(mx > args.threshold).mean():.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
