"""Token clusters from susceptibilities: features, a cosine kNN graph, and three
clusterings of that graph (conductance-based local clusters, Leiden, spectral),
written to `<run_dir>/clusters.json`. docs/clustering.md has the measurements
behind the defaults.

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
- Conductance method, seeds: a static order (weighted degree, highest first,
  ties by index); each token is a seed at most once; outliers never are.
  (Ordering by mean edge weight or largest edge weight instead made no
  difference on the planted families.)
- PPR: the non-lazy Andersen-Chung-Lang push (p += alpha r; (1 - alpha) r
  spreads along the random walk) until r(u) < epsilon deg(u), one seed at a
  time with a FIFO queue, compiled with numba (`_Pusher`; our own code: no
  well-kept library offers this push). Tokens already in a cluster are sinks
  (mass reaching them leaves the walk), so the push stays among the free
  tokens and late seeds are cheap. Work arrays live as long as the graph
  and only touched entries are reset, so a push costs in proportion to the
  volume it reaches.
- Sweep: the free tokens (in no cluster, not outliers) with p > 0, by
  p(v)/deg(v); conductance of every prefix, incrementally, always in the
  whole graph (edges into earlier clusters count as cut). The cut is the
  smallest prefix of min_size..max_size tokens at or below max_conductance
  that is the bottom of a valley of the profile (nothing lower from half
  its size up to where the profile has doubled, or twice its size); if none,
  the global minimum. Taking the first valley rather than the global minimum
  keeps two adjacent clusters from being merged because their union has a
  lower conductance than either.
- Resolution: a push with tolerance epsilon resolves p(v)/deg(v) only down to
  about epsilon, so it cannot place the boundary of a cluster of volume much
  above 1/epsilon. A cut is a confirmed valley when the profile after it
  (within 4 times its size) rises to 1.1 times its conductance: the sweep saw
  its boundary. While the cut is not confirmed, its last member has p/deg
  below 4 epsilon, the residual left on free tokens exceeds `_PPR_RESOLVE`,
  and at least half the cut weight borders free tokens (a cut that borders
  clusters and outliers is not limited by the push), the same push continues
  to epsilon / 4 and the sweep is redone; the lower-conductance cut is kept.
  A continued push costs only the extra work, so a seed of a cluster of
  130,000 tokens reaches its scale in a few rounds. (Refining only while the
  conductance kept falling by 10% lost the two largest groups of the planted
  family at 1,000,000 tokens: in a high-dimensional kNN graph a piece of a
  large cluster has a high conductance that falls slowly with its size.)
- Acceptance: a confirmed cut at or below max_conductance. A cut the sweep
  never saw the profile rise after (the conductance still falling when the
  free tokens the push reaches run out) must also be cohesive: the mean of
  its members' unit feature rows at least 0.5 long (their mean pairwise
  cosine about 0.25 or more; without the features, half the conductance
  threshold instead). Without that, the background tokens left between
  clusters, weakly tied to each other, form one large cluster whose
  conductance falls slowly as it grows (at 1,000,000 planted tokens: 137,000
  tokens, 55% of them background, conductance 0.32). Cohesion on the planted
  families: groups 0.58-0.73, background 0.2; on the committed chi of the
  embedded default, a newline-rich cluster left between two large ones
  0.9. The tokens of a rejected unconfirmed cut are no longer seeds until
  every other seed has been tried, and then once more at most: each would
  lead back into the same region, at a cost proportional to its size (at
  100,000 planted tokens this cut the seeds from 22,000 to 2,300).
- Polish: an accepted cut is improved greedily: moving one token across the
  cut lowers conductance phi iff its share of weight into the set is below
  (a member) or above (a free outsider) (1 - phi)/2; all such moves are made
  together while phi falls. A seed whose cut is above max_conductance is
  noise; it may still be absorbed by a later cluster.
- Attach: when no seed is left, a free token joins the cluster that holds
  the largest weight of its edges if that weight exceeds
  (1 - max_conductance)/2 of its degree (it would lower the conductance of
  a cluster at the acceptance threshold), repeated while any token joins.
  Without it the tokens at the rim of a cluster, whose neighbours were still
  free when the cluster was accepted, stay noise: on the planted families 11%
  of the grouped tokens instead of 5% (adjusted Rand index 0.81 instead of
  0.88). The cluster's own (1 - phi_c)/2 instead of the threshold's attaches
  almost nothing. Whatever is still free is noise (-1).
- Leiden (igraph + leidenalg, RB configuration model, `resolution`, seeded,
  leidenalg's default 2 iterations) and spectral (top eigenvectors of
  D^-1/2 W D^-1/2 by `eigsh`, rows normalised, seeded k-means++; the number
  of clusters by the largest eigengap among the first `_SPECTRAL_MAX_EIG`
  when n_clusters is 0) label every token but the outliers; communities
  smaller than min_size become noise too.
- Every method's clusters are renumbered largest first (ties by smallest
  member) and their conductances recomputed the same way, so methods compare.
  Conductance of a set with no edge volume on one side is reported as 1.0.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.sparse as sp

from spectro.errors import ConfigError, DataError
from spectro.modes import modes as compute_modes
from spectro.features import KINDS as FEATURES, feature_matrix, standardize  # noqa: F401  (re-exported)
from spectro.modes import write_modes
from spectro.roles import role_agreement, token_roles

log = logging.getLogger("spectro.clusters")

METHODS = ("conductance", "leiden", "spectral")
_IVF_CELLS_PER_SQRT_N = 4.0     # inverted-file cells = this * sqrt(N)
_IVF_MIN_PER_CELL = 39          # faiss wants at least 39 training points per cell
_IVF_PROBE = 32                 # cells searched per query
_IVF_TRAIN_PER_CELL = 64        # k-means of the cells runs on a seeded sample of this many tokens per cell
_KNN_QUERY_BLOCK = 65536        # queries per faiss search call (bounds the result arrays)
_KNN_BLOCK_FLOATS = 2 ** 24     # gathered entries held at once when recomputing similarities
_CONFIRM_SPAN = 4               # a cut is a confirmed valley if, within this times its size,
_CONFIRM_RISE = 1.1             # the profile after it rises to this times its conductance
_COHESION = 0.5                 # an unconfirmed cut needs its members' mean unit feature row this long
_UNCONFIRMED = 0.5              # without features: an unconfirmed cut needs this times max_conductance
_PPR_RESOLVE = 0.05             # refine epsilon while the residual on free nodes exceeds this
_PPR_MIN_EPSILON = 1e-12
_PPR_REFINE_STEP = 4.0         # epsilon is divided by this at each refinement
_RESOLVE_FACTOR = 4.0           # a cut is unresolved while its last member's p/deg is below this times epsilon
_REFINE_FREE_SHARE = 0.5        # refine epsilon only while at least this share of the cut borders free tokens
_REFINE_ROUNDS = 20
_SPECTRAL_MAX_EIG = 40
_KMEANS_INIT = 4


# ---------------------------------------------------------------- parameters

@dataclass(frozen=True)
class ClusterParams:
    method: str = "conductance"     # "conductance" | "leiden" | "spectral"
    features: str = "centred"       # "centred" | "zscore" (`feature_matrix`)
    k: int = 10                     # nearest neighbours per token
    alpha: float = 0.15             # PPR teleport probability
    epsilon: float = 1e-4           # push tolerance (ACL): push while r(u) >= epsilon * deg(u)
    max_conductance: float = 0.4    # accept a local cluster at or below this conductance
    min_size: int = 20              # smaller clusters are noise (all methods)
    max_size: int = 0               # largest local cluster; 0: no limit
    resolution: float = 2.0         # Leiden resolution
    n_clusters: int = 0             # spectral; 0: pick by eigengap
    seed: int = 0
    exact_knn_below: int = 50000    # exact kNN below this many tokens, approximate (faiss IVF) above
    outlier_ratio: float = 0.0      # noise if relative kNN density is below this (all methods); 0: off

    def __post_init__(self):
        def integer(name, lo):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ConfigError(f"ClusterParams.{name} must be an integer >= {lo}, got {v!r}")

        def number(name, lo, hi, lo_open=True, hi_open=True):
            v = getattr(self, name)
            ok = isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and np.isfinite(v)
            ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
            if not ok:
                left, right = "(" if lo_open else "[", ")" if hi_open else "]"
                raise ConfigError(f"ClusterParams.{name} must be a number in {left}{lo}, {hi}{right}, got {v!r}")

        if self.method not in METHODS:
            raise ConfigError(f"ClusterParams.method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if self.features not in FEATURES:
            raise ConfigError(f"ClusterParams.features must be one of {', '.join(FEATURES)}; got {self.features!r}")
        integer("k", 1)
        number("alpha", 0.0, 1.0)
        number("epsilon", 0.0, 1.0)
        number("max_conductance", 0.0, 1.0, hi_open=False)
        integer("min_size", 1)
        integer("max_size", 0)
        if self.max_size and self.max_size < self.min_size:
            raise ConfigError(f"ClusterParams.max_size ({self.max_size}) is below min_size ({self.min_size}); "
                              f"raise it or set 0 for no limit")
        number("resolution", 0.0, np.inf)
        integer("n_clusters", 0)
        integer("seed", 0)
        integer("exact_knn_below", 0)
        number("outlier_ratio", 0.0, 1.0, lo_open=False)


# ------------------------------------------------------------------ features

def features(chi: np.ndarray, kind: str = "centred") -> np.ndarray:
    """Rows of `feature_matrix(chi, kind)` scaled to unit length (a dot product is then a
    cosine similarity); a row that is all zero stays zero: it has no direction, gets no
    edges and ends up as noise."""
    z = feature_matrix(chi, kind)
    norm = np.linalg.norm(z, axis=1, keepdims=True)
    return np.divide(z, norm, out=np.zeros_like(z), where=norm > 0)


# ----------------------------------------------------------------- kNN graph

def knn_graph(X: np.ndarray, k: int, seed: int = 0, exact_below: int = 50000) -> sp.csr_matrix:
    """Symmetrised cosine kNN graph of the unit rows of X (see the module notes)."""
    return _graph(*knn_lists(X, k, seed, exact_below))


def knn_lists(X: np.ndarray, k: int, seed: int = 0, exact_below: int = 50000) -> tuple[np.ndarray, np.ndarray]:
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


# --------------------------------------------------------------- conductance

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


# ------------------------------------------------------- conductance method

def conductance_clusters(W: sp.csr_matrix, params: ClusterParams, exclude: np.ndarray | None = None,
                         X: np.ndarray | None = None) -> tuple[np.ndarray, list[dict]]:
    """Seeded PPR sweep cuts, then attachment of the rims (module notes). Labels in discovery
    order, -1 = noise; one dict per cluster: conductance (of the accepted cut), seed, size.
    Tokens where `exclude` is True (outliers) stay in the graph but are never seeds or members.
    X, the unit feature rows the graph was built from, decides unconfirmed cuts by cohesion;
    without it they need half the conductance threshold (module notes)."""
    W = sp.csr_matrix(W)
    n = W.shape[0]
    deg = np.asarray(W.sum(axis=1)).ravel()
    vol_total = float(deg.sum())
    max_size = params.max_size or n
    labels = np.full(n, -1, dtype=np.int64)
    free = np.ones(n, dtype=bool) if exclude is None else ~np.asarray(exclude, dtype=bool)   # may join a cluster
    assigned = np.zeros(n, dtype=bool)             # in a cluster: a sink for every later push
    candidate = (deg > 0) & free                   # may still be a seed
    order = np.lexsort((np.arange(n), -deg))
    push = _Pusher(W, deg)
    info: list[dict] = []
    deferred = np.zeros(n, dtype=bool)
    for second in (False, True):
        for seed in order[deferred[order]] if second else order:
            if not candidate[seed]:
                continue
            candidate[seed] = False
            found, spent = _local_cluster(W, deg, vol_total, seed, free, assigned, params, max_size, push, X)
            if spent is not None:                  # a rejected unconfirmed cut (module notes)
                spent = spent[candidate[spent]]
                candidate[spent] = False
                deferred[spent] = not second
            if found is not None:
                members, phi = found
                labels[members] = len(info)
                free[members] = False
                assigned[members] = True
                candidate[members] = False
                info.append({"conductance": phi, "seed": int(seed), "size": int(members.size)})
        candidate = deferred & free
    if info:
        _attach(W, deg, labels, free, len(info), (1.0 - params.max_conductance) / 2.0, max_size)
        for c, size in enumerate(np.bincount(labels[labels >= 0], minlength=len(info))):
            info[c]["size"] = int(size)
    return labels, info


def _attach(W, deg, labels, free, n_clusters: int, share: float, max_size: int) -> None:
    """In place: each free token joins the cluster holding the largest weight of its edges if that
    weight exceeds `share` of its degree; repeated while any token joins (a token may become
    eligible once its neighbours have joined). A cluster takes no more than max_size tokens
    (the strongest joiners first)."""
    n = labels.size
    rows = np.repeat(np.arange(n), np.diff(W.indptr))
    size = np.bincount(labels[labels >= 0], minlength=n_clusters)
    while True:
        edge = free[rows] & (labels[W.indices] >= 0)
        if not edge.any():
            return
        M = sp.csr_matrix((W.data[edge], (rows[edge], labels[W.indices[edge]])), shape=(n, n_clusters))
        best = np.asarray(M.argmax(axis=1)).ravel()
        weight = np.asarray(M.max(axis=1).todense()).ravel()
        join = np.flatnonzero(free & (weight > share * deg))
        if max_size < n:
            join = join[np.lexsort((join, -weight[join] / deg[join], best[join]))]     # by cluster, strongest first
            c = best[join]
            first = np.searchsorted(c, c)                  # position of each cluster's first joiner
            join = join[np.arange(join.size) - first < max_size - size[c]]
        if join.size == 0:
            return
        labels[join] = best[join]
        free[join] = False
        size += np.bincount(best[join], minlength=n_clusters)


def _local_cluster(W, deg, vol_total, seed, free, assigned, params, max_size, push, X):
    """(cluster, spent): the cluster grown from `seed` as (members, conductance), or None (the
    seed is noise); and the members of a rejected unconfirmed cut (module notes), else None.

    Push and sweep; while the cut is not resolved by the push (module notes), continue the push
    to a smaller epsilon and sweep again; then polish an acceptable cut with `_refine`."""
    eps = params.epsilon
    nodes, p, r = push(seed, params.alpha, eps, sink=assigned)
    best = _sweep(push, deg, vol_total, nodes, p, free, params.min_size, max_size, params.max_conductance)
    while (best is not None and eps > _PPR_MIN_EPSILON and best[2] < _RESOLVE_FACTOR * eps
           and not best[3]
           and r[free[nodes]].sum() > _PPR_RESOLVE
           and _free_share_of_cut(W, best[0], free, push.rank) >= _REFINE_FREE_SHARE):
        eps /= _PPR_REFINE_STEP
        nodes, p, r = push.finer(eps)
        finer = _sweep(push, deg, vol_total, nodes, p, free, params.min_size, max_size, params.max_conductance)
        if finer is None:
            break
        best = finer if finer[1] < best[1] else best
    if best is None:
        return None, None
    if best[1] > params.max_conductance:
        return None, (None if best[3] else best[0])   # an unconfirmed cut is spent (module notes)
    if not best[3]:
        if X is not None:
            ok = np.linalg.norm(X[best[0]].mean(axis=0)) >= _COHESION
        else:
            ok = best[1] <= _UNCONFIRMED * params.max_conductance
        if not ok:
            return None, best[0]
    members, phi = _refine(W, deg, vol_total, best[0], free, params.min_size, max_size)
    return (members, float(phi)), None


def _free_share_of_cut(W, members, free, rank_buf) -> float:
    """Share of the cut weight of `members` that goes to free tokens (rank_buf: all -1, left so)."""
    rank_buf[members] = 0
    _, dst, w = _rows(W, members)
    out = rank_buf[dst] < 0
    rank_buf[members] = -1
    cut = w[out].sum()
    return float(w[out & free[dst]].sum() / cut) if cut > 0 else 0.0


class _Pusher:
    """Approximate PPR by the Andersen-Chung-Lang push, one seed at a time (module notes).
    `push(seed, alpha, epsilon, sink)` starts from a seed, `push.finer(epsilon)` continues the
    same push to a smaller tolerance (the cost of a refinement is only the extra work); each
    returns (nodes reached, p, residual r). `profile(nodes, vol_total)` is the conductance
    profile of a sweep. The work arrays are allocated once per graph and only the entries a
    push touched are reset, so a push costs in proportion to the volume it reaches, not to
    the graph's size."""

    def __init__(self, W: sp.csr_matrix, deg: np.ndarray):
        n = W.shape[0]
        self.graph = (W.indptr, W.indices, np.asarray(W.data, dtype=np.float64), np.asarray(deg, dtype=np.float64))
        self.p, self.r = np.zeros(n), np.zeros(n)
        self.queued, self.seen = np.zeros(n, dtype=np.bool_), np.zeros(n, dtype=np.bool_)
        self.queue, self.touched = np.zeros(max(n, 1), dtype=np.int64), np.zeros(max(n, 1), dtype=np.int64)
        self.count = np.zeros(1, dtype=np.int64)
        self.rank = np.full(n, -1, dtype=np.int64)
        self.no_sink = np.zeros(n, dtype=np.bool_)
        self.alpha, self.sink = 0.15, self.no_sink

    def __call__(self, seed: int, alpha: float, epsilon: float, sink: np.ndarray | None = None):
        _jit(_clear_py)(self.p, self.r, self.seen, self.touched, self.count)
        self.alpha = float(alpha)
        self.sink = self.no_sink if sink is None else np.asarray(sink, dtype=np.bool_)
        return self._run(int(seed), epsilon)

    def finer(self, epsilon: float):
        return self._run(-1, epsilon)

    def _run(self, seed: int, epsilon: float):
        return _jit(_push_py)(*self.graph, seed, self.alpha, float(epsilon), self.sink, self.p, self.r,
                              self.queued, self.seen, self.queue, self.touched, self.count)

    def profile(self, nodes: np.ndarray, vol_total: float) -> np.ndarray:
        return _jit(_profile_py)(*self.graph, np.asarray(nodes, dtype=np.int64), float(vol_total), self.rank)


_JITTED: dict = {}


def _jit(fn):
    """`fn` compiled with numba (cached on disk beside this module). The push and the sweep
    profile are our own code: no well-kept library offers them, and per-seed numpy calls cost
    more than the work they do (docs/clustering.md)."""
    if fn not in _JITTED:
        import numba

        _JITTED[fn] = numba.njit(cache=True, nogil=True)(fn)
    return _JITTED[fn]


def _profile_py(indptr, indices, data, deg, nodes, vol_total, rank):
    """Conductance of every prefix of `nodes` in the whole graph: an edge turns internal when
    its later end joins. `rank` is all -1 on entry and left so."""
    m = nodes.size
    for i in range(m):
        rank[nodes[i]] = i
    phi = np.empty(m)
    vol = 0.0
    internal2 = 0.0
    for i in range(m):
        u = nodes[i]
        vol += deg[u]
        for j in range(indptr[u], indptr[u + 1]):
            rv = rank[indices[j]]
            if rv >= 0 and rv < i:
                internal2 += 2.0 * data[j]
        cut = max(vol - internal2, 0.0)
        denom = min(vol, vol_total - vol)
        phi[i] = cut / denom if denom > 0 else 1.0
    for i in range(m):
        rank[nodes[i]] = -1
    return phi


def _push_py(indptr, indices, data, deg, seed, alpha, epsilon, sink, p, r, queued, seen, queue, touched, count):
    """Non-lazy ACL push with a FIFO queue: a node is pushed while r(u) >= epsilon deg(u); pushing
    moves alpha r(u) to p(u) and spreads (1 - alpha) r(u) over its edges by weight. Mass that
    reaches a sink leaves the walk. With seed >= 0 it starts from r = 1 on the seed (the work
    arrays must be clear); with seed < 0 it resumes the state left by the previous call (a push
    to a smaller epsilon from there gives what a fresh push would). Returns copies of (touched
    nodes, p, r); the state stays in the work arrays until `_clear_py`. count[0] is the number
    of touched nodes."""
    n = deg.size
    head, size = 0, 0
    if seed >= 0:
        r[seed] = 1.0
        seen[seed] = True
        touched[0] = seed
        count[0] = 1
        queue[0] = seed
        queued[seed] = True
        size = 1
    else:
        for i in range(count[0]):
            v = touched[i]
            if r[v] >= epsilon * deg[v]:
                queue[size] = v
                queued[v] = True
                size += 1
    n_touched = count[0]
    while size > 0:
        u = queue[head]
        head += 1
        if head == n:
            head = 0
        size -= 1
        queued[u] = False
        ru = r[u]
        p[u] += alpha * ru
        r[u] = 0.0
        share = (1.0 - alpha) * ru / deg[u]
        for j in range(indptr[u], indptr[u + 1]):
            v = indices[j]
            if sink[v]:
                continue
            if not seen[v]:
                seen[v] = True
                touched[n_touched] = v
                n_touched += 1
            r[v] += share * data[j]
            if not queued[v] and r[v] >= epsilon * deg[v]:
                tail = head + size
                if tail >= n:
                    tail -= n
                queue[tail] = v
                queued[v] = True
                size += 1
    count[0] = n_touched
    nodes = touched[:n_touched].copy()
    p_out = np.empty(n_touched)
    r_out = np.empty(n_touched)
    for i in range(n_touched):
        p_out[i] = p[nodes[i]]
        r_out[i] = r[nodes[i]]
    return nodes, p_out, r_out


def _clear_py(p, r, seen, touched, count):
    """Reset the work arrays where the last push touched them."""
    for i in range(count[0]):
        v = touched[i]
        p[v] = 0.0
        r[v] = 0.0
        seen[v] = False
    count[0] = 0


def _sweep(push, deg, vol_total, nodes, p, free, min_size, max_size, max_conductance):
    """The chosen prefix (`_pick_cut`) of the free nodes with p > 0 ranked by p/deg, as
    (members, conductance, p/deg of the last member), or None if there are fewer than min_size."""
    keep = free[nodes] & (p > 0)
    nodes, p = nodes[keep], p[keep]
    if nodes.size < min_size:
        return None
    order = np.lexsort((nodes, -p / deg[nodes]))[:max_size]
    nodes, p_sorted = nodes[order], (p / deg[nodes])[order]
    phi = push.profile(nodes, vol_total)
    j = _pick_cut(phi, min_size, max_conductance)
    after = phi[j + 1:min(_CONFIRM_SPAN * (j + 1), phi.size)]
    confirmed = after.size > 0 and after.max() >= _CONFIRM_RISE * phi[j]
    return nodes[:j + 1], float(phi[j]), float(p_sorted[j]), bool(confirmed)


def _pick_cut(phi: np.ndarray, min_size: int, max_conductance: float) -> int:
    """Index of the chosen prefix: the smallest one at or below max_conductance that is the
    bottom of a valley of the conductance profile: no lower value from half its size up to
    where the profile has doubled (or twice its size). Else the global minimum."""
    m = phi.size
    j = np.arange(min_size - 1, m)
    j = j[phi[j] <= max_conductance]
    if j.size:
        mins, maxs = _sparse_tables(phi)
        lo = np.maximum((j + 2) // 2, min_size) - 1           # size ceil((j + 1) / 2)
        end = np.minimum(2 * j + 1, m - 1)                    # size 2 (j + 1)
        right = _first_reaching(maxs, j + 1, end, 2.0 * phi[j])
        ok = phi[j] <= _range(mins, np.minimum, lo, np.maximum(right, j))
        if ok.any():
            return int(j[ok][0])
    return min_size - 1 + int(np.argmin(phi[min_size - 1:]))


def _sparse_tables(x: np.ndarray) -> tuple[list, list]:
    mins, maxs = [x], [x]
    while 2 ** len(mins) <= x.size:
        half = 2 ** (len(mins) - 1)
        mins.append(np.minimum(mins[-1][:-half], mins[-1][half:]))
        maxs.append(np.maximum(maxs[-1][:-half], maxs[-1][half:]))
    return mins, maxs


def _range(table: list, op, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """op over x[lo[i]:hi[i] + 1] for every i (lo <= hi), from a sparse table of x."""
    level = np.floor(np.log2(hi - lo + 1)).astype(int)
    out = np.empty(lo.size)
    for lev in np.unique(level):
        sel = level == lev
        out[sel] = op(table[lev][lo[sel]], table[lev][hi[sel] - 2 ** lev + 1])
    return out


def _first_reaching(maxs: list, start: np.ndarray, end: np.ndarray, threshold: np.ndarray) -> np.ndarray:
    """For each i the first r in [start, end] with x[r] >= threshold, else end (also when
    start > end): a vectorised binary search on range maxima."""
    out = end.copy()
    live = np.flatnonzero(start <= end)
    live = live[_range(maxs, np.maximum, start[live], end[live]) >= threshold[live]]
    lo, hi = start[live], end[live]
    while (lo < hi).any():
        mid = (lo + hi) // 2
        left = _range(maxs, np.maximum, start[live], mid) >= threshold[live]
        hi = np.where(left, mid, hi)
        lo = np.where(left, lo, mid + 1)
    out[live] = lo
    return out


def _refine(W, deg, vol_total, members, free, min_size, max_size):
    """Greedy conductance improvement of a sweep cut. With phi the current conductance,
    moving one node across the cut lowers phi iff its weight into the set is below
    (member) or above (free outsider) (1 - phi)/2 of its degree. All such moves are
    made together while phi falls, at most _REFINE_ROUNDS times. Returns (members, phi)."""
    inside = np.zeros(W.shape[0], dtype=bool)
    inside[members] = True
    phi, moves = _cut_moves(W, deg, vol_total, members, inside, free)
    for _ in range(_REFINE_ROUNDS):
        drop, add = moves
        if drop.size == 0 and add.size == 0:
            break
        trial = inside.copy()
        trial[drop] = False
        trial[add] = True
        new_members = np.flatnonzero(trial)
        if not min_size <= new_members.size <= max_size:
            break
        new_phi, new_moves = _cut_moves(W, deg, vol_total, new_members, trial, free)
        if new_phi >= phi:
            break
        members, inside, phi, moves = new_members, trial, new_phi, new_moves
    return members, phi


def _cut_moves(W, deg, vol_total, members, inside, free):
    """Conductance of the set and the (drop, add) moves that would each lower it."""
    src, dst, w = _rows(W, members)
    into = inside[dst]
    w_in = np.bincount(src[into], weights=w[into], minlength=members.size)
    vol = float(deg[members].sum())
    denom = min(vol, vol_total - vol)
    phi = max(vol - float(w_in.sum()), 0.0) / denom if denom > 0 else 1.0
    limit = (1.0 - phi) / 2.0
    drop = members[w_in < limit * deg[members]]
    out = ~into & free[dst]
    cand, inv = np.unique(dst[out], return_inverse=True)
    w_out = np.bincount(inv, weights=w[out], minlength=cand.size)
    add = cand[w_out > limit * deg[cand]]
    return phi, (drop, add)


def _rows(W, nodes):
    """The edges leaving `nodes`: (position of the source in nodes, target, weight)."""
    start = W.indptr[nodes]
    count = W.indptr[nodes + 1] - start
    pos = np.arange(int(count.sum())) + np.repeat(start - (np.cumsum(count) - count), count)
    return np.repeat(np.arange(nodes.size), count), W.indices[pos], W.data[pos]


# ---------------------------------------------------------------- baselines

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


def _kmeans(X: np.ndarray, K: int, rng: np.random.Generator, n_iter: int = 100) -> np.ndarray:
    """Seeded k-means++ (best of _KMEANS_INIT starts by inertia); labels 0..K-1."""
    X = np.asarray(X, dtype=np.float64)
    K = min(K, X.shape[0])
    sq = np.einsum("ij,ij->i", X, X)
    best, best_inertia = None, np.inf
    for _ in range(_KMEANS_INIT):
        cent = [X[rng.integers(X.shape[0])]]
        d2 = np.maximum(sq - 2 * X @ cent[0] + cent[0] @ cent[0], 0)
        for _ in range(1, K):
            total = d2.sum()
            i = rng.choice(X.shape[0], p=d2 / total) if total > 0 else rng.integers(X.shape[0])
            cent.append(X[i])
            d2 = np.minimum(d2, np.maximum(sq - 2 * X @ X[i] + X[i] @ X[i], 0))
        C = np.array(cent)
        labels = None
        for _ in range(n_iter):
            dist = sq[:, None] - 2 * X @ C.T + np.einsum("ij,ij->i", C, C)[None, :]
            new = np.argmin(dist, axis=1)
            if labels is not None and np.array_equal(new, labels):
                break
            labels = new
            counts = np.bincount(labels, minlength=K)
            sums = np.zeros_like(C)
            np.add.at(sums, labels, X)
            C = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], C)
        inertia = float(np.maximum(dist[np.arange(X.shape[0]), labels], 0).sum())
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    return best


# ------------------------------------------------------------------- driver

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


def token_graph(X: np.ndarray, params: ClusterParams) -> tuple[sp.csr_matrix, np.ndarray]:
    """The kNN graph of the feature rows X and the outlier mask (module notes)."""
    nbr, sim = knn_lists(X, params.k, params.seed, params.exact_knn_below)
    return _graph(nbr, sim), relative_density(nbr, sim) < params.outlier_ratio


def cluster_graph(W: sp.csr_matrix, outlier: np.ndarray, params: ClusterParams,
                  X: np.ndarray | None = None) -> np.ndarray:
    """Labels by `params.method` on graph W, outliers -1, clusters numbered largest first; X: the
    unit feature rows W was built from (the conductance method uses them, module notes)."""
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
    """Adjusted Rand index of two labellings (every distinct value a cluster, -1 included)."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.size != b.size:
        raise DataError(f"labellings differ in length: {a.size} and {b.size}")
    n = a.size
    if n < 2:
        return 1.0
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    table = sp.coo_matrix((np.ones(n), (ia, ib))).tocsr()
    table.sum_duplicates()

    def pairs(x):
        x = np.asarray(x, dtype=np.float64)
        return float((x * (x - 1) / 2).sum())

    both = pairs(table.data)
    pa, pb = pairs(np.bincount(ia)), pairs(np.bincount(ib))
    expected = pa * pb / (n * (n - 1) / 2)
    top = (pa + pb) / 2
    return 1.0 if top == expected else (both - expected) / (top - expected)


# ------------------------------------------------------------------- output

def write_clusters(run_dir, clustering: Clustering, chi: np.ndarray, components: Sequence[str],
                   token_text: Sequence[str], token_source: Sequence[str], top_n: int = 20) -> Path:
    """Write `<run_dir>/clusters.json` and return its path: method, params, components, n_tokens,
    n_clusters, n_noise, role_agreement, labels (-1 = noise), and per cluster id, size,
    conductance, profile (mean z-scored chi), profile_raw, top_tokens, sources, roles, members."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"run directory {run_dir} does not exist; create it or pass the run's directory")
    chi = np.asarray(chi, dtype=np.float64)
    components = [str(c) for c in components]
    n = clustering.labels.size
    if chi.ndim != 2 or chi.shape != (n, len(components)):
        raise DataError(f"chi has shape {chi.shape}; expected ({n} tokens, {len(components)} components) to match "
                        f"the clustering and the component names")
    if len(token_text) != n or len(token_source) != n:
        raise DataError(f"token_text ({len(token_text)}) and token_source ({len(token_source)}) must have one "
                        f"entry per token ({n})")
    if isinstance(top_n, bool) or not isinstance(top_n, (int, np.integer)) or top_n < 1:
        raise ConfigError(f"top_n must be a positive integer, got {top_n!r}")
    z = standardize(chi)
    text = np.asarray(token_text, dtype=object)
    source = np.asarray(token_source, dtype=object)
    roles = token_roles(token_text, token_source)
    out_clusters = []
    for c in clustering.clusters:
        m = np.sort(np.asarray(c["members"], dtype=np.int64))
        sources = Counter(str(s) for s in source[m]).most_common()
        out_clusters.append({
            "id": int(c["id"]),
            "size": int(m.size),
            "conductance": float(c["conductance"]),
            "profile": [float(x) for x in z[m].mean(axis=0)],
            "profile_raw": [float(x) for x in chi[m].mean(axis=0)],
            "top_tokens": [[str(t), int(k)] for t, k in Counter(str(t) for t in text[m]).most_common(int(top_n))],
            "sources": {s: int(k) for s, k in sources},
            "roles": {r: int(k) for r, k in Counter(roles[m].tolist()).most_common()},
            "members": m.tolist(),
        })
    labels = clustering.labels
    doc = {
        "method": clustering.params.method,
        "params": asdict(clustering.params),
        "components": components,
        "n_tokens": int(n),
        "n_clusters": len(out_clusters),
        "n_noise": int((labels < 0).sum()),
        "role_agreement": role_agreement(labels, roles, seed=0, shuffles=10) if out_clusters else None,
        "labels": labels.astype(np.int64).tolist(),
        "clusters": out_clusters,
    }
    path = run_dir / "clusters.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, allow_nan=False))
    tmp.replace(path)
    return path


def cluster_run(run_dir, params: ClusterParams = ClusterParams()) -> dict:
    """Cluster `<run_dir>/susceptibilities.zarr` (without the "full" component); write clusters.json and
    modes.json; return a summary."""
    from spectro.components import FULL
    from spectro.store import read_susceptibilities

    run_dir = Path(run_dir)
    ds = read_susceptibilities(run_dir / "susceptibilities.zarr")
    missing = [v for v in ("chi", "component", "token_text", "token_source") if v not in ds.variables]
    if missing:
        raise DataError(f"{run_dir / 'susceptibilities.zarr'} lacks {', '.join(missing)}; "
                        f"re-run the susceptibilities stage")
    names = [str(c) for c in ds["component"].values]
    chi_all = np.asarray(ds["chi"].values, dtype=np.float64)
    keep = [i for i, c in enumerate(names) if c != FULL]
    empty = [names[i] for i in keep if np.isnan(chi_all[:, i]).all()]
    if empty:
        log.warning("dropping components with no estimate (all NaN; no usable chain): %s", ", ".join(empty))
        keep = [i for i in keep if names[i] not in empty]
    if not keep:
        raise DataError(f"{run_dir / 'susceptibilities.zarr'} has no component to cluster on besides {FULL!r}")
    chi = chi_all[:, keep]
    components = [names[i] for i in keep]
    token_text = [str(t) for t in ds["token_text"].values]
    token_source = [str(s) for s in ds["token_source"].values]

    result = cluster(chi, params)
    clusters_path = write_clusters(run_dir, result, chi, components, token_text, token_source)
    modes_path = write_modes(run_dir, compute_modes(chi, components, token_text))
    sizes = [c["size"] for c in result.clusters]
    summary = {"clusters_path": str(clusters_path), "modes_path": str(modes_path), "method": params.method,
               "n_tokens": int(result.labels.size), "n_clusters": len(result.clusters),
               "n_noise": int((result.labels < 0).sum()), "largest": sizes[:10],
               "median_conductance": float(np.median([c["conductance"] for c in result.clusters])) if sizes else None,
               "components": components, "dropped_components": empty, "graph_stats": result.graph_stats,
               "role_agreement": json.loads(clusters_path.read_text())["role_agreement"]}
    log.info("clusters: %d clusters, %d noise of %d tokens (%s)", summary["n_clusters"], summary["n_noise"],
             summary["n_tokens"], params.method)
    return summary
