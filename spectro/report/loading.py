"""The report's input: everything a run directory holds, each part optional.

`_Run.load(run_dir)` reads config.json, provenance.json, summary.json,
clusters.json, modes.json and sae.json, opens samples.zarr and
susceptibilities.zarr through `spectro.store`, and keeps the per-token table
(text, source, context, position, token id). The helpers here read figures out
of those files: the trust figures, per-component reliability, the
clustering's features and labels, and example-context text.

Non-obvious choices:
- Features are exactly the clustering's: `spectro.features.feature_matrix`
  of the clustered components' chi with the kind clusters.json names
  (`params.features`, else the kind its reliability was computed on, else
  `centred`), each row then scaled to unit length (cosine geometry, as the
  clustering's kNN graph). The map, the typicality of example contexts and
  the cards' profiles (mean feature row of the members) all use them. A
  component whose chi is not finite everywhere contributes zeros.
- Example contexts are the most typical members of a cluster (highest cosine
  to the cluster's mean feature row), distinct token texts first. Their text is
  assembled from the probe tokens' own decoded texts (`token_text`) of the
  neighbouring positions; position 0 of a context is not a probe token, so its
  text comes from another occurrence of the same token id, or from the
  model's tokenizer file when that is at hand, else it is shown as `⟨id⟩`.
- The verdict and the reliability/stability figures come from clusters.json
  (written by the clusters stage), else from summary.json and
  susceptibilities.zarr's attrs; a run without them gets a grey box saying
  which stage provides them, not a warning.
- Missing inputs (clusters.json, modes.json, susceptibilities.zarr, ...) are
  reported in the page and the sections that need them are skipped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from spectro import rundir

log = logging.getLogger("spectro")


def _read_json(path: Path, notes: list[str]) -> Optional[Any]:
    if not path.exists():
        notes.append(f"{path.name} not found")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        notes.append(f"{path.name} could not be read ({e})")
        return None


def _read_sae(run_dir: Path) -> tuple[Optional[dict], Optional[str]]:
    path = run_dir / "sae.json"
    if not path.exists():
        return None, None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return None, f"sae.json could not be read ({e})"
    return (doc, None) if isinstance(doc, dict) else (None, "sae.json is not a JSON object")


def _num(x: Any) -> float:
    """x as a float; NaN for None or anything that is not a number."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


class _Run:
    """Everything the report needs, each part optional."""

    def __init__(self, run_dir: rundir.PathLike):
        self.run_dir = rundir.location(run_dir)       # a local directory or a URL (storage.uri)
        self.notes: list[str] = []           # missing/odd inputs, shown at the top
        self.config = self.provenance = self.summary = self.clusters = self.modes = None
        self.rounds = None                   # rounds.json: only a run sampled until reliable has one
        self.sae: Optional[dict] = None      # sae.json; its absence is the SAE section's business, not a note
        self.sae_error: Optional[str] = None
        self.samples = None                  # SampleStore
        self.sus = None                      # xarray Dataset
        # per-token table (token,)
        self.text: list[str] = []
        self.context = self.position = self.token_id = None
        self.source: list[str] = []
        self.probe_ids = None                # (context, position)
        self.contexts = None                 # _Contexts, built on first use

    @classmethod
    def load(cls, run_dir: rundir.PathLike) -> "_Run":
        r = cls(run_dir)
        run_dir = r.run_dir
        r.config = _read_json(run_dir / "config.json", r.notes)
        r.provenance = _read_json(run_dir / "provenance.json", r.notes)
        r.summary = _read_json(run_dir / "summary.json", r.notes)
        r.clusters = _read_json(run_dir / "clusters.json", r.notes)
        r.modes = _read_json(run_dir / "modes.json", r.notes)
        if (run_dir / "rounds.json").exists():
            r.rounds = _read_json(run_dir / "rounds.json", r.notes)
        r.sae, r.sae_error = _read_sae(run_dir)
        if (run_dir / "samples.zarr").exists():
            from spectro.store import SampleStore
            r.samples = SampleStore.open(run_dir / "samples.zarr")
        else:
            r.notes.append("samples.zarr not found")
        if (run_dir / "susceptibilities.zarr").exists():
            from spectro.store import read_susceptibilities
            r.sus = read_susceptibilities(run_dir / "susceptibilities.zarr")
        else:
            r.notes.append("susceptibilities.zarr not found")
        r._load_tokens()
        return r

    def _load_tokens(self) -> None:
        if self.samples is not None:
            rd = self.samples.read
            self.text = [str(t) for t in rd("token_text").tolist()]
            self.source = [str(t) for t in rd("token_source").tolist()]
            self.context = np.asarray(rd("token_context"), dtype=np.int64)
            self.position = np.asarray(rd("token_position"), dtype=np.int64)
            self.token_id = np.asarray(rd("token_id"), dtype=np.int64)
            self.probe_ids = np.asarray(rd("probe_input_ids"), dtype=np.int64)
        elif self.sus is not None:
            s = self.sus
            self.text = [str(t) for t in s["token_text"].values.tolist()]
            self.source = [str(t) for t in s["token_source"].values.tolist()]
            self.context = np.asarray(s["token_context"].values, dtype=np.int64)
            self.position = np.asarray(s["token_position"].values, dtype=np.int64)
            self.token_id = np.asarray(s["token_id"].values, dtype=np.int64) if "token_id" in s else None

    @property
    def n_tokens(self) -> int:
        return len(self.text)


CONTEXT_LEFT, CONTEXT_RIGHT = 12, 6


class _Contexts:
    """Text of every (context, position) from the probe tokens' decoded texts."""

    def __init__(self, run: _Run):
        self.run = run
        n_ctx = int(run.context.max()) + 1 if run.context is not None and run.context.size else 0
        seq = int(run.position.max()) + 1 if run.position is not None and run.position.size else 0
        if run.probe_ids is not None:
            n_ctx, seq = max(n_ctx, run.probe_ids.shape[0]), max(seq, run.probe_ids.shape[1])
        grid = np.full((n_ctx, seq), None, dtype=object)
        if run.n_tokens:
            grid[run.context, run.position] = np.array(run.text, dtype=object)
        if run.probe_ids is not None and run.token_id is not None:
            missing = np.argwhere(grid[: run.probe_ids.shape[0], : run.probe_ids.shape[1]] == None)  # noqa: E711
            if missing.size:
                text_of = dict(zip(run.token_id.tolist(), run.text))
                ids = run.probe_ids[missing[:, 0], missing[:, 1]].tolist()
                unknown = sorted({i for i in ids if i not in text_of})
                text_of.update(self._decode(unknown))
                for (c, p), i in zip(missing.tolist(), ids):
                    grid[c, p] = text_of.get(i, f"⟨{i}⟩")
        self.grid = grid

    def _decode(self, ids: list[int]) -> dict[int, str]:
        if not ids:
            return {}
        path = ((self.run.provenance or {}).get("model") or {}).get("path")
        tok_file = Path(path) / "tokenizer.json" if path else None
        if tok_file is None or not tok_file.exists():
            return {}
        try:
            from tokenizers import Tokenizer
            tok = Tokenizer.from_file(str(tok_file))
            return dict(zip(ids, tok.decode_batch([[i] for i in ids], skip_special_tokens=False)))
        except Exception as e:  # a display nicety; never fail the report on it
            log.warning("report: could not decode context tokens with %s: %s", tok_file, e)
            return {}

    @classmethod
    def of(cls, run: _Run) -> "_Contexts":
        if run.contexts is None:
            run.contexts = cls(run)
        return run.contexts

    def snippet(self, token: int) -> tuple[str, str, str]:
        c, p = int(self.run.context[token]), int(self.run.position[token])
        row = self.grid[c]
        left = "".join(t or "" for t in row[max(0, p - CONTEXT_LEFT): p])
        right = "".join(t or "" for t in row[p + 1: p + 1 + CONTEXT_RIGHT])
        return left, self.run.text[token], right


def _trust(run: _Run) -> tuple[Optional[dict], Optional[dict], Optional[dict]]:
    """(verdict, reliability, stability): clusters.json's, else summary.json's verdict and the zarr's reliability."""
    c = run.clusters if isinstance(run.clusters, dict) else {}
    v = c.get("verdict")
    if not isinstance(v, dict) and isinstance(run.summary, dict):
        v = run.summary.get("verdict")
    rel = c.get("reliability")
    if not isinstance(rel, dict) and run.sus is not None:
        rel = run.sus.attrs.get("reliability")
    stab = c.get("stability")
    return (v if isinstance(v, dict) else None, rel if isinstance(rel, dict) else None,
            stab if isinstance(stab, dict) else None)


def _per_component_reliability(run: _Run, comps: Sequence[str], rel: Optional[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(raw, features) reliability per component: the zarr's arrays, else the reliability dict's lists."""
    out = []
    for var, key in (("reliability_raw", "raw"), ("reliability_features", "features_reliability")):
        vals = np.full(len(comps), np.nan)
        if run.sus is not None and var in run.sus:
            vals = np.asarray(run.sus[var].values, dtype=np.float64)
        elif rel and isinstance(rel.get(key), list) and isinstance(rel.get("components"), list):
            by = dict(zip(map(str, rel["components"]), rel[key]))
            vals = np.array([_num(by.get(c)) for c in comps])
        out.append(vals)
    return out[0], out[1]


def _feature_kind(run: _Run) -> str:
    """The clustering's feature kind: clusters.json's params.features, else its reliability's, else centred."""
    from spectro.features import KINDS

    c = run.clusters if isinstance(run.clusters, dict) else {}
    params = c.get("params") if isinstance(c.get("params"), dict) else {}
    rel = c.get("reliability") if isinstance(c.get("reliability"), dict) else {}
    kind = params.get("features") or rel.get("features") or "centred"
    if kind not in KINDS:
        run.notes.append(f"clusters.json names feature kind {kind!r}, which this report does not know; the map "
                         f"and contexts use 'centred'")
        kind = "centred"
    return str(kind)


def _features(run: _Run, names: Optional[Sequence[str]], kind: str
              ) -> tuple[list[str], Optional[np.ndarray], Optional[np.ndarray]]:
    """(component names, features (token, comp) before row scaling, the same rows at unit length).

    The clustering's features (module notes) of its components; a component whose chi is not finite everywhere
    contributes zeros, and a row with no direction left (all zero) stays zero."""
    from spectro.features import feature_matrix

    if run.sus is None:
        return [], None, None
    all_names = [str(c) for c in run.sus["component"].values.tolist()]
    if names and all(n in all_names for n in names):
        use = list(names)
    else:
        use = [n for n in all_names if n != "full"] or all_names
    chi = np.asarray(run.sus["chi"].values, dtype=np.float64)[:, [all_names.index(n) for n in use]]
    ok = np.isfinite(chi).all(axis=0)
    f = np.zeros_like(chi)
    ref = np.zeros(chi.shape[0])
    if chi.shape[0] >= 2 and ok.any():
        f[:, ok] = feature_matrix(chi[:, ok], kind)
        ref = np.linalg.norm(feature_matrix(chi[:, ok], "zscore"), axis=1)
    norm = np.linalg.norm(f, axis=1)
    has = (norm > 1e-9 * ref) & (norm > 0)         # centring can leave a uniform row with rounding noise only
    f[~has] = 0.0
    fn = np.divide(f, norm[:, None], out=np.zeros_like(f), where=has[:, None])
    return use, f, fn


def _labels(run: _Run, n: int) -> Optional[np.ndarray]:
    c = run.clusters
    if not isinstance(c, dict):
        return None
    labels = c.get("labels")
    if labels is None:
        labels = np.full(n, -1, dtype=np.int64)
        for cl in c.get("clusters") or []:
            members = cl.get("members")
            if members is None:
                return None
            labels[np.asarray(members, dtype=np.int64)] = int(cl["id"])
        return labels
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (n,):
        run.notes.append(f"clusters.json has {labels.shape[0]} labels but the run has {n} tokens; "
                         "cluster labels are not used for the map or the contexts")
        return None
    return labels
