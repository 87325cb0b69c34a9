"""Feature transforms measured on finished runs: which one shows the known answers, and which one is stable?

    python benchmarks/bench_transforms.py runs/seed0 runs/seed1 --control runs/control
    python benchmarks/bench_transforms.py runs/seed0 runs/seed1 --transforms centred layer --label induction line_start

Each transform maps a run's chi (tokens, components; `full` left out) to the features the token graph is
built on; every clustering then runs on the run's own kNN graph settings (`clustering` of its config.json):

- `zscore`: column z-scores (`spectro.features.standardize`);
- `centred`: z-scores minus each token's mean over components (the shipped default, `spectro.features`);
- `layer`: z-scores minus each token's mean over the components of the same layer (heads and MLP of one
  block): a shared term per layer instead of one in all; the embedding and the unembedding, blocks of
  one, keep their z-scores (removing their mean would zero them);
- `residual`: z-scores minus their first principal component (the shared term with fitted loadings
  rather than the equal loadings of row centring);
- `whitened`: the principal components after the first, each scaled to unit variance;
- `loss`: `centred` after regressing each z-scored column on the token's own loss level (1, loss, log loss,
  loss², from `token_loss`): what chi says beyond how easy the token is for the model.

For every transform and clustering (the run's conductance settings; Leiden at resolution 1 and 4) it
prints, per run, the clusters and the halves' ARI (both halves of the draws transformed and clustered
alike), the ARI between the first two runs (two seeds) and between the first run and the control on
tokens both cluster, and for each label the first run's best-cluster F1 and the readout of that
transform's features (cross-validated AUC and F1, `spectro.known_answers.readout`). Nothing is sampled;
the table in docs/clustering.md comes from this script.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

import numpy as np

from spectro.clusters import ClusterParams
from spectro.clusters.clustering import agreement, cluster_graph
from spectro.clusters.graph import token_graph
from spectro.config import ClusterConfig
from spectro.features import feature_matrix, standardize
from spectro.known_answers import best_cluster, readout
from spectro.store import read_susceptibilities

TRANSFORMS = ("zscore", "centred", "layer", "residual", "whitened", "loss")


def load(run_dir: Path) -> dict:
    ds = read_susceptibilities(run_dir / "susceptibilities.zarr")
    names = [str(c) for c in ds["component"].values]
    keep = [i for i, c in enumerate(names) if c != "full"]
    have = [str(x) for x in ds["label"].values] if "label" in ds else []
    config = json.loads((run_dir / "config.json").read_text()).get("clustering") or {}
    return {"dir": run_dir, "names": [names[i] for i in keep],
            "chi": np.asarray(ds["chi"].values, dtype=np.float64)[:, keep],                 # (tokens, components)
            "half": np.asarray(ds["chi_half"].values, dtype=np.float64)[:, :, keep],        # (2, tokens, components)
            "labels": {n: np.asarray(ds["token_labels"].values[:, i], dtype=bool) for i, n in enumerate(have)},
            "context": np.asarray(ds["token_context"].values),
            "loss": np.asarray(ds["token_loss"].values, dtype=np.float64),                  # (tokens,)
            "params": ClusterParams(**{**ClusterConfig().__dict__, **config})}


def layer_of(name: str) -> str:
    """The block a component belongs to: 'l2' for l2h1 and l2.mlp; the name itself otherwise."""
    m = re.match(r"^(l\d+)(h\d+|\.mlp)$", name)
    return m.group(1) if m else name


def transform(chi: np.ndarray, kind: str, names: list[str], loss: np.ndarray) -> np.ndarray:
    """(tokens, components) features of one transform (module notes); `loss` (tokens,) each token's loss."""
    if kind in ("zscore", "centred"):                                     # the library's own kinds
        return feature_matrix(chi, kind)
    z = standardize(chi)                                                   # (tokens, components)
    if kind == "loss":
        level = np.column_stack([np.ones_like(loss), loss, np.log(np.clip(loss, 1e-6, None)), loss ** 2])
        beta, *_ = np.linalg.lstsq(level, z, rcond=None)                   # (4, components)
        return feature_matrix(z - level @ beta, "centred")
    if kind == "layer":
        out, blocks = z.copy(), np.array([layer_of(n) for n in names])
        for b in np.unique(blocks):
            m = blocks == b
            if m.sum() > 1:
                out[:, m] -= z[:, m].mean(axis=1, keepdims=True)
        return out
    U, S, Vt = np.linalg.svd(z - z.mean(axis=0), full_matrices=False)    # U (tokens, r), Vt (r, components)
    if kind == "residual":
        return z - np.outer(U[:, 0] * S[0], Vt[0])
    if kind == "whitened":
        return U[:, 1:] * np.sqrt(z.shape[0])
    raise SystemExit(f"unknown transform {kind!r}; choose from {', '.join(TRANSFORMS)}")


def unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def clusters(features: np.ndarray, p: ClusterParams) -> np.ndarray:
    X = unit(features)
    W, outlier = token_graph(X, p)
    return cluster_graph(W, outlier, p, X)


def measure(run: dict, kind: str, p: ClusterParams) -> dict:
    f = transform(run["chi"], kind, run["names"], run["loss"])
    halves = [transform(h, kind, run["names"], run["loss"]) for h in run["half"]]
    lab = clusters(f, p)
    return {"features": f, "halves": halves, "labels": lab, "halves_ari": agreement(*[clusters(h, p) for h in halves])["ari"]}


def _f(v) -> str:
    return "–" if v is None else f"{v:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+", help="finished runs; the first two are compared as seeds")
    ap.add_argument("--control", type=Path, help="the nβ = 0 control of the first run")
    ap.add_argument("--transforms", nargs="+", default=list(TRANSFORMS), choices=TRANSFORMS)
    ap.add_argument("--label", nargs="+", default=["induction", "line_start"])
    ap.add_argument("--leiden", type=float, nargs="*", default=[1.0, 4.0], help="Leiden resolutions besides conductance")
    args = ap.parse_args()
    runs = [load(d) for d in args.runs] + ([load(args.control)] if args.control else [])
    first = runs[0]
    labels = [n for n in args.label if n in first["labels"]]
    base = first["params"]
    methods = [("conductance", dataclasses.replace(base, method="conductance"))] + [
        (f"leiden {r:g}", dataclasses.replace(base, method="leiden", resolution=r)) for r in args.leiden]
    print(f"{len(args.runs)} run(s) of {first['chi'].shape[0]:,} tokens x {first['chi'].shape[1]} components"
          + (", with a control" if args.control else "") + "\n")
    head = ("| transform | clustering | clusters | halves' ARI | seeds' ARI | vs control ARI |"
            + "".join(f" {n} F1 | {n} readout AUC / F1 |" for n in labels))
    print(head)
    print("|" + "---|" * (6 + 2 * len(labels)))
    for kind in args.transforms:
        for name, p in methods:
            m = [measure(r, kind, p) for r in runs]
            k = [int(x["labels"].max()) + 1 if (x["labels"] >= 0).any() else 0 for x in m]
            seeds = agreement(m[0]["labels"], m[1]["labels"])["ari"] if len(args.runs) > 1 else None
            ctl = agreement(m[0]["labels"], m[-1]["labels"])["ari"] if args.control else None
            cells = [kind, name, " / ".join(map(str, k)), " / ".join(_f(x["halves_ari"]) for x in m), _f(seeds), _f(ctl)]
            for n in labels:
                pos = first["labels"][n]
                b = best_cluster(m[0]["labels"], pos)
                r = readout(m[0]["features"], pos, first["context"], 0, m[0]["halves"]) if name == "conductance" else {}
                cells += [_f(b["f1"] if b else None),
                          f"{_f(r.get('readout_auc'))} / {_f(r.get('readout_f1'))}" if r else "(as above)"]
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
