"""What the report computes from a loaded run: the 2-D token map (UMAP or
PCA of the clustering's unit feature rows), the cluster cards' data (profiles,
top tokens, typical example contexts), the reliability target, and whether a
control run's probe tokens are this run's.

Non-obvious choices:
- The map is UMAP of the unit feature rows (spectro.report.loading):
  `n_neighbors` = 45, fewer for tiny runs (a tenth of the points), `min_dist`
  0.1, a fixed `random_state` and one thread, so the same run gives the same
  picture. The neighbour lists are computed here, exactly (`_knn`: blocked
  float32 products, torch top-k) and handed to UMAP as `precomputed_knn`:
  below 4,096 points umap-learn would otherwise compute all pairwise
  distances through a Python-level callable, and above it build an
  NN-descent index (timings measured in docs/performance.md). With fewer
  than `MAP_UMAP_MIN_POINTS` points, or if UMAP fails, the map falls back to
  PCA and says so. UMAP keeps neighbourhoods, not global distances: the page
  says that distances between far groups mean little.
- Above `MAP_MAX_POINTS` tokens the map is a seeded subsample that keeps at
  least `MAP_MIN_PER_CLUSTER` members of every cluster (UMAP runs on the
  subsample), and the page says so; the page then stays a few MB and opens
  in seconds.
- Example contexts are the most typical members of a cluster (highest cosine
  to the cluster's mean feature row), distinct token texts first.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Optional

import numpy as np

from spectro.report.loading import _Contexts, _Run

log = logging.getLogger("spectro")


MAP_MAX_POINTS = 20_000
MAP_MIN_PER_CLUSTER = 25
MAP_UMAP_MIN_POINTS = 10         # fewer points: PCA
UMAP_NEIGHBOURS = 45             # n_neighbors; a tenth of the points when that is fewer
UMAP_MIN_DIST = 0.1
MAP_SEED = 0
SEARCH_TEXTS_PER_CLUSTER = 300   # distinct member texts kept per cluster for search
TOP_TOKENS_SHOWN = 12
PROFILE_LABELS = {"centred": "mean feature per component (z-scored χ, each token's mean over components removed)",
                  "zscore": "mean z-scored χ per component"}


def _target(rel: Optional[dict]) -> float:
    from spectro.reliability import MIN_RELIABILITY

    t = (rel or {}).get("target")
    return float(t) if isinstance(t, (int, float)) and math.isfinite(t) else MIN_RELIABILITY


def _probe_mismatch(run: _Run, ctl: _Run) -> Optional[str]:
    """Why the control's probe tokens are not this run's (from each susceptibilities.zarr), or None."""
    if run.sus is None or ctl.sus is None:
        where = "this run" if run.sus is None else "the control"
        return f"{where} has no susceptibilities.zarr, so its probe tokens cannot be checked"

    def col(r: _Run, name: str) -> Optional[np.ndarray]:
        return np.asarray(r.sus[name].values) if name in r.sus.variables else None

    n, m = int(run.sus.sizes.get("token", 0)), int(ctl.sus.sizes.get("token", 0))
    if n != m:
        return f"the control has {m:,} probe tokens, this run {n:,}"
    for name, what in (("token_id", "token ids"), ("token_text", "texts"), ("token_context", "contexts"),
                       ("token_position", "positions")):
        a, b = col(run, name), col(ctl, name)
        if a is None or b is None:
            continue
        if a.dtype.kind not in "iub" or b.dtype.kind not in "iub":      # texts (numpy StringDType included)
            a = np.array([str(t) for t in a.tolist()], dtype=object)
            b = np.array([str(t) for t in b.tolist()], dtype=object)
        diff = int(np.sum(a != b))
        if diff:
            return f"{diff:,} of {n:,} probe tokens have other {what} in the control"
    return None


def _subsample(lab: np.ndarray) -> np.ndarray:
    """Indices drawn on the map: all, or a seeded subsample keeping MAP_MIN_PER_CLUSTER of every cluster."""
    n = lab.size
    if n <= MAP_MAX_POINTS:
        return np.arange(n)
    rng = np.random.default_rng(MAP_SEED)
    chosen = np.zeros(n, bool)
    for cid in np.unique(lab[lab >= 0]):
        members = np.nonzero(lab == cid)[0]
        chosen[rng.choice(members, min(MAP_MIN_PER_CLUSTER, members.size), replace=False)] = True
    rest = np.nonzero(~chosen)[0]
    extra = max(0, MAP_MAX_POINTS - int(chosen.sum()))
    chosen[rng.choice(rest, min(extra, rest.size), replace=False)] = True
    return np.nonzero(chosen)[0]


def _pca_xy(x: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """First two principal components of the rows of x, and their shares of the variance."""
    x = x - x.mean(axis=0)
    vals, vecs = np.linalg.eigh(x.T @ x)             # (comp, comp): no N x N
    order = np.argsort(vals)[::-1]
    vals, vecs = np.clip(vals[order], 0.0, None), vecs[:, order]
    if vecs.shape[1] < 2:
        vecs = np.hstack([vecs, np.zeros((vecs.shape[0], 2 - vecs.shape[1]))])
        vals = np.append(vals, np.zeros(2 - len(vals)))
    total = float(vals.sum()) or 1.0
    return x @ vecs[:, :2], [float(vals[0] / total), float(vals[1] / total)]


def _knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest rows of x by Euclidean distance, each row itself first: (indices, distances), (n, k).

    Blocked float32 products and torch's top-k (a third of the time numpy's argpartition takes at 20,000 rows)."""
    import torch

    x32 = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    n = x32.shape[0]
    sq = (x32 * x32).sum(dim=1)
    idx = torch.empty((n, k), dtype=torch.int64)
    dist = torch.empty((n, k), dtype=torch.float32)
    block = max(1, (1 << 24) // max(n, 1))          # 64 MB of float32 distances at a time
    for s in range(0, n, block):
        part = torch.addmm(sq[None, :], x32[s:s + block], x32.T, alpha=-2.0)   # |x_j|^2 - 2 x_i.x_j
        rows = torch.arange(part.shape[0])
        part[rows, s + rows] = -float("inf")        # itself first, also among duplicates
        v, ix = torch.topk(part, k, dim=1, largest=False, sorted=True)
        idx[s:s + block] = ix
        dist[s:s + block] = torch.sqrt(torch.clamp(v + sq[s:s + block, None], min=0.0))
    dist[:, 0] = 0.0
    return idx.numpy(), dist.numpy()


def _umap_xy(x: np.ndarray) -> tuple[np.ndarray, dict]:
    """UMAP of the rows of x (module notes), and its settings for the caption."""
    import time
    import warnings

    n = x.shape[0]
    k = int(min(UMAP_NEIGHBOURS, max(2, n // 10), n - 1))
    t0 = time.perf_counter()
    idx, dist = _knn(x, k)
    with warnings.catch_warnings():                  # n_jobs vs random_state, no search index, disconnected points
        warnings.simplefilter("ignore")
        import umap

        xy = umap.UMAP(n_neighbors=k, min_dist=UMAP_MIN_DIST, n_components=2, random_state=MAP_SEED, n_jobs=1,
                       precomputed_knn=(idx, dist, None)).fit_transform(x)
    xy = np.asarray(xy, dtype=np.float64)
    if xy.shape != (n, 2) or not np.isfinite(xy).all():
        raise ValueError("UMAP returned non-finite coordinates")
    return xy, {"n_neighbors": k, "min_dist": UMAP_MIN_DIST, "seed": MAP_SEED,
                "seconds": round(time.perf_counter() - t0, 2)}


def _map_data(run: _Run, fn: Optional[np.ndarray], labels: Optional[np.ndarray], method: str) -> tuple[dict, dict]:
    """(embedded map data, info for the caption): UMAP or PCA of the unit feature rows (module notes)."""
    if fn is None or fn.shape[0] == 0:
        return {}, {}
    n = fn.shape[0]
    lab = labels if labels is not None else np.full(n, -1, dtype=np.int64)
    keep = _subsample(lab)
    info: dict = {"n": n, "shown": int(keep.size), "subsampled": bool(keep.size < n),
                  "has_labels": labels is not None, "method": "pca", "requested": method}
    xy = None
    if method == "umap":
        if keep.size < MAP_UMAP_MIN_POINTS:
            info["fallback"] = f"UMAP needs at least {MAP_UMAP_MIN_POINTS} points; PCA is shown"
        else:
            try:
                xy, info["umap"] = _umap_xy(fn[keep])
                info["method"] = "umap"
            except Exception as e:  # a display step: the page falls back to PCA and says why
                log.warning("report: UMAP failed (%s); the map shows PCA", e)
                info["fallback"] = f"UMAP failed ({type(e).__name__}: {e}); PCA is shown"
    if xy is None:
        xy_all, info["pc_share"] = _pca_xy(fn)
        xy = xy_all[keep]
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    q = np.round((xy - lo) / span * 10000).astype(np.int64)
    texts = [run.text[i] for i in keep]
    uniq = sorted(set(texts))
    tix = {t: i for i, t in enumerate(uniq)}
    srcs = sorted(set(run.source)) if run.source else []
    six = {s: i for i, s in enumerate(srcs)}
    data = {"x": q[:, 0], "y": q[:, 1], "lab": lab[keep], "tok": keep, "tt": uniq,
            "ti": [tix[t] for t in texts], "si": [six[run.source[i]] for i in keep] if srcs else [],
            "ctx": run.context[keep] if run.context is not None else [],
            "pos": run.position[keep] if run.position is not None else [],
            "ax": ["UMAP 1", "UMAP 2"] if info["method"] == "umap" else ["PC1", "PC2"]}
    return data, info


def _picked(run: _Run, members: np.ndarray, fn: Optional[np.ndarray], max_contexts: int) -> list[int]:
    """A card's example tokens: members nearest the cluster's centre (by the unit features `fn`, if given),
    distinct token texts first, then the rest, at most `max_contexts`."""
    if fn is not None:
        centre = fn[members].mean(axis=0)
        ranked = members[np.argsort(-(fn[members] @ centre), kind="stable")]
    else:
        ranked = members
    picked, seen = [], set()
    for i in ranked:                        # distinct token texts first
        if len(picked) >= max_contexts:
            break
        if run.text[i] not in seen:
            seen.add(run.text[i])
            picked.append(int(i))
    for i in ranked:
        if len(picked) >= max_contexts:
            break
        if int(i) not in picked:
            picked.append(int(i))
    return picked


def _gallery_data(run: _Run, names: list[str], f: Optional[np.ndarray], fn: Optional[np.ndarray],
                  labels: Optional[np.ndarray], max_contexts: int, kind: str) -> Optional[dict]:
    """Cards' data. Profiles are the members' mean feature row (what the clustering saw), or clusters.json's
    profile (mean z-scored chi) when the features are not at hand."""
    c = run.clusters
    if not isinstance(c, dict):
        return None
    sources = sorted(set(run.source)) if run.source else []
    ctx = _Contexts.of(run) if run.n_tokens and run.context is not None else None
    comp_names = list(names) if f is not None and names else list(c.get("components") or names)
    plabel = (PROFILE_LABELS.get(kind, f"mean {kind} features per component") if f is not None
              else "mean z-scored χ per component")
    out = []
    for cl in c.get("clusters") or []:
        cid = int(cl["id"])
        members = cl.get("members")
        if members is not None:
            members = np.asarray(members, dtype=np.int64)
        elif labels is not None:
            members = np.nonzero(labels == cid)[0]
        if members is not None and members.size and (members.max() >= run.n_tokens or members.min() < 0):
            run.notes.append(f"cluster {cid} has member indices outside the run's {run.n_tokens} tokens")
            members = None
        size = int(cl.get("size", members.size if members is not None else 0))
        profile = None if f is not None else cl.get("profile")
        if f is not None and members is not None and members.size:
            profile = f[members].mean(axis=0).tolist()
        member_texts = [run.text[i] for i in members] if members is not None else []
        counts = Counter(member_texts)
        top = cl.get("top_tokens") or [[t, k] for t, k in counts.most_common(TOP_TOKENS_SHOWN)]
        src = cl.get("sources")
        if src is None and members is not None:
            src = dict(Counter(run.source[i] for i in members))
        src = src or {}
        for s in src:
            if s not in sources:
                sources.append(s)
        texts = [t for t, _ in counts.most_common(SEARCH_TEXTS_PER_CLUSTER)] or [str(t[0]) for t in top]
        examples = []
        if members is not None and members.size and ctx is not None:
            for i in _picked(run, members, fn, max_contexts):
                left, tok, right = ctx.snippet(i)
                examples.append([left, tok, right, sources.index(run.source[i]) if run.source else -1,
                                 int(run.context[i]), int(run.position[i])])
        out.append({"id": cid, "size": size, "cond": cl.get("conductance"), "profile": profile or [],
                    "top": [[str(t), int(k)] for t, k in top[:TOP_TOKENS_SHOWN]],
                    "src": [int(src.get(s, 0)) for s in sources], "texts": texts, "ex": examples,
                    "roles": [[str(r), int(k)] for r, k in (cl.get("roles") or {}).items()][:4]})
    for o in out:      # sources may have grown while looping
        o["src"] += [0] * (len(sources) - len(o["src"]))
    out.sort(key=lambda o: (-o["size"], o["id"]))
    return {"components": comp_names, "sources": sources, "clusters": out, "n_noise": c.get("n_noise"),
            "plabel": plabel}
