"""Token clusters from susceptibilities (DESIGN 1.6): features, a cosine kNN
graph, and three clusterings of that graph (conductance-based local clusters,
Leiden, spectral), written to `<run_dir>/clusters.json`.

Non-obvious choices:
- Features: each component column is z-scored (`modes.standardize`; a column
  with zero variance becomes 0), then each token row is L2-normalised, so a
  dot product is a cosine similarity. A row that is all zero after z-scoring
  has no direction: it gets no edges and ends up as noise.
- kNN: exact (blocked products, torch `topk`) below `exact_knn_below`
  tokens. Above, an inverted-file search written here (deterministic for a
  seed, no extra dependency): seeded spherical k-means puts the tokens in
  about 2 sqrt(N) cells; each cell's tokens are compared with the tokens of
  the `_IVF_PROBE` cells whose centroids are nearest its own (probing per
  cell, so the work is a few hundred dense products, run on one torch thread:
  for products this small, threads cost more than they give). Recall is
  measured by `benchmarks/bench_clusters.py`. Pairs are chosen in float32,
  similarities recomputed in float64.
- Graph: the union symmetrisation (an edge if either token is among the
  other's k nearest), weight the cosine similarity (the same both ways),
  non-positive weights dropped, no self loops.
- Outliers (`outlier_ratio`, all methods): a token's density is its mean
  similarity to its k nearest; a token whose density is below outlier_ratio
  times that of its densest neighbour hangs off a cluster rather than
  belonging to it. Conductance alone cannot reject such tokens (a token whose
  edges all lead into a set always lowers the set's conductance), so they are
  labelled noise. They stay in the graph, so conductances are unchanged.
- Conductance method, seeds: a static order (weighted degree, highest first,
  ties by index); each token is a seed at most once; outliers never are.
- PPR: the non-lazy Andersen-Chung-Lang push (p += alpha r; (1 - alpha) r
  spreads along the random walk) until r(u) < epsilon deg(u), synchronous
  over all active nodes (vectorised numpy, local: only touched nodes are
  read). The first push of a seed runs on the whole graph, so it does not
  depend on what is assigned; several seeds are therefore pushed together
  in one flat (seed, node) index space ahead of their turn, which gives
  exactly the sequential result (a seed absorbed before its turn is skipped,
  and the batch size adapts to how many are).
- Sweep: the free tokens (in no cluster, not outliers) with p > 0, by
  p(v)/deg(v); conductance of every prefix, incrementally, always in the
  whole graph (edges into earlier clusters count as cut). The cut is the
  smallest prefix of min_size..max_size tokens at or below max_conductance
  that is the bottom of a valley of the profile (nothing lower from half
  its size up to where the profile has doubled, or twice its size); if none,
  the global minimum. Taking the first valley rather than the global minimum
  keeps two adjacent clusters from being merged because their union has a
  lower conductance than either.
- Resolution: a push with tolerance epsilon cannot resolve a cluster of
  volume much above 1/epsilon. While the residual left on free tokens exceeds
  `_PPR_RESOLVE` and at least half the cut weight borders free tokens (a
  cut that borders clusters and outliers is not limited by the push), the
  seed is pushed again with epsilon / 4 (tokens already in clusters are sinks
  in these pushes, which keeps leftover seeds cheap), for as long as the
  cut's conductance keeps falling by 10%.
- Polish: an accepted cut is improved greedily: moving one token across the
  cut lowers conductance phi iff its share of weight into the set is below
  (a member) or above (a free outsider) (1 - phi)/2; all such moves are made
  together while phi falls. A seed whose cut is above max_conductance is
  noise; it may still be absorbed by a later cluster. Whatever no cluster
  absorbs is noise (-1).
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
from spectro.modes import standardize, write_modes
from spectro.roles import role_agreement, token_roles

log = logging.getLogger("spectro.clusters")

METHODS = ("conductance", "leiden", "spectral")
_IVF_CELLS_PER_SQRT_N = 2.0     # cells = this * sqrt(N)
_IVF_PROBE = 32                 # cells compared with each cell (its own included)
_IVF_KMEANS_ITERS = 10
_IVF_KMEANS_SAMPLE = 32         # k-means runs on this many tokens per cell
_KNN_BLOCK_FLOATS = 2 ** 24     # similarity entries held at once (64 MB in float32)
_PPR_MAX_BATCH = 64             # seeds pushed together, at most
_PPR_MAX_SLOTS = 10_000_000     # batch x tokens, at most (memory of the flat push arrays)
_PPR_RESOLVE = 0.05             # refine epsilon while the residual on free nodes exceeds this
_PPR_MIN_EPSILON = 1e-12
_PPR_REFINE_STEP = 4.0         # epsilon is divided by this at each refinement
_REFINE_MIN_GAIN = 0.9          # refine again only while the cut's conductance fell below this factor
_REFINE_FREE_SHARE = 0.5        # refine epsilon only while at least this share of the cut borders free tokens
_REFINE_ROUNDS = 20
_SPECTRAL_MAX_EIG = 40
_KMEANS_INIT = 4


# ---------------------------------------------------------------- parameters

@dataclass(frozen=True)
class ClusterParams:
    method: str = "conductance"     # "conductance" | "leiden" | "spectral"
    k: int = 15                     # nearest neighbours per token
    alpha: float = 0.15             # PPR teleport probability
    epsilon: float = 1e-4           # push tolerance (ACL): push while r(u) >= epsilon * deg(u)
    max_conductance: float = 0.3    # accept a local cluster at or below this conductance
    min_size: int = 5               # smaller clusters are noise (all methods)
    max_size: int = 0               # largest local cluster; 0: no limit
    resolution: float = 1.0         # Leiden resolution
    n_clusters: int = 0             # spectral; 0: pick by eigengap
    seed: int = 0
    exact_knn_below: int = 20000    # exact kNN below this many tokens, approximate above
    outlier_ratio: float = 0.8      # noise if relative kNN density is below this (all methods); 0: off

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

def features(chi: np.ndarray) -> np.ndarray:
    """Rows of unit length from column-z-scored chi (tokens, components), float64."""
    z = standardize(chi)
    norm = np.linalg.norm(z, axis=1, keepdims=True)
    return np.divide(z, norm, out=np.zeros_like(z), where=norm > 0)


# ----------------------------------------------------------------- kNN graph

def knn_graph(X: np.ndarray, k: int, seed: int = 0, exact_below: int = 20000) -> sp.csr_matrix:
    """Symmetrised cosine kNN graph of the unit rows of X (see the module notes)."""
    return _graph(*knn_lists(X, k, seed, exact_below))


def knn_lists(X: np.ndarray, k: int, seed: int = 0, exact_below: int = 20000) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k nearest other rows by cosine: indices (n, k), -1 where fewer were found,
    and float64 similarities (n, k), in decreasing order."""
    X = np.asarray(X, dtype=np.float64)
    n = X.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    if k >= n:
        raise ConfigError(f"k={k} nearest neighbours need at least {k + 1} tokens, got {n}; lower k")
    import torch

    Xf = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    if n < exact_below:
        nbr = _exact_knn(Xf, k)
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)            # many small products: threads cost more than they give
        try:
            nbr = _ivf_knn(Xf, k, np.random.default_rng(seed))
        finally:
            torch.set_num_threads(threads)
    sim = np.empty(nbr.shape)
    step = max(1, _KNN_BLOCK_FLOATS // (8 * k * X.shape[1]))   # bounded (rows, k, d) gathers
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


def _exact_knn(Xf, k: int) -> np.ndarray:
    import torch

    n = Xf.shape[0]
    out = np.empty((n, k), dtype=np.int64)
    step = max(1, _KNN_BLOCK_FLOATS // n)
    for s in range(0, n, step):
        S = Xf[s:s + step] @ Xf.T
        idx = torch.arange(S.shape[0])
        S[idx, idx + s] = -np.inf
        out[s:s + step] = torch.topk(S, k, dim=1).indices.numpy()
    return out


def _ivf_knn(Xf, k: int, rng: np.random.Generator) -> np.ndarray:
    import torch

    n = Xf.shape[0]
    n_cells = int(min(n, max(1, round(_IVF_CELLS_PER_SQRT_N * np.sqrt(n)))))
    cent = _spherical_kmeans(Xf, n_cells, rng)
    assign = torch.cat([torch.argmax(Xf[s:s + 65536] @ cent.T, dim=1) for s in range(0, n, 65536)]).numpy()
    order = np.argsort(assign, kind="stable")
    bounds = np.searchsorted(assign[order], np.arange(n_cells + 1))
    Xs = Xf[torch.from_numpy(order)]                 # tokens sorted by cell: each cell a slice
    probe = min(_IVF_PROBE, n_cells)
    csim = cent @ cent.T
    csim.fill_diagonal_(np.inf)                      # a cell always probes itself first
    near = torch.topk(csim, probe, dim=1).indices.numpy()
    out = np.full((n, k), -1, dtype=np.int64)
    for c in range(n_cells):
        q0, q1 = bounds[c], bounds[c + 1]
        if q0 == q1:
            continue
        cells = near[c]
        cand_pos = np.concatenate([np.arange(bounds[j], bounds[j + 1]) for j in cells])
        cand = Xs[torch.from_numpy(cand_pos)]
        kk = min(k, cand_pos.size - 1)
        step = max(1, _KNN_BLOCK_FLOATS // max(1, cand_pos.size))
        for s in range(q0, q1, step):
            e = min(q1, s + step)
            S = Xs[s:e] @ cand.T
            idx = torch.arange(e - s)
            S[idx, idx + (s - q0)] = -np.inf         # own cell's slice comes first in cand
            top = torch.topk(S, kk, dim=1).indices.numpy()
            out[order[s:e], :kk] = order[cand_pos[top]]
    return out


def _spherical_kmeans(Xf, n_cells: int, rng: np.random.Generator):
    import torch

    n = Xf.shape[0]
    sample = Xf[torch.from_numpy(np.sort(rng.choice(n, size=min(n, _IVF_KMEANS_SAMPLE * n_cells), replace=False)))]
    cent = sample[torch.from_numpy(rng.choice(sample.shape[0], size=n_cells, replace=False))].clone()
    for _ in range(_IVF_KMEANS_ITERS):
        a = torch.argmax(sample @ cent.T, dim=1)
        s = torch.zeros_like(cent).index_add_(0, a, sample)
        norm = s.norm(dim=1, keepdim=True)
        cent = torch.where(norm > 0, s / norm.clamp_min(1e-30), cent)
    return cent


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

def conductance_clusters(W: sp.csr_matrix, params: ClusterParams,
                         exclude: np.ndarray | None = None) -> tuple[np.ndarray, list[dict]]:
    """Seeded PPR sweep cuts (module notes). Labels in discovery order, -1 = noise;
    one dict per cluster: conductance, seed, size. Tokens where `exclude` is True
    (outliers) stay in the graph but are never seeds or members."""
    W = sp.csr_matrix(W)
    n = W.shape[0]
    deg = np.asarray(W.sum(axis=1)).ravel()
    vol_total = float(deg.sum())
    max_size = params.max_size or n
    labels = np.full(n, -1, dtype=np.int64)
    free = np.ones(n, dtype=bool) if exclude is None else ~np.asarray(exclude, dtype=bool)   # may join a cluster
    candidate = (deg > 0) & free                   # may still be a seed
    order = np.lexsort((np.arange(n), -deg))
    rank_buf = np.full(n, -1, dtype=np.int64)
    max_batch = int(max(1, min(_PPR_MAX_BATCH, _PPR_MAX_SLOTS // max(n, 1))))
    batch_size, ptr = 1, 0
    info: list[dict] = []
    while True:
        batch = []
        while ptr < n and len(batch) < batch_size:
            v = order[ptr]
            ptr += 1
            if candidate[v]:
                batch.append(v)
        if not batch:
            break
        pprs = _ppr_push(W, deg, np.asarray(batch), params.alpha, params.epsilon)
        used = 0
        for seed, ppr in zip(batch, pprs):
            if not candidate[seed]:
                continue                           # absorbed by a cluster found earlier in this batch
            used += 1
            candidate[seed] = False
            found = _local_cluster(W, deg, vol_total, seed, ppr, free, labels >= 0, params, max_size, rank_buf)
            if found is not None:
                members, phi = found
                labels[members] = len(info)
                free[members] = False
                candidate[members] = False
                info.append({"conductance": phi, "seed": int(seed), "size": int(members.size)})
        if used * 2 >= len(batch):
            batch_size = min(batch_size * 2, max_batch)
        elif used * 4 < len(batch):
            batch_size = max(batch_size // 2, 1)
    return labels, info


def _local_cluster(W, deg, vol_total, seed, ppr, free, assigned, params, max_size, rank_buf):
    """The cluster grown from `seed` as (members, conductance), or None (the seed is noise).

    Sweep the PPR; while the push left residual mass on free tokens and the cut mostly
    borders free tokens (so a finer push could move it), push again with a smaller epsilon
    (assigned tokens as sinks); then polish an acceptable cut with `_refine`."""
    nodes, p, r = ppr
    eps = params.epsilon
    best = _sweep(W, deg, vol_total, nodes, p, free, params.min_size, max_size, params.max_conductance, rank_buf)
    while (best is not None and eps > _PPR_MIN_EPSILON and r[free[nodes]].sum() > _PPR_RESOLVE
           and _free_share_of_cut(W, best[0], free) >= _REFINE_FREE_SHARE):
        eps /= _PPR_REFINE_STEP
        nodes, p, r = _ppr_push(W, deg, np.asarray([seed]), params.alpha, eps, sink=assigned)[0]
        finer = _sweep(W, deg, vol_total, nodes, p, free, params.min_size, max_size, params.max_conductance,
                       rank_buf)
        if finer is None:
            break
        gain = finer[1] < _REFINE_MIN_GAIN * best[1]
        best = finer if finer[1] < best[1] else best
        if not gain:
            break                                  # a finer push no longer improves the cut
    if best is None or best[1] > params.max_conductance:
        return None
    members, phi = _refine(W, deg, vol_total, best[0], free, params.min_size, max_size)
    return members, float(phi)


def _free_share_of_cut(W, members, free) -> float:
    """Share of the cut weight of `members` that goes to free tokens."""
    inside = np.zeros(W.shape[0], dtype=bool)
    inside[members] = True
    _, dst, w = _rows(W, members)
    out = ~inside[dst]
    cut = w[out].sum()
    return float(w[out & free[dst]].sum() / cut) if cut > 0 else 0.0


def _ppr_push(W: sp.csr_matrix, deg: np.ndarray, seeds: np.ndarray, alpha: float, epsilon: float,
              sink: np.ndarray | None = None):
    """Approximate PPR from each seed; [(nodes reached, p, residual r)] per seed.

    Flat index seed_slot * n + node. The arrays are calloc'd, so only the pages a
    push touches cost memory; duplicates among targets are found with a stamp array
    (the last writer of each index wins) instead of sorting."""
    n, b = W.shape[0], seeds.size
    indptr, indices, data = W.indptr, W.indices, W.data
    threshold = epsilon * deg
    r = np.zeros(b * n)
    p = np.zeros(b * n)
    stamp = np.zeros(b * n, dtype=np.int64)
    reached = np.zeros(b * n, dtype=bool)
    active = np.arange(b, dtype=np.int64) * n + seeds
    r[active] = 1.0
    reached[active] = True
    first_reach = [active]
    while active.size:
        node = active % n
        ru = r[active]
        p[active] += alpha * ru
        r[active] = 0.0
        start = indptr[node]
        count = indptr[node + 1] - start
        rep = np.repeat(np.arange(active.size), count)
        pos = np.arange(int(count.sum())) + np.repeat(start - (np.cumsum(count) - count), count)
        amount = ((1.0 - alpha) * ru / deg[node])[rep] * data[pos]
        target = (active - node)[rep] + indices[pos]
        if sink is not None:                        # mass reaching a sink leaves the walk
            keep = ~sink[indices[pos]]
            target, amount = target[keep], amount[keep]
        np.add.at(r, target, amount)
        order = np.arange(1, target.size + 1)
        stamp[target] = order
        target = target[stamp[target] == order]     # each distinct target once
        new = target[~reached[target]]
        reached[new] = True
        first_reach.append(new)
        active = target[r[target] >= threshold[target % n]]
    flat = np.sort(np.concatenate(first_reach))
    bounds = np.searchsorted(flat, np.arange(b + 1) * n)
    out = []
    for i in range(b):
        f = flat[bounds[i]:bounds[i + 1]]
        out.append((f - i * n, p[f], r[f]))
    return out


def _sweep(W, deg, vol_total, nodes, p, free, min_size, max_size, max_conductance, rank_buf):
    """The chosen prefix (`_pick_cut`) of the free nodes with p > 0 ranked by p/deg, as
    (members, conductance), or None if there are fewer than min_size."""
    keep = free[nodes] & (p > 0)
    nodes, p = nodes[keep], p[keep]
    if nodes.size < min_size:
        return None
    nodes = nodes[np.lexsort((nodes, -p / deg[nodes]))][:max_size]
    m = nodes.size
    rank_buf[nodes] = np.arange(m)
    src, dst, w = _rows(W, nodes)
    dst = rank_buf[dst]
    rank_buf[nodes] = -1
    inside = dst >= 0
    joined = np.maximum(src[inside], dst[inside])  # an edge turns internal when its later end joins
    internal2 = np.cumsum(np.bincount(joined, weights=w[inside], minlength=m))
    vol = np.cumsum(deg[nodes])
    cut = np.maximum(vol - internal2, 0.0)
    denom = np.minimum(vol, vol_total - vol)
    phi = np.where(denom > 0, cut / np.where(denom > 0, denom, 1.0), 1.0)
    j = _pick_cut(phi, min_size, max_conductance)
    return nodes[:j + 1], float(phi[j])


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
    X = features(chi)
    n = X.shape[0]
    if params.k >= n:
        raise ConfigError(f"ClusterParams.k={params.k} nearest neighbours need at least {params.k + 1} tokens, "
                          f"got {n}; lower k")
    t0 = time.perf_counter()
    W, outlier = token_graph(X, params)
    t1 = time.perf_counter()
    labels = cluster_graph(W, outlier, params)
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


def cluster_graph(W: sp.csr_matrix, outlier: np.ndarray, params: ClusterParams) -> np.ndarray:
    """Labels by `params.method` on graph W, outliers -1, clusters numbered largest first."""
    if params.method == "conductance":
        raw, _ = conductance_clusters(W, params, exclude=outlier)
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


def planted_partition(n_tokens: int, rng: np.random.Generator, n_components: int = 20, n_groups: int = 8,
                      modes_per_group: int = 3, noise: float = 0.3, spread: float = 0.3,
                      noise_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Susceptibility-like vectors with known groups, for measuring the clusterings.

    There are `n_components` random unit mode directions in component space.
    Each group uses `modes_per_group` of them with its own coefficients (+-[1, 2]);
    a token of the group draws each coefficient around the group's with standard
    deviation `spread`, adds Gaussian noise of standard deviation `noise` per
    component (relative to a unit-norm group direction), and is scaled by a
    log-normal magnitude (as real tokens differ in overall susceptibility).
    A `noise_fraction` of tokens are pure isotropic noise of similar magnitude.
    Group sizes vary by a factor of up to 3. Returns chi (tokens, components)
    and the true group of each token (-1 for the noise tokens); tokens are shuffled.
    """
    n_noise = int(round(noise_fraction * n_tokens))
    n_grouped = n_tokens - n_noise
    weights = rng.uniform(1.0, 3.0, n_groups)
    sizes = np.floor(weights / weights.sum() * n_grouped).astype(int)
    sizes[: n_grouped - sizes.sum()] += 1
    directions = rng.standard_normal((n_components, n_components))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    rows, groups = [], []
    for g, size in enumerate(sizes):
        use = rng.choice(n_components, size=modes_per_group, replace=False)
        centre = rng.uniform(1.0, 2.0, modes_per_group) * rng.choice([-1.0, 1.0], modes_per_group)
        norm = np.linalg.norm(centre @ directions[use])
        coef = centre + spread * np.abs(centre).mean() * rng.standard_normal((size, modes_per_group))
        x = coef @ directions[use] / norm + noise / np.sqrt(n_components) * rng.standard_normal((size, n_components))
        rows.append(x)
        groups.append(np.full(size, g))
    rows.append(rng.standard_normal((n_noise, n_components)) / np.sqrt(n_components))
    groups.append(np.full(n_noise, -1))
    chi = np.concatenate(rows) * rng.lognormal(0.0, 0.5, (n_tokens, 1))
    groups = np.concatenate(groups)
    perm = rng.permutation(n_tokens)
    return chi[perm], groups[perm]


# ------------------------------------------------------------------- output

def write_clusters(run_dir, clustering: Clustering, chi: np.ndarray, components: Sequence[str],
                   token_text: Sequence[str], token_source: Sequence[str], top_n: int = 20) -> Path:
    """Write `<run_dir>/clusters.json` (schema in the issue) and return its path."""
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
