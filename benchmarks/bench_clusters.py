"""Clustering benchmark on planted partitions (not a timed test).

For each size (20,000 and 200,000 tokens by default) it draws a synthetic
susceptibility matrix with `spectro.clusters.planted_partition` (32
components, as Pythia-14M; about one planted group per 1,000 tokens; 10%
pure-noise tokens), then for each method prints wall time per stage (kNN
graph, clustering), the number of clusters, the adjusted Rand index on the
grouped tokens (noise label -1 counted as its own cluster), the share of
noise tokens labelled -1, and the process's peak resident memory so far
(`ru_maxrss`, which only grows: read it per size, in run order). Above
`exact_knn_below` it also reports the approximate kNN's recall against
exact neighbours on a sample of tokens.

    python benchmarks/bench_clusters.py                    # 20k and 200k, conductance and leiden
    python benchmarks/bench_clusters.py --sizes 20000 --methods conductance leiden spectral
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spectro.clusters import (ClusterParams, _graph, _METHOD_FUNCS, _canonical, adjusted_rand_index,  # noqa: E402
                              conductance_clusters, features, knn_lists, planted_partition, relative_density)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def recall(X: np.ndarray, nbr: np.ndarray, rng: np.random.Generator, n_sample: int = 500) -> float:
    """Share of the exact k nearest neighbours found, over a sample of tokens (50 at a time)."""
    q = rng.choice(X.shape[0], size=min(n_sample, X.shape[0]), replace=False)
    k = nbr.shape[1]
    hits = []
    for s in range(0, q.size, 50):
        qq = q[s:s + 50]
        sims = X[qq] @ X.T
        sims[np.arange(qq.size), qq] = -np.inf
        exact = np.argpartition(-sims, k, axis=1)[:, :k]
        hits += [np.intersect1d(e, nbr[i]).size / k for e, i in zip(exact, qq)]
    return float(np.mean(hits))


def run(n: int, methods: list[str], noise: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    t = time.perf_counter()
    chi, groups = planted_partition(n, rng, n_components=32, n_groups=max(8, n // 1000), noise=noise)
    print(f"\n== {n} tokens, {chi.shape[1]} components, {int(groups.max()) + 1} planted groups, "
          f"{int((groups < 0).sum())} noise tokens (generated in {time.perf_counter() - t:.1f} s)", flush=True)
    params = ClusterParams(seed=seed)
    t = time.perf_counter()
    X = features(chi)
    nbr, sim = knn_lists(X, params.k, params.seed, params.exact_knn_below)
    W = _graph(nbr, sim)
    outlier = relative_density(nbr, sim) < params.outlier_ratio
    knn_s = time.perf_counter() - t
    kind = "exact" if n < params.exact_knn_below else "approximate (IVF)"
    print(f"kNN graph ({kind}, k={params.k}): {knn_s:.1f} s, {W.nnz // 2} edges, {int(outlier.sum())} outliers, "
          f"peak RSS {peak_mb():.0f} MB", flush=True)
    if n >= params.exact_knn_below:
        print(f"  kNN recall vs exact on 500 tokens: {recall(X, nbr, rng):.4f}", flush=True)
    grouped = groups >= 0
    for method in methods:
        p = ClusterParams(method=method, seed=seed)
        t = time.perf_counter()
        if method == "conductance":
            raw, _ = conductance_clusters(W, p, exclude=outlier)
        else:
            raw, _ = _METHOD_FUNCS[method](W, p)
            raw = np.where(outlier, -1, raw)
        labels = _canonical(raw, p.min_size)
        secs = time.perf_counter() - t
        ari = adjusted_rand_index(groups[grouped], labels[grouped])
        noise_rate = float((labels[~grouped] < 0).mean())
        print(f"{method:>11}: {secs:7.1f} s  clusters {int(labels.max()) + 1:5d}  ARI {ari:.3f}  "
              f"noise->-1 {noise_rate:.3f}  grouped->-1 {float((labels[grouped] < 0).mean()):.3f}  "
              f"peak RSS {peak_mb():.0f} MB", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[20000, 200000])
    ap.add_argument("--methods", nargs="+", default=["conductance", "leiden"], choices=list(_METHOD_FUNCS))
    ap.add_argument("--noise", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for n in args.sizes:
        run(n, args.methods, args.noise, args.seed)


if __name__ == "__main__":
    main()
