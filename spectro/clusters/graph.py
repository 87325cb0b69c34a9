"""The token graph: unit feature rows, their cosine k nearest neighbours
(faiss), the symmetrised weighted graph, the outlier mask, and the
conductance of token sets in it. docs/clustering.md has the measurements
behind the choices.

Non-obvious choices:
- Features (`feature_matrix`, `features`): each component column is z-scored
  (`spectro.features`; a column with zero variance becomes 0). With the
  default "centred", each token row's mean over components is then
  subtracted: that removes exactly a mode with the same loading on every
  component, which in real chi carries almost all of the variance (a
  per-token overall sensitivity) and otherwise decides every cosine. Rows are
  then L2-normalised, so a dot product is a cosine similarity. A row that is
  all zero after centring (nothing but that mode) has no direction: it gets
  no edges and ends up as noise. "zscore" skips the centring.
- kNN (faiss-cpu): exact inner products (`IndexFlatIP`) below
  `exact_knn_below` tokens; above, an inverted file (`IndexIVFFlat`, about
  4 sqrt(N) cells from a seeded k-means on 64 tokens per cell, 32 cells
  searched per query). Pairs are chosen in float32, similarities recomputed
  in float64. faiss replaced an inverted file written here: at 100,000
  tokens it was both faster and more accurate at equal time (recall against
  exact neighbours in docs/clustering.md).
- Graph: the union symmetrisation (an edge if either token is among the
  other's k nearest), weight the cosine similarity (the same both ways),
  non-positive weights dropped, no self loops.
- Outliers (`outlier_ratio`, all methods; 0, off, by default): a token's
  density is its mean similarity to its k nearest; a token whose density is
  below outlier_ratio times that of its densest neighbour is labelled noise
  and is never a seed or member. It stays in the graph, so conductances are
  unchanged. On the planted families every ratio that labels a useful share
  of background tokens noise labels more grouped tokens noise as well.
- Conductance of a set with no edge volume on one side is 1.0.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from spectro.clusters.params import DEFAULTS, ClusterParams
from spectro.errors import ConfigError, DataError
from spectro.features import feature_matrix

_IVF_CELLS_PER_SQRT_N = 4.0     # inverted-file cells = this * sqrt(N)
_IVF_MIN_PER_CELL = 39          # faiss wants at least 39 training points per cell
_IVF_PROBE = 32                 # cells searched per query
_IVF_TRAIN_PER_CELL = 64        # k-means of the cells runs on a seeded sample of this many tokens per cell
_KNN_QUERY_BLOCK = 65536        # queries per faiss search call (bounds the result arrays)
_KNN_BLOCK_FLOATS = 2 ** 24     # gathered entries held at once when recomputing similarities


def features(chi: np.ndarray, kind: str = DEFAULTS.features) -> np.ndarray:
    """Rows of `feature_matrix(chi, kind)` scaled to unit length (a dot product is then a
    cosine similarity); a row that is all zero stays zero: it has no direction, gets no
    edges and ends up as noise."""
    z = feature_matrix(chi, kind)
    norm = np.linalg.norm(z, axis=1, keepdims=True)
    return np.divide(z, norm, out=np.zeros_like(z), where=norm > 0)



def knn_graph(X: np.ndarray, k: int, seed: int = DEFAULTS.seed,
              exact_below: int = DEFAULTS.exact_knn_below) -> sp.csr_matrix:
    """Symmetrised cosine kNN graph of the unit rows of X (see the module notes)."""
    return _graph(*knn_lists(X, k, seed, exact_below))


def knn_lists(X: np.ndarray, k: int, seed: int = DEFAULTS.seed,
              exact_below: int = DEFAULTS.exact_knn_below) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k nearest other rows by cosine (faiss; module notes): indices (n, k), -1 where
    fewer were found, and float64 similarities (n, k), in decreasing order."""
    X = np.asarray(X, dtype=np.float64)
    n = X.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    if k >= n:
        raise ConfigError(f"k={k} nearest neighbours need at least {k + 1} tokens, got {n}; lower k")
    try:
        import faiss
    except ImportError as e:
        raise ConfigError("the kNN graph needs the package faiss-cpu: pip install faiss-cpu") from e
    Xf = np.ascontiguousarray(X, dtype=np.float32)
    d = Xf.shape[1]
    if n < exact_below:
        index = faiss.IndexFlatIP(d)
    else:
        n_cells = int(min(n // _IVF_MIN_PER_CELL, max(1, round(_IVF_CELLS_PER_SQRT_N * np.sqrt(n)))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, max(n_cells, 1), faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = int(seed)
        index.cp.max_points_per_centroid = _IVF_TRAIN_PER_CELL
        index.train(Xf)
        index.nprobe = min(_IVF_PROBE, index.nlist)
    index.add(Xf)
    nbr = np.empty((n, k), dtype=np.int64)
    for s in range(0, n, _KNN_QUERY_BLOCK):
        _, found = index.search(Xf[s:s + _KNN_QUERY_BLOCK], k + 1)
        own = found == np.arange(s, s + found.shape[0])[:, None]
        drop = np.where(own.any(axis=1), own.argmax(axis=1), k)      # the token itself, else the last
        keep = np.ones(found.shape, dtype=bool)
        keep[np.arange(found.shape[0]), drop] = False
        nbr[s:s + found.shape[0]] = found[keep].reshape(-1, k)
    sim = np.empty(nbr.shape)
    step = max(1, _KNN_BLOCK_FLOATS // (8 * k * d))            # bounded (rows, k, d) gathers
    for s in range(0, n, step):
        sim[s:s + step] = np.einsum("ij,ikj->ik", X[s:s + step], X[np.maximum(nbr[s:s + step], 0)])
    sim[nbr < 0] = -np.inf
    order = np.argsort(-sim, axis=1, kind="stable")
    return np.take_along_axis(nbr, order, axis=1), np.take_along_axis(sim, order, axis=1)


def _graph(nbr: np.ndarray, sim: np.ndarray) -> sp.csr_matrix:
    n, k = nbr.shape
    rows = np.repeat(np.arange(n), k)
    cols, w = nbr.ravel(), sim.ravel()
    keep = (cols >= 0) & (w > 0)
    A = sp.csr_matrix((w[keep], (rows[keep], cols[keep])), shape=(n, n))
    W = A.maximum(A.T).tocsr()
    W.setdiag(0)
    W.eliminate_zeros()
    W.sort_indices()
    return W


def relative_density(nbr: np.ndarray, sim: np.ndarray) -> np.ndarray:
    """Each token's mean similarity to its k nearest over the same quantity of its densest
    neighbour: about 1 inside a cluster, low for a token hanging off a cluster it is not
    part of (its nearest tokens are much closer to each other than to it)."""
    valid = nbr >= 0
    s = np.where(valid, np.maximum(sim, 0.0), 0.0).sum(axis=1) / np.maximum(valid.sum(axis=1), 1)
    densest = np.where(valid, s[np.maximum(nbr, 0)], 0.0).max(axis=1)
    return np.divide(s, densest, out=np.ones_like(s), where=densest > 0)



def token_graph(X: np.ndarray, params: ClusterParams) -> tuple[sp.csr_matrix, np.ndarray]:
    """The kNN graph of the feature rows X and the outlier mask (module notes)."""
    nbr, sim = knn_lists(X, params.k, params.seed, params.exact_knn_below)
    return _graph(nbr, sim), relative_density(nbr, sim) < params.outlier_ratio



def conductance(W: sp.spmatrix, members) -> float:
    """cut(S, V minus S) / min(vol S, vol V minus S) for the token indices `members` of graph W."""
    W = sp.csr_matrix(W)
    members = np.unique(np.asarray(members, dtype=np.int64))
    n = W.shape[0]
    if members.size == 0 or members[0] < 0 or members[-1] >= n:
        raise DataError(f"members must be a non-empty set of token indices in [0, {n}); got {members.size} "
                        f"indices{'' if members.size == 0 else f' in [{members[0]}, {members[-1]}]'}")
    deg = np.asarray(W.sum(axis=1)).ravel()
    inside = np.zeros(n, dtype=bool)
    inside[members] = True
    sub = W[members]
    vol = float(sub.sum())
    internal = float(sub[:, inside].sum())
    denom = min(vol, float(deg.sum()) - vol)
    return float(max(vol - internal, 0.0) / denom) if denom > 0 else 1.0


def _conductances(W: sp.csr_matrix, labels: np.ndarray, n_clusters: int) -> np.ndarray:
    deg = np.asarray(W.sum(axis=1)).ravel()
    rows = np.repeat(np.arange(W.shape[0]), np.diff(W.indptr))
    lr, lc = labels[rows], labels[W.indices]
    cut_edge = (lr >= 0) & (lr != lc)
    cut = np.bincount(lr[cut_edge], weights=W.data[cut_edge], minlength=n_clusters)
    vol = np.bincount(labels[labels >= 0], weights=deg[labels >= 0], minlength=n_clusters)
    denom = np.minimum(vol, deg.sum() - vol)
    return np.where(denom > 0, cut / np.where(denom > 0, denom, 1.0), 1.0)



def _rows(W, nodes):
    """The edges leaving `nodes`: (position of the source in nodes, target, weight)."""
    start = W.indptr[nodes]
    count = W.indptr[nodes + 1] - start
    pos = np.arange(int(count.sum())) + np.repeat(start - (np.cumsum(count) - count), count)
    return np.repeat(np.arange(nodes.size), count), W.indices[pos], W.data[pos]

