"""Token roles: a simple, rule-based label of what a probe token is, and how
well clusters agree with it. Used to check that clusters separate visibly
different kinds of tokens (the report shows each cluster's role mix; the tests
compare purity with a shuffled-label baseline).

Roles, decided from the token's text (GPT-NeoX BPE: a leading space is part of
the token) and whether it comes from code or prose:

    newline      contains a line break (with or without indentation after it)
    space        only spaces or tabs (indentation inside a line)
    punct        only punctuation / operator characters, after stripping spaces
    number       only digits (after stripping spaces)
    word         a leading space then letters (" the", " def") in prose
    keyword      a leading space then letters in code (" def", " self", " return")
    piece        letters without a leading space: a word or identifier continued,
                 or an identifier right after punctuation ("self" in "(self")
    mixed        anything else (letters with digits or underscores, "_x", "__")

Non-obvious choices:
- Purity is the share of clustered tokens whose role is their cluster's most
  common role (noise excluded). Small clusters are purer by chance, so purity
  is only meaningful against a baseline with the same cluster sizes: the
  baseline shuffles the roles among the clustered tokens (seeded) and
  recomputes purity; reported as mean over shuffles.
- Normalised mutual information (arithmetic mean normalisation) is reported
  beside purity, since purity rewards many small clusters.
"""

from __future__ import annotations

import string
from collections import Counter
from typing import Sequence

import numpy as np

ROLES = ("newline", "space", "punct", "number", "word", "keyword", "piece", "mixed")
_PUNCT = set(string.punctuation)


def token_role(text: str, source: str = "code") -> str:
    """The role of one token (module notes)."""
    if "\n" in text or "\r" in text:
        return "newline"
    if text and text.strip(" \t") == "":
        return "space"
    core = text.strip(" \t")
    if core and all(ch in _PUNCT for ch in core):
        return "punct"
    if core.isdigit():
        return "number"
    if core.isalpha():
        if text[:1] in (" ", "\t"):
            return "keyword" if source == "code" else "word"
        return "piece"
    return "mixed"


def token_roles(texts: Sequence[str], sources: Sequence[str]) -> np.ndarray:
    return np.array([token_role(t, s) for t, s in zip(texts, sources)], dtype=object)


def purity(labels: np.ndarray, roles: np.ndarray) -> float:
    """Share of clustered tokens (labels >= 0) whose role is their cluster's majority role."""
    labels = np.asarray(labels)
    keep = labels >= 0
    if not keep.any():
        return float("nan")
    hits = 0
    lab, rol = labels[keep], np.asarray(roles, dtype=object)[keep]
    order = np.argsort(lab, kind="stable")
    bounds = np.flatnonzero(np.diff(lab[order])) + 1
    for group in np.split(order, bounds):
        hits += Counter(rol[group]).most_common(1)[0][1]
    return hits / int(keep.sum())


def nmi(labels: np.ndarray, roles: np.ndarray) -> float:
    """Normalised mutual information between cluster ids and roles over clustered tokens."""
    labels = np.asarray(labels)
    keep = labels >= 0
    a = labels[keep]
    _, b = np.unique(np.asarray(roles, dtype=object)[keep].astype(str), return_inverse=True)
    n = a.size
    if n == 0:
        return float("nan")
    _, a = np.unique(a, return_inverse=True)
    table = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(table, (a, b), 1.0)
    p = table / n
    pa, pb = p.sum(1), p.sum(0)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz])).sum())
    ha = -float((pa[pa > 0] * np.log(pa[pa > 0])).sum())
    hb = -float((pb[pb > 0] * np.log(pb[pb > 0])).sum())
    return 0.0 if ha + hb == 0 else 2 * mi / (ha + hb)


def role_agreement(labels: np.ndarray, roles: np.ndarray, seed: int = 0, shuffles: int = 20) -> dict:
    """Purity and NMI of clusters against roles, with their shuffled-role baselines."""
    labels = np.asarray(labels)
    roles = np.asarray(roles, dtype=object)
    rng = np.random.default_rng(seed)
    keep = np.flatnonzero(labels >= 0)
    base_p, base_n = [], []
    for _ in range(shuffles):
        shuffled = roles.copy()
        shuffled[keep] = roles[rng.permutation(keep)]
        base_p.append(purity(labels, shuffled))
        base_n.append(nmi(labels, shuffled))
    return {"purity": purity(labels, roles), "purity_shuffled": float(np.mean(base_p)),
            "purity_shuffled_max": float(np.max(base_p)),
            "nmi": nmi(labels, roles), "nmi_shuffled": float(np.mean(base_n)),
            "nmi_shuffled_max": float(np.max(base_n)),
            "n_clustered": int(keep.size), "roles": dict(Counter(roles[keep].tolist()).most_common())}
