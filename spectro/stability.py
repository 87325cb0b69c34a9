"""Cluster stability: do the clusters come back from independent halves of the draws?

The susceptibilities stage estimates chi from two halves of the chains, each
with its own half of the `full` run (`chi_half`). This clusters each half with
the run's own settings and compares the two labellings by the adjusted Rand
index (scikit-learn's), on the tokens both halves put in a cluster (noise is
not a cluster) and on all tokens (noise as one more label).

Each half has half the draws, so its clusters are noisier than the run's:
the halves' agreement is a conservative figure for how well this run's
clusters would come back under another seed (docs/calibration.md compares it
with two real seeds).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from spectro.clusters import ClusterParams, cluster
from spectro.clusters.clustering import agreement  # noqa: F401  (re-exported: the report and tests use it here)


def stability(chi_half: np.ndarray, params: ClusterParams) -> Optional[dict]:
    """Cluster each half of chi_half (2, tokens, components) with `params` and compare; None without halves."""
    chi_half = np.asarray(chi_half, dtype=np.float64)
    if chi_half.shape[0] != 2 or not np.isfinite(chi_half).all():
        return None
    runs = [cluster(chi_half[h], params) for h in range(2)]
    out = agreement(runs[0].labels, runs[1].labels)
    out.update({
        "method": "clusters of two independent halves of the chains (each with its own half of full), compared "
                  "by the adjusted Rand index on the tokens both cluster",
        "n_clusters_halves": [len(r.clusters) for r in runs],
        "clustered_share_halves": [float((r.labels >= 0).mean()) for r in runs],
    })
    return out
