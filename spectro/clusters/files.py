"""The clusters stage's files in a run directory: the clustering input read from
`susceptibilities.zarr` (without `full` and components with no estimate),
and `clusters.json` written through the run directory's one JSON writer
(`spectro.rundir`); `cluster_run` does both around one clustering and
writes the modes beside it.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from spectro import rundir
from spectro.clusters.clustering import Clustering, cluster
from spectro.clusters.params import ClusterParams
from spectro.errors import ConfigError, DataError
from spectro.features import standardize
from spectro.modes import modes as compute_modes
from spectro.modes import write_modes
from spectro.roles import role_agreement, token_roles

log = logging.getLogger("spectro.clusters")


def write_clusters(run_dir, clustering: Clustering, chi: np.ndarray, components: Sequence[str],
                   token_text: Sequence[str], token_source: Sequence[str], top_n: int = 20,
                   extra: Optional[dict] = None) -> rundir.Location:
    """Write `<run_dir>/clusters.json` and return its path: method, params, components, n_tokens,
    n_clusters, n_noise, role_agreement, labels (-1 = noise), and per cluster id, size,
    conductance, profile (mean z-scored chi), profile_raw, top_tokens, sources, roles, members; plus the
    keys of `extra` (the stage's trust figures: spectro.trust)."""
    run_dir = rundir.location(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"run directory {run_dir} does not exist; create it or pass the run's directory")
    chi = np.asarray(chi, dtype=np.float64)
    components = [str(c) for c in components]
    n = clustering.labels.size
    if chi.ndim != 2 or chi.shape != (n, len(components)):
        raise DataError(f"chi has shape {chi.shape}; expected ({n} tokens, {len(components)} components) to match "
                        f"the clustering and the component names")
    if len(token_text) != n or len(token_source) != n:
        raise DataError(f"token_text ({len(token_text)}) and token_source ({len(token_source)}) must have one "
                        f"entry per token ({n})")
    if isinstance(top_n, bool) or not isinstance(top_n, (int, np.integer)) or top_n < 1:
        raise ConfigError(f"top_n must be a positive integer, got {top_n!r}")
    z = standardize(chi)
    text = np.asarray(token_text, dtype=object)
    source = np.asarray(token_source, dtype=object)
    roles = token_roles(token_text, token_source)
    out_clusters = []
    for c in clustering.clusters:
        m = np.sort(np.asarray(c["members"], dtype=np.int64))
        sources = Counter(str(s) for s in source[m]).most_common()
        out_clusters.append({
            "id": int(c["id"]),
            "size": int(m.size),
            "conductance": float(c["conductance"]),
            "profile": [float(x) for x in z[m].mean(axis=0)],
            "profile_raw": [float(x) for x in chi[m].mean(axis=0)],
            "top_tokens": [[str(t), int(k)] for t, k in Counter(str(t) for t in text[m]).most_common(int(top_n))],
            "sources": {s: int(k) for s, k in sources},
            "roles": {r: int(k) for r, k in Counter(roles[m].tolist()).most_common()},
            "members": m.tolist(),
        })
    labels = clustering.labels
    doc = {
        "method": clustering.params.method,
        "params": asdict(clustering.params),
        "components": components,
        "n_tokens": int(n),
        "n_clusters": len(out_clusters),
        "n_noise": int((labels < 0).sum()),
        "role_agreement": role_agreement(labels, roles, seed=0, shuffles=10) if out_clusters else None,
        "labels": labels.astype(np.int64).tolist(),
        "clusters": out_clusters,
        **(extra or {}),
    }
    return rundir.write_json(run_dir / rundir.CLUSTERS, doc, indent=None)


@dataclass(frozen=True)
class ClusterInput:
    """What the clusters stage clusters: chi of the clustered components and the probe tokens' texts."""
    chi: np.ndarray                 # (tokens, components) float64
    components: list[str]           # the clustered components (no `full`, none without an estimate)
    dropped: list[str]              # components left out because they have no estimate (all NaN)
    token_text: list[str]
    token_source: list[str]


def read_input(run_dir) -> ClusterInput:
    """The clustering input from `<run_dir>/susceptibilities.zarr`: every component but "full" and those with
    no estimate (all NaN: no usable chain), which are dropped with a warning."""
    from spectro.components import FULL
    from spectro.store import read_susceptibilities

    path = rundir.location(run_dir) / rundir.SUSCEPTIBILITIES
    ds = read_susceptibilities(path)
    missing = [v for v in ("chi", "component", "token_text", "token_source") if v not in ds.variables]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}; re-run the susceptibilities stage")
    names = [str(c) for c in ds["component"].values]
    chi_all = np.asarray(ds["chi"].values, dtype=np.float64)
    keep = [i for i, c in enumerate(names) if c != FULL]
    empty = [names[i] for i in keep if np.isnan(chi_all[:, i]).all()]
    if empty:
        log.warning("dropping components with no estimate (all NaN; no usable chain): %s", ", ".join(empty))
        keep = [i for i in keep if names[i] not in empty]
    if not keep:
        raise DataError(f"{path} has no component to cluster on besides {FULL!r}")
    return ClusterInput(chi=chi_all[:, keep], components=[names[i] for i in keep], dropped=empty,
                        token_text=[str(t) for t in ds["token_text"].values],
                        token_source=[str(s) for s in ds["token_source"].values])


def cluster_run(run_dir, params: ClusterParams = ClusterParams(),
                assess: Optional[Callable[[ClusterInput, Clustering], dict]] = None) -> dict:
    """Cluster `<run_dir>/susceptibilities.zarr` (without the "full" component); write clusters.json (once, with
    the keys `assess(input, clustering)` returns) and modes.json; return a summary. `run_dir` may be a URL
    (spectro.rundir.Location)."""
    run_dir = rundir.location(run_dir)
    inp = read_input(run_dir)
    result = cluster(inp.chi, params)
    extra = assess(inp, result) if assess is not None else None
    clusters_path = write_clusters(run_dir, result, inp.chi, inp.components, inp.token_text, inp.token_source,
                                   extra=extra)
    modes_path = write_modes(run_dir, compute_modes(inp.chi, inp.components, inp.token_text))
    sizes = [c["size"] for c in result.clusters]
    median_phi = float(np.median([c["conductance"] for c in result.clusters])) if sizes else None
    summary = {"clusters_path": str(clusters_path), "modes_path": str(modes_path), "method": params.method,
               "n_tokens": int(result.labels.size), "n_clusters": len(result.clusters),
               "n_noise": int((result.labels < 0).sum()), "largest": sizes[:10],
               "median_conductance": median_phi,
               "components": inp.components, "dropped_components": inp.dropped, "graph_stats": result.graph_stats,
               "role_agreement": rundir.read_json(clusters_path)["role_agreement"]}
    log.info("clusters: %d clusters, %d noise of %d tokens (%s)", summary["n_clusters"], summary["n_noise"],
             summary["n_tokens"], params.method)
    return summary
