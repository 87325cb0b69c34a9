"""The clusters stage, with how far to trust its clusters.

`clusters_stage` clusters a run's susceptibilities (spectro.clusters) and
writes clusters.json once, with the figures that say how far to trust it:

- the split-half reliability of the clustering features (spectro.reliability);
- the stability of the clusters across halves of the chains (spectro.stability);
- the plain verdict built from both and from the components that have not mixed;
- the known answers: the clusters and chi checked against the probe tokens'
  labels (spectro.known_answers), when the probe set has labels;
- the structure at several scales (`clustering.scales`, spectro.clusters.scales):
  Leiden at each resolution, with its halves' stability, the finest scale
  whose halves agree, and each label's best cluster at every scale.

    from spectro.trust import clusters_stage
    summary = clusters_stage(run_dir, ClusterParams.from_config(config.clustering))
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import numpy as np

from spectro import console, rundir
from spectro.clusters import ClusterInput, ClusterParams, Clustering, cluster_run
from spectro.clusters.scales import resolution_path
from spectro.features import feature_matrix
from spectro.known_answers import best_cluster, headline, known_answers
from spectro.reliability import split_half, verdict
from spectro.stability import stability
from spectro.store import read_susceptibilities

log = logging.getLogger("spectro")


def clusters_stage(run_dir: rundir.PathLike, params: ClusterParams) -> dict:
    """Cluster `<run_dir>/susceptibilities.zarr`; write clusters.json (with reliability, stability, verdict and
    known answers) and modes.json; return the stage's summary."""
    run_dir = rundir.location(run_dir)
    t0 = time.perf_counter()
    ds = read_susceptibilities(run_dir / rundir.SUSCEPTIBILITIES)
    figures: dict = {}

    def assess(inp: ClusterInput, result: Clustering) -> dict:
        figures.update(trust_figures(run_dir, ds, inp.components, result.labels, params))
        return figures

    out = cluster_run(run_dir, params, assess=assess)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    rel, stab, v = figures["reliability"], figures["stability"], figures["verdict"]
    out.update({"reliability": None if rel is None else {k: rel[k] for k in ("features_median", "features_min",
                                                                               "least_reliable")},
                "stability": None if stab is None else {k: stab[k] for k in ("ari", "ari_all_tokens",
                                                                             "n_clusters_halves")},
                "verdict": v, "known_answers": answers_summary(figures["known_answers"]),
                "scales": scales_summary(figures["scales"])})
    log.info("verdict: %s (%s)", v["text"], "; ".join(v["reasons"]), extra=console.FILE_ONLY)   # the end repeats it
    return out


def trust_figures(run_dir: rundir.Location, ds, clustered: list[str], labels: np.ndarray,
                  params: ClusterParams) -> dict:
    """reliability, stability, verdict and known_answers of one clustering of the run in `ds`."""
    names = [str(c) for c in ds["component"].values]
    keep = [names.index(c) for c in clustered]
    chi = np.asarray(ds["chi"].values, dtype=np.float64)[:, keep]                      # (tokens, clustered)
    rel = stab = half = None
    if "chi_half" in ds:
        half = np.asarray(ds["chi_half"].values, dtype=np.float64)[:, :, keep]        # (2, tokens, clustered)
        rel = split_half(half, clustered, params.features)
        t1 = time.perf_counter()
        stab = stability(half, params)
        if stab is not None:
            stab["seconds"] = round(time.perf_counter() - t1, 2)
        if not np.isfinite(half).all():         # halves with too few units are NaN: no half readout or scales
            half = None
    not_mixed = [c for c, bad in zip(names, ds["not_mixed"].values) if bool(bad)] if "not_mixed" in ds else []
    answers = _known_answers(run_dir, ds, chi, clustered, np.asarray(labels), params, half)
    return {"reliability": rel, "stability": stab, "verdict": verdict(rel, stab, not_mixed),
            "known_answers": answers, "scales": _scales(ds, chi, half, params)}


def _scales(ds, chi: np.ndarray, half: Optional[np.ndarray], params: ClusterParams) -> Optional[dict]:
    """The resolution path of chi (tokens, clustered) with its finite halves (2, tokens, clustered) or None
    (spectro.clusters.scales), each scale with its per-token labels (the SAE stage matches features at every
    scale) and the best cluster per probe label of `ds` (F1 and the size ceiling); None with `clustering.scales`
    empty."""
    if not params.scales:
        return None
    n = chi.shape[0]
    if params.scales_max_tokens and n > params.scales_max_tokens:
        log.info("scales: skipped at %d probe tokens (clustering.scales_max_tokens=%d; each scale clusters the run "
                 "and both halves with Leiden); raise it or set 0 for the table", n, params.scales_max_tokens)
        return None
    t0 = time.perf_counter()
    path = resolution_path(chi, half, params, resolutions=params.scales)
    positives = {}
    if "token_labels" in ds:
        flags = np.asarray(ds["token_labels"].values, dtype=bool)                      # (tokens, labels)
        positives = {str(name): flags[:, j] for j, name in enumerate(ds["label"].values) if flags[:, j].any()}
    for sc in path["scales"]:
        labels = sc["labels"]
        sc["labels"] = labels.astype(np.int64).tolist()
        sc["known_answers"] = {}
        for name, pos in positives.items():
            b = best_cluster(labels, pos)
            if b:
                sc["known_answers"][name] = {"f1": b["f1"], "ceiling": b["ceiling"], "size": b["size"]}
    path["seconds"] = round(time.perf_counter() - t0, 2)
    return path


def scales_summary(path: Optional[dict]) -> Optional[dict]:
    """The chosen scale of the path (the finest whose halves agree; else the most stable) for summary.json."""
    if not path or not path["scales"]:
        return None
    sc = path["scales"][path["chosen"]]
    return {"stable": path["stable"], "resolution": sc["resolution"], "n_clusters": sc["n_clusters"],
            "halves_ari": sc.get("halves_ari"), "resolutions": [s["resolution"] for s in path["scales"]]}


def _known_answers(run_dir: rundir.Location, ds, chi: np.ndarray, clustered: list[str], member: np.ndarray,
                   params: ClusterParams, half: Optional[np.ndarray]) -> Optional[dict]:
    """spectro.known_answers on the run's labelled probe tokens (chi: tokens x clustered; half: its finite halves
    or None); None when the probe set has no labels."""
    if "token_labels" not in ds:
        return None
    label_names = [str(x) for x in ds["label"].values]
    rules = ds.attrs.get("label_rules", {})
    prov = rundir.read_json(run_dir / rundir.PROVENANCE) if (run_dir / rundir.PROVENANCE).exists() else {}
    mech = ((prov.get("model") or {}).get("training") or {}).get("mechanisms") or {}
    named = {k: mech[k] for k in ("induction_heads", "previous_token_heads") if k in mech}
    return known_answers(np.asarray(ds["token_labels"].values, dtype=bool), label_names,
                         [rules.get(n, "") for n in label_names], member, chi, feature_matrix(chi, params.features),
                         clustered, np.asarray(ds["token_context"].values), named, seed=params.seed,
                         features_half=[] if half is None else [feature_matrix(h, params.features) for h in half],
                         token_loss=np.asarray(ds["token_loss"].values) if "token_loss" in ds else None)


def answers_summary(answers: Optional[dict]) -> Optional[dict]:
    """Per label, the figures a summary line needs (spectro.known_answers.headline)."""
    if not answers:
        return None
    return {e["label"]: headline(answers, e["label"]) for e in answers["labels"] if "best_cluster" in e}
