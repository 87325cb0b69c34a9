"""One clustering of a susceptibility matrix: unit feature rows -> kNN graph ->
the chosen method's labels -> clusters numbered largest first, with their
conductances and the graph's statistics (`cluster`); and the adjusted Rand
index to compare two labellings.

Non-obvious choices:
- Every method's clusters are renumbered largest first (ties by smallest
  member) and their conductances recomputed the same way, so methods compare.
  Conductance of a set with no edge volume on one side is reported as 1.0.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from spectro.clusters.baselines import leiden_clusters, spectral_clusters
from spectro.clusters.graph import _conductances, features, token_graph
from spectro.clusters.local import conductance_clusters
from spectro.clusters.params import ClusterParams
from spectro.errors import ConfigError, DataError

log = logging.getLogger("spectro.clusters")


@dataclass(frozen=True)
class Clustering:
    labels: np.ndarray            # (tokens,) int, -1 = noise
    clusters: list[dict]          # per cluster: id, size, conductance, members (token indices, sorted)
    params: ClusterParams
    graph_stats: dict = field(default_factory=dict)   # n_tokens, n_edges, knn, knn_seconds, cluster_seconds, ...


_METHOD_FUNCS = {"conductance": conductance_clusters, "leiden": leiden_clusters, "spectral": spectral_clusters}


def cluster(chi: np.ndarray, params: ClusterParams = ClusterParams()) -> Clustering:
    """Features -> kNN graph -> clusters by `params.method`; clusters numbered largest first."""
    if not isinstance(params, ClusterParams):
        raise ConfigError(f"params must be a ClusterParams, got {type(params).__name__}")
    X = features(chi, params.features)
    n = X.shape[0]
    if not X.any():
        log.warning("every token's feature row is zero (%s features of %d component(s)): every token is noise%s",
                    params.features, X.shape[1],
                    "; with one component use clustering.features=zscore" if X.shape[1] == 1 else "")
    if params.k >= n:
        raise ConfigError(f"ClusterParams.k={params.k} nearest neighbours need at least {params.k + 1} tokens, "
                          f"got {n}; lower k")
    t0 = time.perf_counter()
    W, outlier = token_graph(X, params)
    t1 = time.perf_counter()
    labels = cluster_graph(W, outlier, params, X)
    t2 = time.perf_counter()
    n_clusters = int(labels.max()) + 1 if (labels >= 0).any() else 0
    phi = _conductances(W, labels, n_clusters)
    members = np.split(np.argsort(labels, kind="stable"), np.cumsum(np.bincount(labels + 1, minlength=n_clusters + 1)))
    clusters = [{"id": c, "size": int(members[c + 1].size), "conductance": float(phi[c]), "members": members[c + 1]}
                for c in range(n_clusters)]
    deg = np.diff(W.indptr)
    stats = {"n_tokens": int(n), "n_edges": int(W.nnz // 2), "knn": "exact" if n < params.exact_knn_below else "ivf",
             "n_isolated": int((deg == 0).sum()), "n_outliers": int(outlier.sum()),
             "knn_seconds": t1 - t0, "cluster_seconds": t2 - t1}
    return Clustering(labels=labels, clusters=clusters, params=params, graph_stats=stats)



def cluster_graph(W: sp.csr_matrix, outlier: np.ndarray, params: ClusterParams,
                  X: np.ndarray | None = None) -> np.ndarray:
    """Labels by `params.method` on graph W, outliers -1, clusters numbered largest first; X: the
    unit feature rows W was built from (the conductance method uses them: spectro.clusters.local)."""
    if params.method == "conductance":
        raw, _ = conductance_clusters(W, params, exclude=outlier, X=X)
    else:
        raw, _ = _METHOD_FUNCS[params.method](W, params)
        raw = np.where(outlier, -1, raw)
    return _canonical(raw, params.min_size)


def _canonical(raw: np.ndarray, min_size: int) -> np.ndarray:
    """Clusters of at least min_size relabelled 0.. by size (largest first, ties by smallest member); rest -1."""
    raw = np.asarray(raw, dtype=np.int64)
    labels = np.full(raw.size, -1, dtype=np.int64)
    ok = raw >= 0
    if not ok.any():
        return labels
    ids, first, inv, counts = np.unique(raw[ok], return_index=True, return_inverse=True, return_counts=True)
    first = np.flatnonzero(ok)[first]
    order = np.lexsort((first, -counts))
    order = order[counts[order] >= min_size]
    new = np.full(ids.size, -1, dtype=np.int64)
    new[order] = np.arange(order.size)
    labels[ok] = new[inv]
    return labels


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two labellings (every distinct value a cluster, -1 included): scikit-learn's
    `adjusted_rand_score`, with one clear error for labellings of different lengths."""
    from sklearn.metrics import adjusted_rand_score

    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.size != b.size:
        raise DataError(f"labellings differ in length: {a.size} and {b.size}")
    if a.size < 2:
        return 1.0
    return float(adjusted_rand_score(a, b))




def agreement(a: np.ndarray, b: np.ndarray) -> dict:
    """ARI of two labellings (-1 = noise) on the tokens both cluster, and on all tokens."""
    from sklearn.metrics import adjusted_rand_score

    a, b = np.asarray(a), np.asarray(b)
    both = (a >= 0) & (b >= 0)
    return {
        "ari": float(adjusted_rand_score(a[both], b[both])) if both.sum() >= 2 else None,
        "ari_all_tokens": float(adjusted_rand_score(a, b)),
        "tokens_in_both": int(both.sum()),
    }
