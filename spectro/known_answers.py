"""Known answers: does a run find what is known to be in its probe set?

    from spectro.known_answers import known_answers
    doc = known_answers(labels, label_names, label_rules, cluster_labels, chi, features, components,
                        token_context, named_heads={"induction_heads": [...], "previous_token_heads": [...]})

For every label of the probe set (spectro.probes) with at least `MIN_POSITIVES`
tokens:

- **best cluster**: the cluster whose members best match the label's tokens
  (F1, with its precision and recall), and the *ceiling*: the best F1 any
  cluster of that size could reach against a label of that size,
  ``2 min(n, m) / (n + m)``. Noise tokens belong to no cluster.
- **shuffled**: the best F1 when the cluster labels are permuted among the
  tokens (mean of `N_SHUFFLES`), the level chance alone reaches.
- **separating components**: per component, the effect size (Cohen's d) of
  chi between the label's tokens and the others, largest |d| first; a
  component that the model's own measurement names (an induction head found
  by ablation, a previous-token head) is marked.
- **readout**: the cross-validated AUC of a logistic regression from the
  clustering features to the label, with contexts kept whole within folds
  (tokens of one context never split between training and testing): a
  clustering-free ceiling that says whether the information is in chi at all.

Non-obvious choices:
- Effect sizes use raw chi, one column at a time: a component's own response
  is what a user reads, and Cohen's d is scale-free, so the components'
  different scales do not matter.
- The readout uses scikit-learn (`LogisticRegression`, `StratifiedGroupKFold`,
  `roc_auc_score`) rather than code of our own; features are the clustering
  features, standardised inside each fold's training part.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

MIN_POSITIVES = 10       # labels with fewer tokens are listed without figures
N_SHUFFLES = 20
N_FOLDS = 5
TOP_COMPONENTS = 5


def f1_table(member: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per cluster id (0..K-1) of `member` (-1 = noise): (tp, size, precision, recall) against `positive`."""
    k = int(member.max()) + 1 if member.size and member.max() >= 0 else 0
    inside = member >= 0
    size = np.bincount(member[inside], minlength=k).astype(np.float64)          # (K,)
    tp = np.bincount(member[inside & positive], minlength=k).astype(np.float64)  # (K,)
    n_pos = max(1, int(positive.sum()))
    precision = np.divide(tp, size, out=np.zeros_like(tp), where=size > 0)
    recall = tp / n_pos
    return tp, size, precision, recall


def best_cluster(member: np.ndarray, positive: np.ndarray) -> dict | None:
    """The cluster with the best F1 against the positive tokens, with its precision, recall and ceiling."""
    tp, size, precision, recall = f1_table(member, positive)
    if tp.size == 0:
        return None
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=precision + recall > 0)
    c = int(np.argmax(f1))
    m, n = float(positive.sum()), float(size[c])
    return {"cluster": c, "f1": float(f1[c]), "precision": float(precision[c]), "recall": float(recall[c]),
            "size": int(n), "ceiling": float(2 * min(n, m) / (n + m)) if n + m else 0.0}


def shuffled_f1(member: np.ndarray, positive: np.ndarray, seed: int) -> float:
    """Mean best F1 over `N_SHUFFLES` permutations of the cluster labels (chance level)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(N_SHUFFLES):
        b = best_cluster(rng.permutation(member), positive)
        out.append(b["f1"] if b else 0.0)
    return float(np.mean(out))


def effect_sizes(chi: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Cohen's d per column of chi (tokens, components) between positive and other tokens."""
    a, b = chi[positive], chi[~positive]
    va, vb = a.var(axis=0, ddof=1), b.var(axis=0, ddof=1)
    pooled = np.sqrt(((len(a) - 1) * va + (len(b) - 1) * vb) / max(1, len(a) + len(b) - 2))
    return np.divide(a.mean(axis=0) - b.mean(axis=0), pooled, out=np.zeros(chi.shape[1]), where=pooled > 0)


def readout_auc(features: np.ndarray, positive: np.ndarray, groups: np.ndarray, seed: int) -> float | None:
    """Cross-validated AUC of a logistic readout of the label from the features, contexts whole within folds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n_groups_pos = np.unique(groups[positive]).size
    folds = min(N_FOLDS, n_groups_pos, np.unique(groups[~positive]).size)
    if folds < 2:
        return None
    score = np.zeros(positive.size)
    for train, test in StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(
            features, positive, groups):
        if positive[train].all() or not positive[train].any():
            return None
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
        model.fit(features[train], positive[train])
        score[test] = model.decision_function(features[test])
    return float(roc_auc_score(positive, score))


def known_answers(labels: np.ndarray, label_names: Sequence[str], label_rules: Sequence[str],
                  member: np.ndarray, chi: np.ndarray, features: np.ndarray, components: Sequence[str],
                  token_context: np.ndarray, named_heads: dict[str, list[str]] | None = None,
                  seed: int = 0) -> dict:
    """Per label: best cluster, chance level, separating components and the readout AUC (module doc)."""
    named = named_heads or {}
    marks = {}
    for kind, heads in named.items():
        for h in heads:
            marks.setdefault(h, []).append(kind.removesuffix("_heads"))
    out = []
    for j, (name, rule) in enumerate(zip(label_names, label_rules)):
        pos = np.asarray(labels[:, j], dtype=bool)
        entry = {"label": name, "rule": rule, "n_tokens": int(pos.sum())}
        if pos.sum() < MIN_POSITIVES or (~pos).sum() < MIN_POSITIVES:
            out.append(entry)
            continue
        d = effect_sizes(chi, pos)
        order = np.argsort(-np.abs(d))[:TOP_COMPONENTS]
        entry.update({
            "best_cluster": best_cluster(member, pos),
            "shuffled_f1": shuffled_f1(member, pos, seed + j),
            "components": [{"component": components[i], "effect_size": float(d[i]),
                            "named": marks.get(components[i], [])} for i in order],
            "readout_auc": readout_auc(features, pos, token_context, seed + j),
        })
        out.append(entry)
    return {"labels": out, "named_heads": named}


def headline(doc: dict | None, label: str = "induction") -> dict | None:
    """The figures of one label for a summary line: best-cluster F1, ceiling, top component, readout AUC."""
    for e in (doc or {}).get("labels", []):
        if e["label"] == label and "best_cluster" in e:
            b, top = e["best_cluster"] or {}, e["components"][0]
            return {"label": label, "f1": b.get("f1"), "ceiling": b.get("ceiling"), "shuffled_f1": e["shuffled_f1"],
                    "top_component": top["component"], "top_component_named": top["named"],
                    "readout_auc": e["readout_auc"], "n_tokens": e["n_tokens"]}
    return None
