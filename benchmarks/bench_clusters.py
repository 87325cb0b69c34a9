"""Clustering benchmark on planted partitions (not a timed test).

For each size (20,000 and 200,000 tokens by default) it draws a synthetic
susceptibility matrix with `spectro.clusters.planted_partition` (32
components, as Pythia-14M; one planted group per 1,000 tokens by default;
10% pure-noise tokens), then for each method prints wall time per stage (kNN
graph, clustering), the number of clusters, the adjusted Rand index on the
grouped tokens (noise label -1 counted as its own cluster), the share of
noise tokens labelled -1, and the process's peak resident memory so far
(`ru_maxrss`, which only grows: read it per size, in run order). Above
`exact_knn_below` it also reports the approximate kNN's recall against
exact neighbours on a sample of tokens.

    python benchmarks/bench_clusters.py                    # 20k and 200k, conductance and leiden
    python benchmarks/bench_clusters.py --sizes 20000 --methods conductance leiden spectral
    python benchmarks/bench_clusters.py --sizes 200000 --group-size 5000 --noise 0.5   # harder
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spectro.clusters import (METHODS, ClusterParams, adjusted_rand_index, cluster_graph,  # noqa: E402
                              features, knn_lists, planted_partition, token_graph)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def recall(X: np.ndarray, nbr: np.ndarray, q: np.ndarray) -> np.ndarray:
    """For each token in q, the share of its exact k nearest neighbours that nbr found."""
    k = nbr.shape[1]
    hits = []
    for s in range(0, q.size, 50):
        qq = q[s:s + 50]
        sims = X[qq] @ X.T
        sims[np.arange(qq.size), qq] = -np.inf
        exact = np.argpartition(-sims, k, axis=1)[:, :k]
        hits += [np.intersect1d(e, nbr[i]).size / k for e, i in zip(exact, qq)]
    return np.array(hits)


def run(n: int, methods: list[str], noise: float, seed: int, group_size: int, outlier_ratio: float) -> None:
    rng = np.random.default_rng(seed)
    t = time.perf_counter()
    chi, groups = planted_partition(n, rng, n_components=32, n_groups=max(8, n // group_size), noise=noise)
    print(f"\n== {n} tokens, {chi.shape[1]} components, {int(groups.max()) + 1} planted groups, "
          f"{int((groups < 0).sum())} noise tokens (generated in {time.perf_counter() - t:.1f} s)", flush=True)
    params = ClusterParams(seed=seed, outlier_ratio=outlier_ratio)
    t = time.perf_counter()
    X = features(chi)
    W, outlier = token_graph(X, params)
    knn_s = time.perf_counter() - t
    kind = "exact" if n < params.exact_knn_below else "approximate (IVF)"
    print(f"kNN graph ({kind}, k={params.k}): {knn_s:.1f} s, {W.nnz // 2} edges, {int(outlier.sum())} outliers, "
          f"peak RSS {peak_mb():.0f} MB", flush=True)
    if n >= params.exact_knn_below:
        nbr, _ = knn_lists(X, params.k, params.seed, params.exact_knn_below)
        q = rng.choice(n, size=500, replace=False)
        hits = recall(X, nbr, q)
        print(f"  kNN recall vs exact on 500 tokens: {hits.mean():.4f} (grouped tokens "
              f"{hits[groups[q] >= 0].mean():.4f}, noise tokens {hits[groups[q] < 0].mean():.4f})", flush=True)
    grouped = groups >= 0
    for method in methods:
        p = ClusterParams(method=method, seed=seed, outlier_ratio=outlier_ratio)
        t = time.perf_counter()
        labels = cluster_graph(W, outlier, p)
        secs = time.perf_counter() - t
        ari = adjusted_rand_index(groups[grouped], labels[grouped])
        noise_rate = float((labels[~grouped] < 0).mean())
        print(f"{method:>11}: {secs:7.1f} s  clusters {int(labels.max()) + 1:5d}  ARI {ari:.3f}  "
              f"noise->-1 {noise_rate:.3f}  grouped->-1 {float((labels[grouped] < 0).mean()):.3f}  "
              f"peak RSS {peak_mb():.0f} MB", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[20000, 200000])
    ap.add_argument("--methods", nargs="+", default=["conductance", "leiden"], choices=list(METHODS))
    ap.add_argument("--noise", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--group-size", type=int, default=1000, help="tokens per planted group, on average")
    ap.add_argument("--outlier-ratio", type=float, default=ClusterParams.outlier_ratio, help="0: no outlier step")
    args = ap.parse_args()
    for n in args.sizes:
        run(n, args.methods, args.noise, args.seed, args.group_size, args.outlier_ratio)


if __name__ == "__main__":
    main()
