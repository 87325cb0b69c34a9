"""Sampling-service throughput: draws/s and probe tokens/s with 1 and 2 actors.

    python benchmarks/bench_sampling.py [--repeats 3] [--draws 10] [--components l0h0,l1.mlp,l2h1]

Runs the same small workload on the embedded model through the real service
(local Ray, real Zarr store in a temp dir) with 1 actor and with 2 actors,
alternating, and prints the medians and their ratio. A chain-draw is one
chain advanced to its next draw (SGLD steps + sampling-set and probe losses);
probe tokens/s counts probe-token losses evaluated.

Two ratios: end to end (wall time of the sampling stage, actor start-up and
the last unit's tail included) and in units (chain-draws per second of the
actors' time inside units, times the number of actors: what the cores
deliver once the actors are running). Their difference is the fixed cost of
starting actors and the tail, which weighs more the shorter the run.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--draws", type=int, default=10)
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--components", default="l0h0,l1.mlp,l2h1,l3h3")
    args = ap.parse_args()

    import ray

    from spectro import pipeline
    from spectro.config import to_config

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    results: dict[int, list[float]] = {1: [], 2: []}
    in_units: dict[int, list[float]] = {1: [], 2: []}
    tokens = None
    for rep in range(args.repeats):
        for actors in (1, 2):
            cfg = to_config({"components": args.components.split(","), "stage": "sample",
                             "sampler": {"num_chains": args.chains, "num_draws": args.draws, "chain_group": 2,
                                         "checkpoint_every": args.draws},
                             "ray": {"num_actors": actors, "num_cpus_per_actor": 1}})
            prepared = pipeline.prepare(cfg)
            tokens = prepared.probe.n_tokens
            with tempfile.TemporaryDirectory() as d:
                t0 = time.perf_counter()
                out = pipeline.run(cfg, Path(d), prepared)
                wall = time.perf_counter() - t0
            n_draws = out["sample"]["units_run"] and (len(cfg.components) + 1) * args.chains * args.draws
            utilisation = out["sample"]["actor_utilisation"]
            results[actors].append(n_draws / wall)
            in_units[actors].append(n_draws / (utilisation * out["sample"]["seconds"]))
            print(f"repeat {rep} actors {actors}: {n_draws} chain-draws in {wall:.1f}s = {n_draws / wall:.2f} draws/s; "
                  f"actors inside units {100 * utilisation:.1f}% of the stage = {in_units[actors][-1]:.2f} draws/s "
                  f"in units", flush=True)
    ray.shutdown()
    m1, m2 = statistics.median(results[1]), statistics.median(results[2])
    print()
    print("| actors | median draws/s | median probe tokens/s |")
    print("|---|---|---|")
    print(f"| 1 | {m1:.2f} | {m1 * tokens:,.0f} |")
    print(f"| 2 | {m2:.2f} | {m2 * tokens:,.0f} |")
    u1, u2 = statistics.median(in_units[1]), statistics.median(in_units[2])
    print(f"2 actors / 1 actor: {m2 / m1:.2f}x end to end (wall time includes actor start-up and model shipping); "
          f"{u2 / u1:.2f}x in units ({u1:.2f} and {u2:.2f} draws/s)")


if __name__ == "__main__":
    main()
