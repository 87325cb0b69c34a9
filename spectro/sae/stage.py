"""The `sae` stage: train (or load) an SAE, measure it, match its features to the run's clusters.

`sae_stage` reads clusters.json's labels and the language model's activations and writes sae.json (and
the trained SAE under sae/); the pipeline only gathers its inputs (the model and contexts of the run's own
config) and calls it.

    from spectro.sae.stage import sae_stage
    summary = sae_stage(run_dir, config.sae, model, train_ids, probe_ids, ctx, pos, token_text, clusters)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from spectro import rundir
from spectro.config import SAEConfig
from spectro.errors import SAEError
from spectro.sae.activations import _site_module, collect_activations, fve, spliced_losses
from spectro.sae.matching import cluster_examples, match_clusters, probe_features, top_tokens
from spectro.sae.model import SAE, hook_name, load_sae, parse_hook_name, save_sae
from spectro.sae.training import TrainSettings, train_topk


def sae_stage(run_dir: rundir.PathLike, settings: SAEConfig, model: torch.nn.Module, train_ids: torch.Tensor,
              probe_ids: torch.Tensor, token_context: np.ndarray, token_position: np.ndarray,
              token_text: Sequence[str], clusters: dict) -> dict:
    """Train (or load) the SAE, measure it, match it to clusters.json; write sae.json (+ sae/); return a summary.

    settings: the config's `sae` section; train_ids: (n, seq) sampling-distribution contexts; probe_ids:
    (n_probe_contexts, seq) the run's probe contexts; token_*: the run's probe table."""
    a = settings
    t0, c0 = time.perf_counter(), time.process_time()
    run_dir = rundir.location(run_dir)
    labels = np.asarray(clusters.get("labels", []), dtype=np.int64)
    if labels.size != len(token_text):
        raise SAEError(f"clusters.json labels {labels.size} tokens but the run has {len(token_text)} probe tokens; "
                       f"re-run the clusters stage")
    loaded = _load(a, model) if a.load else None                       # checked before any activation is collected
    X = collect_activations(model, train_ids, a.site, a.layer).reshape(-1, int(model.config.hidden_size))
    sae, train_log = (loaded, None) if loaded is not None else _train(run_dir, a, X)   # X: (n * seq, d)
    probe_acts = collect_activations(model, probe_ids, a.site, a.layer)   # (n_probe_ctx, seq, d)
    quality = {"fve_probe": fve(sae, probe_acts), "fve_train": fve(sae, X),
               **spliced_losses(model, probe_ids, sae, a.site, a.layer, X.double().mean(dim=0).float())}
    active = probe_features(sae, probe_acts, token_context, token_position, a.position, a.active_threshold)
    match = _match(active, labels, clusters, token_text, a)
    match["scales"] = _match_scales(active, clusters, a)
    n_active_feat = np.asarray((active != 0).sum(axis=0)).ravel()     # (features,)
    doc = {"site": a.site, "layer": a.layer, "hook_name": hook_name(a.site, a.layer), "position": a.position,
           "source": str(a.load) if a.load else "trained", "path": str(Path(a.load).resolve()) if a.load
           else str(run_dir / "sae"), "architecture": sae.architecture, "d_in": sae.d_in, "d_sae": sae.d_sae,
           "k": sae.k, "training": train_log, "quality": quality,
           "l0_probe": float((active != 0).sum() / max(1, active.shape[0])),
           "features_never_active_on_probe": int((n_active_feat == 0).sum()),
           "active_threshold": a.active_threshold, "clustering_method": clusters.get("method"),
           "n_tokens": int(labels.size), **match, "seconds": round(time.perf_counter() - t0, 2),
           "cpu_seconds": round(time.process_time() - c0, 2)}
    rundir.write_json(run_dir / rundir.SAE, doc, indent=1, allow_nan=True)
    null = match["null"] or {}
    return {"path": str(run_dir / "sae.json"), "fve_probe": quality["fve_probe"],
            "loss_increase": quality["loss_increase"], "n_clusters": match["n_clusters"],
            "matched_fraction": match["matched_fraction"], "null_mean": null.get("matched_fraction_mean"),
            "p_value": null.get("p_value"), "seconds": doc["seconds"], "cpu_seconds": doc["cpu_seconds"],
            "scales": [{k: sc[k] for k in ("resolution", "n_clusters", "n_can_match", "n_matched", "null_q95")}
                       for sc in match["scales"] or []] or None}


def _match_scales(active, clusters: dict, a: SAEConfig) -> Optional[list[dict]]:
    """The match at every scale of clusters.json's resolution path (spectro.clusters.scales): per resolution
    the clusters, how many of them could match (their size ceiling reaches the threshold), the matched
    fraction and its null. Finer scales have smaller clusters, so this is where a match becomes possible."""
    path = clusters.get("scales") or {}
    out = []
    for sc in path.get("scales") or []:
        if "labels" not in sc:
            continue
        m = match_clusters(active, np.asarray(sc["labels"], dtype=np.int64), a.match_threshold, a.n_null, a.seed)
        null = m["null"] or {}
        out.append({"resolution": sc["resolution"], "halves_ari": sc.get("halves_ari"),
                    "n_clusters": m["n_clusters"], "n_can_match": m.get("n_can_match", 0),
                    "n_matched": m.get("n_matched", 0), "matched_fraction": m["matched_fraction"],
                    "mean_best_f1": m.get("mean_best_f1"), "null_q95": null.get("matched_fraction_q95"),
                    "p_value": null.get("p_value"), "null_mean_best_f1_q95": null.get("mean_best_f1_q95"),
                    "p_value_mean_best_f1": null.get("p_value_mean_best_f1")})
    return out or None


def _load(a: SAEConfig, model: torch.nn.Module) -> SAE:
    """The SAE `sae.load` names, checked against sae.site/sae.layer and the model."""
    sae = load_sae(Path(a.load), d_in=int(model.config.hidden_size))
    parsed = parse_hook_name(sae.hook_name)
    if parsed is not None and parsed != (a.site, a.layer):
        raise SAEError(f"the SAE in {a.load} was trained on {sae.hook_name} but sae.site={a.site}, "
                       f"sae.layer={a.layer}; set sae.site={parsed[0]} sae.layer={parsed[1]}")
    _site_module(model, a.site, a.layer)                              # refuses a bad site/layer early
    return sae


def _train(run_dir: rundir.Location, a: SAEConfig, X: torch.Tensor) -> tuple[SAE, dict]:
    """A TopK SAE trained on X (n, d), saved under sae/ with its training log."""
    ts = TrainSettings.from_config(a)
    sae, train_log = train_topk(X, ts)
    sae.hook_name = hook_name(a.site, a.layer)
    sae.meta = {"trained_by": "spectro", "training": train_log, "settings": ts.__dict__}
    save_sae(sae, run_dir / "sae")
    return sae, train_log


def _match(active, labels: np.ndarray, clusters: dict, token_text: Sequence[str], a: SAEConfig) -> dict:
    """match_clusters of the probe-token feature activity, with each match's top tokens and examples."""
    ids = [int(c["id"]) for c in clusters.get("clusters") or []]
    match = match_clusters(active, labels, a.match_threshold, a.n_null, a.seed, cluster_ids=ids)
    top_of = {int(c["id"]): c.get("top_tokens") or [] for c in clusters.get("clusters") or []}
    for c in match["clusters"]:
        c["feature_top"] = [[t, v] for t, v in top_tokens(active, c["feature"], a.top_contexts)]
        c["examples"] = cluster_examples(labels, c["id"], token_text, a.top_contexts, a.seed)
        c["top_tokens"] = top_of.get(c["id"], [])[:8]
    return match
