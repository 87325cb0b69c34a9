"""Approximate personalised PageRank by the Andersen-Chung-Lang push, one
seed at a time, and the conductance profile of a sweep: the two inner loops
of the local conductance clustering (`spectro.clusters.local`), compiled
with numba.

Non-obvious choices:
- PPR: the non-lazy Andersen-Chung-Lang push (p += alpha r; (1 - alpha) r
  spreads along the random walk) until r(u) < epsilon deg(u), one seed at a
  time with a FIFO queue, compiled with numba (`_Pusher`; our own code: no
  well-kept library offers this push). Tokens already in a cluster are sinks
  (mass reaching them leaves the walk), so the push stays among the free
  tokens and late seeds are cheap. Work arrays live as long as the graph
  and only touched entries are reset, so a push costs in proportion to the
  volume it reaches.
- A push can be continued to a smaller tolerance from where it stopped
  (`_Pusher.finer`); that gives what a fresh push would, at the cost of only
  the extra work.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


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
    p_out, r_out = np.empty(n_touched), np.empty(n_touched)
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

