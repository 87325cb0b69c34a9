"""Clusters of a finished run at several scales: how fine do its features support, and where are the known answers?

    python benchmarks/bench_scales.py runs/seed0
    python benchmarks/bench_scales.py runs/seed0 --resolutions 1 2 4 8 16 32 --label induction
    python benchmarks/bench_scales.py runs/seed0 --other runs/seed1      # and the agreement across the two runs

For each Leiden resolution of `spectro.clusters.scales.resolution_path` (the run's own kNN graph and features,
the run's clustering settings otherwise) it prints the number of clusters, the share of tokens clustered, the
stability of the clusters across the two independent halves of the chains (ARI on the tokens both halves
cluster) and, for each labelled probe label asked for, the best cluster's F1 against it with the best F1 a
cluster of that size could reach (spectro.known_answers.best_cluster). With `--other`, a second run of the same
probe tokens (another seed, or the control) is clustered at the same resolutions on its own graph, and each
scale adds the ARI of the two runs' clusters on the tokens both cluster (spectro.clusters.clustering.agreement):
the cross-seed stability of that scale. Nothing is sampled; the figures in docs/calibration.md come from this
script.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from spectro.clusters import ClusterParams
from spectro.clusters.clustering import agreement
from spectro.clusters.scales import resolution_path
from spectro.config import ClusterConfig
from spectro.known_answers import best_cluster
from spectro.store import read_susceptibilities


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="a finished run (its susceptibilities.zarr)")
    ap.add_argument("--resolutions", type=float, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--label", nargs="+", default=["induction"], help="probe labels to score (none: no labels)")
    ap.add_argument("--other", type=Path, default=None, help="a second run of the same probe tokens: print the "
                    "two runs' agreement at each scale")
    args = ap.parse_args()
    ds = read_susceptibilities(args.run_dir / "susceptibilities.zarr")
    names = [str(c) for c in ds["component"].values]
    keep = [i for i, c in enumerate(names) if c != "full"]
    chi = np.asarray(ds["chi"].values, dtype=np.float64)[:, keep]                      # (tokens, components)
    other = None
    if args.other is not None:
        ds2 = read_susceptibilities(args.other / "susceptibilities.zarr")
        names2 = [str(c) for c in ds2["component"].values]
        same = names2 == names and ds2["chi"].shape == ds["chi"].shape and np.array_equal(
            ds2["token_id"].values, ds["token_id"].values)
        if not same:
            raise SystemExit(f"{args.other} has other probe tokens or components than {args.run_dir}: "
                             f"the runs must share data.* and components to be compared token by token")
        other = np.asarray(ds2["chi"].values, dtype=np.float64)[:, keep]               # (tokens, components)
    half = np.asarray(ds["chi_half"].values, dtype=np.float64)[:, :, keep]             # (2, tokens, components)
    config = json.loads((args.run_dir / "config.json").read_text()).get("clustering") or {}
    params = ClusterParams(**{**ClusterConfig().__dict__, **config, "method": "leiden"})
    have = [str(x) for x in ds["label"].values] if "label" in ds else []
    labels = {name: np.asarray(ds["token_labels"].values[:, have.index(name)], dtype=bool)
              for name in args.label if name in have}
    missing = sorted(set(args.label) - set(labels))
    if missing:
        print(f"labels not in this run: {', '.join(missing)} (it has: {', '.join(have) or 'none'})")
    path = resolution_path(chi, half, params, resolutions=tuple(args.resolutions))
    across = None
    if other is not None:
        across = [agreement(a["labels"], b["labels"])["ari"] for a, b in
                  zip(path["scales"], resolution_path(other, None, params, tuple(args.resolutions))["scales"])]
    head = ("| resolution | clusters | clustered | halves' ARI |" + (" ARI with the other run |" if across else "")
            + "".join(f" {n} F1 (ceiling) |" for n in labels))
    print(f"{args.run_dir}: {chi.shape[0]:,} tokens x {chi.shape[1]} components"
          + (f"; other run {args.other}" if across else "") + "\n")
    print(head)
    print("|" + "---|" * (4 + (across is not None) + len(labels)))
    for i, sc in enumerate(path["scales"]):
        cells = [f"{sc['resolution']:g}", str(sc["n_clusters"]), f"{sc['clustered_share']:.0%}",
                 f"{sc['halves_ari']:.2f}" if sc["halves_ari"] is not None else "–"]
        if across is not None:
            cells.append("–" if across[i] is None else f"{across[i]:.2f}")
        for pos in labels.values():
            b = best_cluster(np.asarray(sc["labels"]), pos)
            cells.append(f"{b['f1']:.2f} ({b['ceiling']:.2f})" if b else "–")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
