"""Local clusters by conductance: seeded PPR sweep cuts on the token graph,
polished, then the rims attached (`conductance_clusters`). docs/clustering.md
has the measurements behind the rules and their constants.

Non-obvious choices:
- Conductance method, seeds: a static order (weighted degree, highest first,
  ties by index); each token is a seed at most once; outliers never are.
  (Ordering by mean edge weight or largest edge weight instead made no
  difference on the planted families.)
- PPR: approximate personalised PageRank from each seed
  (`spectro.clusters.push`); tokens already in a cluster are sinks.
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
  conductance falls slowly as it grows (the cohesion of planted groups,
  background and real clusters is measured in docs/clustering.md). The
  tokens of a rejected unconfirmed cut are no longer seeds until every
  other seed has been tried, and then once more at most: each would lead
  back into the same region, at a cost proportional to its size (the seeds
  saved are measured in docs/clustering.md).
- Polish: an accepted cut is improved greedily: moving one token across the
  cut lowers conductance phi iff its share of weight into the set is below
  (a member) or above (a free outsider) (1 - phi)/2; all such moves are made
  together while phi falls. A seed whose cut is above max_conductance is
  noise; it may still be absorbed by a later cluster.
- Attach: when no seed is left, each free token joins the cluster that holds
  the largest weight of its edges if that weight exceeds `attach_share` of
  its degree (0.2 by default), in one pass against the clusters as the
  sweeps found them. Without it the tokens at the rim of a cluster, whose
  neighbours were still free when the cluster was accepted, stay noise. It
  is one pass, not repeated while tokens join: repeated, a large cluster
  that borders the background can flood it, each round's joiners qualifying
  the next round's (on the planted family at noise 0.9, 4 of 25 seeds had
  one cluster take 61-72% of the background, over up to 64 rounds, ARI
  0.37-0.50). One pass at 0.2 scored a higher ARI than the step repeated at
  a share of 0.3 on every held-out seed at both noise levels (with
  max_conductance 0.4; docs/clustering.md). Whatever is still free is noise
  (-1).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from spectro.clusters.graph import _rows
from spectro.clusters.params import ClusterParams
from spectro.clusters.push import _Pusher

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
        _attach(W, deg, labels, free, len(info), params.attach_share, max_size)
        for c, size in enumerate(np.bincount(labels[labels >= 0], minlength=len(info))):
            info[c]["size"] = int(size)
    return labels, info


def _attach(W, deg, labels, free, n_clusters: int, share: float, max_size: int) -> None:
    """In place, one pass: each free token joins the cluster holding the largest weight of its edges
    if that weight exceeds `share` of its degree (module notes). A cluster takes no more than
    max_size tokens (the strongest joiners first)."""
    n = labels.size
    rows = np.repeat(np.arange(n), np.diff(W.indptr))
    edge = free[rows] & (labels[W.indices] >= 0)
    if not edge.any():
        return
    M = sp.csr_matrix((W.data[edge], (rows[edge], labels[W.indices[edge]])), shape=(n, n_clusters))
    best = np.asarray(M.argmax(axis=1)).ravel()                  # (n,) the cluster holding most of each token's weight
    weight = np.asarray(M.max(axis=1).todense()).ravel()          # (n,) that weight
    join = np.flatnonzero(free & (weight > share * deg))
    if max_size < n:
        size = np.bincount(labels[labels >= 0], minlength=n_clusters)
        join = join[np.lexsort((join, -weight[join] / deg[join], best[join]))]     # by cluster, strongest first
        c = best[join]
        first = np.searchsorted(c, c)                              # position of each cluster's first joiner
        join = join[np.arange(join.size) - first < max_size - size[c]]
    labels[join] = best[join]
    free[join] = False


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

