"""Baseline clusterings of the token graph: Leiden communities and normalised
spectral clustering, to compare the local conductance clusters with
(docs/clustering.md).

Non-obvious choices:
- Leiden (igraph + leidenalg, RB configuration model, `resolution`, seeded,
  leidenalg's default 2 iterations) and spectral (top eigenvectors of
  D^-1/2 W D^-1/2 by `eigsh`, rows normalised, seeded k-means++ (scikit-learn); the number
  of clusters by the largest eigengap among the first `_SPECTRAL_MAX_EIG`
  when n_clusters is 0) label every token but the outliers; communities
  smaller than min_size become noise too.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from spectro.clusters.params import ClusterParams
from spectro.errors import ConfigError, DataError

_SPECTRAL_MAX_EIG = 40
_KMEANS_INIT = 4


def leiden_clusters(W: sp.csr_matrix, params: ClusterParams) -> tuple[np.ndarray, list[dict]]:
    """Leiden communities (RB configuration, `resolution`, `seed`); every token labelled."""
    try:
        import igraph as ig
        import leidenalg
    except ImportError as e:
        raise ConfigError("method 'leiden' needs the packages igraph and leidenalg: "
                          "pip install igraph leidenalg") from e
    upper = sp.triu(sp.csr_matrix(W), k=1).tocoo()
    g = ig.Graph(n=W.shape[0], edges=np.column_stack([upper.row, upper.col]), directed=False)
    g.es["weight"] = upper.data.tolist()
    part = leidenalg.find_partition(g, leidenalg.RBConfigurationVertexPartition, weights="weight",
                                    resolution_parameter=float(params.resolution), seed=int(params.seed))
    labels = np.asarray(part.membership, dtype=np.int64)
    return labels, [{} for _ in range(int(labels.max()) + 1 if labels.size else 0)]


def spectral_clusters(W: sp.csr_matrix, params: ClusterParams) -> tuple[np.ndarray, list[dict]]:
    """Normalised spectral clustering (module notes); every token with an edge labelled."""
    from scipy.sparse.linalg import eigsh

    W = sp.csr_matrix(W)
    n = W.shape[0]
    rng = np.random.default_rng(params.seed)
    deg = np.asarray(W.sum(axis=1)).ravel()
    dinv = np.divide(1.0, np.sqrt(deg), out=np.zeros(n), where=deg > 0)
    A = sp.diags(dinv) @ W @ sp.diags(dinv)
    if params.n_clusters > n - 2:
        raise ConfigError(f"n_clusters={params.n_clusters} is too many for {n} tokens (at most {n - 2}); lower it")
    n_eig = params.n_clusters or min(_SPECTRAL_MAX_EIG, n - 2)
    if n_eig < 2 and not params.n_clusters:
        raise DataError(f"spectral clustering needs at least 4 tokens, got {n}")
    vals, vecs = eigsh(A, k=n_eig, which="LA", v0=rng.uniform(-1.0, 1.0, n), tol=1e-8)
    order = np.argsort(-vals)
    vals, vecs = vals[order], vecs[:, order]
    if params.n_clusters:
        K = params.n_clusters
    else:
        gaps = vals[1:-1] - vals[2:]                # gap after the i-th value, i >= 2
        K = int(np.argmax(gaps)) + 2
    emb = vecs[:, :K]
    norm = np.linalg.norm(emb, axis=1, keepdims=True)
    ok = (norm[:, 0] > 0) & (deg > 0)
    labels = np.full(n, -1, dtype=np.int64)
    labels[ok] = _kmeans(emb[ok] / norm[ok], K, rng)
    return labels, [{} for _ in range(K)]


def _kmeans(X: np.ndarray, K: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ from scikit-learn (best of _KMEANS_INIT starts by inertia), seeded from `rng`; labels 0..K-1."""
    from sklearn.cluster import KMeans

    X = np.asarray(X, dtype=np.float64)
    K = min(K, X.shape[0])
    seed = int(rng.integers(2**31 - 1))
    return KMeans(n_clusters=K, n_init=_KMEANS_INIT, random_state=seed).fit_predict(X).astype(np.int64)
