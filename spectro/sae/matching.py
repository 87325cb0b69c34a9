"""Matching SAE features to susceptibility clusters.

`probe_features` gives each probe token's active features; `match_clusters`
finds, for every cluster, the feature whose "active on this probe token" set
has the best F1 against the cluster's members, and compares the matched
fraction with random clusterings.

Non-obvious choices:
- Which activation belongs to a probe token (x, y), with y at position p:
  `position: predicting` uses position p - 1, where the model computes its
  prediction of y (the loss that chi is a covariance of); `position: token`
  uses position p, where y is the input. Both are reported by the benchmark.
- Null: a random clustering is the cluster labels (noise included) permuted
  over all probe tokens, so random clusters have exactly the real sizes and
  are disjoint like the real ones. p-value = (1 + #{null >= observed}) /
  (1 + n_null).
- Ceiling: a cluster of n tokens against a feature active on m tokens has
  F1 <= 2 min(n, m) / (n + m); each cluster reports the best such bound over
  all features (`ceiling`) and whether it reaches the match threshold
  (`can_match`): a cluster far larger than every feature cannot match, which
  says nothing about the clustering. `matched_fraction_of_matchable` counts
  only clusters that could match.
- F1, precision and recall come from one sparse product
  `membership^T @ active` (clusters x features overlaps); the null reuses it
  for batches of permutations.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import scipy.sparse as sp
import torch

from spectro.config import SAEConfig
from spectro.errors import SAEError
from spectro.sae.model import POSITIONS, SAE

_D = SAEConfig()       # the schema's defaults


def probe_features(sae: SAE, acts: torch.Tensor, token_context: np.ndarray, token_position: np.ndarray,
                   position: str = _D.position, active_threshold: float = _D.active_threshold,
                   chunk: int = 4096) -> sp.csr_matrix:
    """Sparse (probe token, feature) activations, entries kept where activation > active_threshold.

    acts: (n_contexts, seq_len, d_in) activations of the probe contexts."""
    if position not in POSITIONS:
        raise SAEError(f"sae.position {position!r} is not one of {', '.join(POSITIONS)}")
    shift = 1 if position == "predicting" else 0
    ctx = np.asarray(token_context, dtype=np.int64)
    pos = np.asarray(token_position, dtype=np.int64) - shift
    if ctx.size and (pos.min() < 0 or ctx.max() >= acts.shape[0] or pos.max() >= acts.shape[1]):
        raise SAEError("probe token coordinates fall outside the probe contexts' activations; the run's probe "
                       "table and contexts disagree")
    x = acts[torch.from_numpy(ctx), torch.from_numpy(pos)]         # (n_tokens, d_in)
    blocks = []
    for i in range(0, x.shape[0], chunk):
        f = sae.encode(x[i:i + chunk])                              # (chunk, d_sae)
        f = torch.where(f > active_threshold, f, torch.zeros((), dtype=f.dtype))
        blocks.append(sp.csr_matrix(f.numpy().astype(np.float32)))
    if not blocks:
        return sp.csr_matrix((0, sae.d_sae), dtype=np.float32)
    return sp.vstack(blocks, format="csr")


def _best(overlap: np.ndarray, sizes: np.ndarray, n_active: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of overlap (sets x features): the feature with the best F1 and that F1."""
    denom = sizes[:, None] + n_active[None, :]                      # (sets, features)
    f1 = np.divide(2.0 * overlap, denom, out=np.zeros(overlap.shape), where=denom > 0)
    best = f1.argmax(axis=1)
    return best, f1[np.arange(f1.shape[0]), best]


def _membership(labels: np.ndarray, ids: np.ndarray) -> sp.csr_matrix:
    """(tokens, clusters) 0/1 matrix; column j is cluster ids[j]."""
    col = {int(c): j for j, c in enumerate(ids)}
    rows = np.nonzero(np.isin(labels, ids))[0]
    cols = np.array([col[int(labels[r])] for r in rows], dtype=np.int64)
    return sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(labels.size, ids.size))


def _null(A: sp.csc_matrix, labels: np.ndarray, ids: np.ndarray, sizes: np.ndarray, n_active: np.ndarray,
          threshold: float, n_null: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The matched fraction and the mean best F1 (each (n_null,)) of the clusters under `n_null` permutations of
    the labels, in batches of about 2e7 overlap entries."""
    rng = np.random.default_rng(seed)
    per_batch = max(1, int(2e7 // max(1, ids.size * A.shape[1])))
    null_frac, null_f1 = [], []
    done = 0
    while done < n_null:
        b = min(per_batch, n_null - done)
        perms = [labels[rng.permutation(labels.size)] for _ in range(b)]
        M = sp.hstack([_membership(p, ids) for p in perms], format="csr")   # (tokens, b * clusters)
        o = (M.T @ A).toarray()                                     # (b * clusters, features)
        _, f = _best(o, np.tile(sizes, b), n_active)
        f = f.reshape(b, ids.size)
        null_frac += (f >= threshold).mean(axis=1).tolist()
        null_f1 += f.mean(axis=1).tolist()
        done += b
    return np.asarray(null_frac), np.asarray(null_f1)


def match_clusters(active: sp.csr_matrix, labels: np.ndarray, threshold: float = _D.match_threshold,
                   n_null: int = _D.n_null, seed: int = _D.seed, cluster_ids: Optional[Sequence[int]] = None) -> dict:
    """Best-F1 feature per cluster, the matched fraction, and its null from permuted labels.

    active: (tokens, features) sparse, nonzero where the feature is active; labels: (tokens,) cluster id, -1 noise."""
    labels = np.asarray(labels, dtype=np.int64)
    if active.shape[0] != labels.size:
        raise SAEError(f"{active.shape[0]} tokens have SAE activations but clusters.json labels {labels.size}; "
                       f"re-run the clusters stage on this run")
    A = (active != 0).astype(np.float64).tocsc()                    # (tokens, features)
    n_active = np.asarray(A.sum(axis=0)).ravel()                    # (features,)
    ids = np.asarray(sorted(set(labels[labels >= 0].tolist())) if cluster_ids is None else list(cluster_ids),
                     dtype=np.int64)
    sizes = np.array([(labels == c).sum() for c in ids], dtype=np.float64)
    if ids.size == 0:
        return {"n_clusters": 0, "matched_fraction": float("nan"), "clusters": [], "null": None}
    overlap = (_membership(labels, ids).T @ A).toarray()            # (clusters, features)
    best, f1 = _best(overlap, sizes, n_active)
    ov = overlap[np.arange(ids.size), best]
    precision = np.divide(ov, n_active[best], out=np.zeros(ids.size), where=n_active[best] > 0)
    recall = ov / np.maximum(sizes, 1)
    matched = f1 >= threshold
    observed = float(matched.mean())
    # the best F1 a cluster of its size could reach against any feature: 2 min(n, m) / (n + m), m its active count
    pair = sizes[:, None] + n_active[None, :]                       # (clusters, features)
    ceiling = np.divide(2.0 * np.minimum(sizes[:, None], n_active[None, :]), pair, out=np.zeros(pair.shape),
                        where=pair > 0).max(axis=1)                 # (clusters,)
    can_match = ceiling >= threshold

    null_frac, null_f1 = _null(A, labels, ids, sizes, n_active, threshold, n_null, seed)
    clusters = [{"id": int(c), "size": int(sizes[j]), "feature": int(best[j]), "f1": float(f1[j]),
                 "precision": float(precision[j]), "recall": float(recall[j]),
                 "feature_active": int(n_active[best[j]]), "matched": bool(matched[j]),
                 "ceiling": float(ceiling[j]), "can_match": bool(can_match[j])}
                for j, c in enumerate(ids)]
    null = None
    if n_null > 0:
        null = {"n": int(n_null), "seed": int(seed),
                "matched_fraction_mean": float(null_frac.mean()),
                "matched_fraction_q95": float(np.quantile(null_frac, 0.95)),
                "matched_fraction_max": float(null_frac.max()),
                "p_value": float((1 + (null_frac >= observed).sum()) / (1 + n_null)),
                "mean_best_f1_mean": float(null_f1.mean()),
                "mean_best_f1_q95": float(np.quantile(null_f1, 0.95)),
                "p_value_mean_best_f1": float((1 + (null_f1 >= f1.mean()).sum()) / (1 + n_null))}
    return {"n_clusters": int(ids.size), "threshold": float(threshold), "n_matched": int(matched.sum()),
            "matched_fraction": observed, "mean_best_f1": float(f1.mean()), "clusters": clusters, "null": null,
            "n_can_match": int(can_match.sum()),
            "matched_fraction_of_matchable": float(matched[can_match].mean()) if can_match.any() else None}


def top_tokens(active: sp.csr_matrix, feature: int, n: int) -> list[tuple[int, float]]:
    """The n probe tokens where `feature` is most active: (token index, activation)."""
    col = active[:, feature].tocoo()
    order = np.argsort(-col.data, kind="stable")[:n]
    return [(int(col.row[i]), float(col.data[i])) for i in order]


def cluster_examples(labels: np.ndarray, cluster_id: int, texts: Sequence[str], n: int, seed: int) -> list[int]:
    """n members of a cluster, seeded, distinct token texts first."""
    members = np.nonzero(np.asarray(labels) == cluster_id)[0]
    members = members[np.random.default_rng(seed + cluster_id).permutation(members.size)]
    picked, seen = [], set()
    for i in members:
        if len(picked) < n and texts[i] not in seen:
            seen.add(texts[i])
            picked.append(int(i))
    for i in members:
        if len(picked) < n and int(i) not in picked:
            picked.append(int(i))
    return picked
