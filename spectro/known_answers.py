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
  With it, the readout's F1 (`readout_f1`: the best F1 over thresholds of the
  held-out scores, so a supervised ceiling on what one cluster could reach
  from these features), and the same AUC from each half of the draws
  (`readout_auc_half`, their mean): if half the draws read the label as well
  as all of them, more draws will not make it readable; the limit is in what
  chi measures, not in its noise.
- **loss alone**: the same readout from each token's own loss (its mean under
  the `full` draws, `token_loss`): `loss_auc`, `loss_f1`. A label the model
  predicts well (induction) is partly readable from how easy its tokens are;
  what chi adds beyond that is the gap between the two readouts.

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


def readout_scores(features: np.ndarray, positive: np.ndarray, groups: np.ndarray, seed: int) -> np.ndarray | None:
    """Out-of-fold scores of a logistic readout of the label from the features, contexts whole within
    folds; None when the label's contexts are too few for two folds."""
    from sklearn.linear_model import LogisticRegression
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
    return score


def readout_auc(features: np.ndarray, positive: np.ndarray, groups: np.ndarray, seed: int) -> float | None:
    """Cross-validated AUC of the logistic readout (`readout_scores`)."""
    from sklearn.metrics import roc_auc_score

    score = readout_scores(features, positive, groups, seed)
    return None if score is None else float(roc_auc_score(positive, score))


def best_f1(score: np.ndarray, positive: np.ndarray) -> float:
    """The best F1 of `score >= t` against the positive tokens over all thresholds t."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, _ = precision_recall_curve(positive, score)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(precision),
                   where=precision + recall > 0)
    return float(f1.max())


def readout(features: np.ndarray, positive: np.ndarray, groups: np.ndarray, seed: int,
            halves: Sequence[np.ndarray] = ()) -> dict:
    """readout_auc, readout_f1 and, given the halves' features, readout_auc_half (module notes)."""
    from sklearn.metrics import roc_auc_score

    score = readout_scores(features, positive, groups, seed)
    if score is None:
        return {"readout_auc": None, "readout_f1": None, "readout_auc_half": None}
    half = [readout_auc(h, positive, groups, seed) for h in halves]
    half = [a for a in half if a is not None]
    return {"readout_auc": float(roc_auc_score(positive, score)), "readout_f1": best_f1(score, positive),
            "readout_auc_half": float(np.mean(half)) if half else None}


def known_answers(labels: np.ndarray, label_names: Sequence[str], label_rules: Sequence[str],
                  member: np.ndarray, chi: np.ndarray, features: np.ndarray, components: Sequence[str],
                  token_context: np.ndarray, named_heads: dict[str, list[str]] | None = None,
                  seed: int = 0, features_half: Sequence[np.ndarray] = (),
                  token_loss: np.ndarray | None = None) -> dict:
    """Per label: best cluster, chance level, separating components and the readouts (module doc).

    features_half: the clustering features of each half of the draws (optional, for readout_auc_half);
    token_loss: (tokens,) each token's own loss (optional, for loss_auc and loss_f1)."""
    loss = None if token_loss is None or not np.isfinite(token_loss).all() else np.asarray(token_loss)[:, None]
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
            **readout(features, pos, token_context, seed + j, features_half),
        })
        if loss is not None:
            r = readout(loss, pos, token_context, seed + j)
            entry.update({"loss_auc": r["readout_auc"], "loss_f1": r["readout_f1"]})
        out.append(entry)
    return {"labels": out, "named_heads": named}


def headline(doc: dict | None, label: str = "induction") -> dict | None:
    """The figures of one label for a summary line: best-cluster F1, ceiling, top component, readout AUC."""
    for e in (doc or {}).get("labels", []):
        if e["label"] == label and "best_cluster" in e:
            b, top = e["best_cluster"] or {}, e["components"][0]
            return {"label": label, "f1": b.get("f1"), "ceiling": b.get("ceiling"), "shuffled_f1": e["shuffled_f1"],
                    "top_component": top["component"], "top_component_named": top["named"],
                    "readout_auc": e["readout_auc"], "readout_f1": e.get("readout_f1"),
                    "readout_auc_half": e.get("readout_auc_half"), "loss_auc": e.get("loss_auc"),
                    "loss_f1": e.get("loss_f1"), "n_tokens": e["n_tokens"]}
    return None
