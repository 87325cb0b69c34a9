"""Clusters at more than one scale: a resolution path, each scale with the
stability of its clusters across independent halves of the chains, and the
scale a run reports picked by that stability.

    path = resolution_path(chi, chi_half, params, resolutions=(0.5, 1, 2, 4, 8))
    path["scales"]      # per resolution: clusters, clustered share, halves' ARI
    path["chosen"]      # the finest scale whose halves agree at ARI >= min_stability (and that clusters half)

Leiden (igraph + leidenalg, the RB configuration model) on the run's kNN
graph is the clustering at each scale: its resolution parameter is a
well-understood scale knob (a larger resolution, smaller communities),
where the local conductance method has none. Each scale clusters the run's
chi and both halves' (`chi_half`), so its stability is measured exactly as
the run's (`spectro.stability`).

Non-obvious choices:
- The graphs are built once (run and halves) and every resolution reuses
  them: the kNN search dominates the cost.
- Outliers (`clustering.outlier_ratio`) and communities smaller than
  `min_size` are noise at every scale, as in `spectro.clusters.cluster`.
- The chosen scale is the one with the most clusters among those whose
  halves agree at ARI >= `min_stability` (on the tokens both halves
  cluster) and that cluster at least `MIN_CLUSTERED` of the tokens: as fine
  as the data supports. The share matters at fine resolutions, where most
  communities fall below `min_size` and the few tokens left clustered can
  agree across halves by their small number alone. If no scale qualifies,
  the most stable one is chosen and the path says so (`stable: false`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from spectro.clusters.clustering import agreement, cluster_graph
from spectro.clusters.graph import features, token_graph
from spectro.clusters.params import ClusterParams

RESOLUTIONS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
MIN_STABILITY = 0.5        # the verdict's stability threshold (spectro.reliability)
MIN_CLUSTERED = 0.5        # a chosen scale clusters at least this share of the tokens


def _graph_of(chi: np.ndarray, params: ClusterParams):
    X = features(chi, params.features)
    W, outlier = token_graph(X, params)
    return W, outlier, X


def resolution_path(chi: np.ndarray, chi_half: Optional[np.ndarray], params: ClusterParams,
                    resolutions: Sequence[float] = RESOLUTIONS, min_stability: float = MIN_STABILITY) -> dict:
    """Leiden clusters of chi at each resolution, with the halves' agreement; the chosen scale (module notes).

    chi: (tokens, components); chi_half: (2, tokens, components) or None (no stability, the finest scale)."""
    leiden = dataclasses.replace(params, method="leiden")
    run = _graph_of(chi, leiden)
    halves = [_graph_of(chi_half[h], leiden) for h in range(2)] if chi_half is not None else None
    scales = []
    for r in resolutions:
        p = dataclasses.replace(leiden, resolution=float(r))
        labels = cluster_graph(run[0], run[1], p, run[2])
        entry = {"resolution": float(r), "n_clusters": int(labels.max()) + 1 if (labels >= 0).any() else 0,
                 "clustered_share": float((labels >= 0).mean()), "labels": labels}
        if halves is not None:
            lab = [cluster_graph(W, o, p, X) for W, o, X in halves]
            entry.update({f"halves_{k}": v for k, v in agreement(*lab).items()})
            entry["n_clusters_halves"] = [int(x.max()) + 1 if (x >= 0).any() else 0 for x in lab]
        scales.append(entry)
    stable = [i for i, s in enumerate(scales)
              if (s.get("halves_ari") or -1.0) >= min_stability and s["clustered_share"] >= MIN_CLUSTERED]
    if halves is None:
        chosen, ok = int(np.argmax([s["n_clusters"] for s in scales])), None
    elif stable:
        chosen, ok = max(stable, key=lambda i: (scales[i]["n_clusters"], -i)), True
    else:
        chosen, ok = max(range(len(scales)), key=lambda i: scales[i].get("halves_ari") or -1.0), False
    return {"method": "leiden resolution path on the run's kNN graph", "min_stability": min_stability,
            "scales": scales, "chosen": chosen, "stable": ok}
