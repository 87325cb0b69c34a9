"""`report.html`: one self-contained page a researcher can browse.

`write_report(run_dir)` reads a run directory (config.json, provenance.json,
summary.json, samples.zarr, susceptibilities.zarr, clusters.json, modes.json,
sae.json) and writes `<run_dir>/report.html` with, in order:

0. under the title, the verdict: how far to trust the run (clusters.json's
   `verdict`, its reasons, the split-half reliability of the clustering
   features and of raw chi, the ARI between the clusterings of two halves of
   the chains) and how to read those figures;
1. run configuration and provenance (model, file hashes, corpus, versions);
2. sampling diagnostics per component (LLC, R-hat, ESS, divergences, and the
   split-half reliability of raw chi and of the features), flagged where the
   chains have not mixed or a reliability is below its target;
3. per-chain traces of phi = sampling_loss - init_loss (inline SVG);
4. the mode spectrum and each mode's component loadings and extreme tokens;
5. a 2-D map of tokens (UMAP, or PCA with `report.map=pca`, of the clustering
   features) coloured by cluster, drawn on a canvas with a hover tooltip;
6. the cluster gallery: cards rendered by a small script from data embedded
   as JSON, with paging, token-text search and a minimum-size filter;
7. the SAE validation (sae.json);
8. against the nβ = 0 control (`report.control`): the ARI between this run's
   clusters and the control's beside this run's own split-half ARI, role
   purity, SAE matches and cluster counts of both runs.

Static parts (header, tables, SVG charts) are rendered here; the map and the
gallery are rendered in the browser from `<script type="application/json">`.
CSS and JS live in `spectro/assets/report/` and are inlined: the page loads
nothing from the network.

Non-obvious choices:
- Every string from the run (token texts, config values) is HTML-escaped
  here or in the script; the embedded JSON has `<`, `>`, `&`, U+2028/9
  escaped so no token text can close the `<script>` element.
- Non-finite numbers become `null` in the embedded JSON (JSON.parse rejects
  NaN) and `–` in tables.
- Features are exactly the clustering's: `spectro.features.feature_matrix`
  of the clustered components' chi with the kind clusters.json names
  (`params.features`, else the kind its reliability was computed on, else
  `centred`), each row then scaled to unit length (cosine geometry, as the
  clustering's kNN graph). The map, the typicality of example contexts and
  the cards' profiles (mean feature row of the members) all use them. A
  component whose chi is not finite everywhere contributes zeros.
- The map is UMAP of those rows: `n_neighbors` = 45, fewer for tiny runs
  (a tenth of the points), `min_dist` 0.1, a fixed `random_state` and one
  thread, so the same run gives the same picture. The neighbour lists are
  computed here, exactly (`_knn`: blocked float32 products, torch top-k) and
  handed to UMAP as `precomputed_knn`: below 4,096 points umap-learn would
  otherwise compute all pairwise distances through a Python-level callable
  (24 s for 4,032 points, against 0.2 s here), and above it build an
  NN-descent index. Measured for unit rows of 32 components on the 2-core
  machine this was written on, shared with other jobs (load 5-6): 4,032
  points 9 s (0.2 s kNN, the rest UMAP's 500 epochs), 20,000 points 21 s
  (3 s kNN, 200 epochs), plus 11 s once per process for umap's import and
  numba compilation. With fewer than `MAP_UMAP_MIN_POINTS` points, or if
  UMAP fails, the map falls back to PCA and says so. UMAP keeps
  neighbourhoods, not global distances: the page says that distances between
  far groups mean little.
- Above `MAP_MAX_POINTS` tokens the map is a seeded subsample that keeps at
  least `MAP_MIN_PER_CLUSTER` members of every cluster (UMAP runs on the
  subsample), and the page says so; the page then stays a few MB and opens
  in seconds.
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
- The control comparison is refused (a notice in its section, not an error)
  when the control's probe tokens differ from this run's (count, token ids,
  texts, positions): labels of different tokens cannot be compared. A
  control directory that does not exist is a `ConfigError` (config
  validation raises it before any work; `write_report` again).
- `map_method` and `control` not passed to `write_report` are taken from the
  run's own config.json (`report.map`, `report.control`).
- Missing inputs (clusters.json, modes.json, susceptibilities.zarr, ...) are
  reported in the page and the sections that need them are skipped.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import logging
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

log = logging.getLogger("spectro")

ASSETS = Path(__file__).parent / "assets" / "report"
MAP_MAX_POINTS = 20_000
MAP_MIN_PER_CLUSTER = 25
MAP_METHODS = ("umap", "pca")
MAP_UMAP_MIN_POINTS = 10         # fewer points: PCA
UMAP_NEIGHBOURS = 45             # n_neighbors; a tenth of the points when that is fewer
UMAP_MIN_DIST = 0.1
MAP_SEED = 0
SEARCH_TEXTS_PER_CLUSTER = 300   # distinct member texts kept per cluster for search
TOP_TOKENS_SHOWN = 12
CONTEXT_LEFT, CONTEXT_RIGHT = 12, 6
MAX_MODES_SHOWN = 20
MAX_SPECTRUM_BARS = 48
TRACE_MAX_POINTS = 400

# Section ids and headings, in page order (tests check them).
SECTIONS = (
    ("run", "Run configuration and provenance"),
    ("diagnostics", "Sampling diagnostics"),
    ("traces", "Chain traces"),
    ("modes", "Mode spectrum"),
    ("map", "Token map"),
    ("clusters", "Cluster gallery"),
    ("sae", "SAE validation"),
    ("control", "Against the nβ = 0 control"),
)
_TITLE = dict(SECTIONS)

CHAIN_COLOURS = ("#3b6fb6", "#2a9d8f", "#8e6bbf", "#e09f3e", "#5c8001", "#c05780", "#457b9d", "#9c6644")
DIVERGED_COLOUR = "#c62828"
POS_COLOUR, NEG_COLOUR = "#3b6fb6", "#d0643a"


# --------------------------------------------------------------------------- #
# entry point
# --------------------------------------------------------------------------- #


_FROM_RUN = object()      # write_report's default for `control`: the run's own config.json says


def write_report(run_dir: Path, *, max_contexts: int = 8, page_size: int = 25, map_method: Optional[str] = None,
                 control: Any = _FROM_RUN) -> Path:
    """Write `<run_dir>/report.html` from whatever the run directory holds; returns its path.

    `map_method` ("umap" | "pca") and `control` (a control run's directory, or None for no comparison) default
    to the run's config.json (`report.map`, `report.control`). Raises ConfigError for a run or control directory
    that does not exist, or bad settings."""
    from spectro.errors import ConfigError

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist; pass the run's directory")
    for name, v in (("max_contexts", max_contexts), ("page_size", page_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    run = _Run.load(run_dir)
    stored = (run.config or {}).get("report") if isinstance(run.config, dict) else None
    stored = stored if isinstance(stored, dict) else {}
    if map_method is None:
        map_method = stored.get("map") or "umap"
    if map_method not in MAP_METHODS:
        raise ConfigError(f"report.map must be one of {', '.join(MAP_METHODS)}, got {map_method!r}")
    if control is _FROM_RUN:
        control = stored.get("control")
    if control is not None:
        if not str(control).strip():
            raise ConfigError("report.control must be a control run's directory or null, got an empty string")
        control = Path(control)
        if not control.is_dir():
            raise ConfigError(f"report.control: control run directory {control} does not exist; run the control "
                              "first (experiment=control hydra.run.dir=...) or drop report.control")
    page = _render(run, max_contexts=max_contexts, page_size=page_size, map_method=map_method, control=control)
    out = run_dir / "report.html"
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    log.info("report written to %s (%.1f kB)", out, out.stat().st_size / 1024)
    return out


# --------------------------------------------------------------------------- #
# loading
# --------------------------------------------------------------------------- #


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


class _Run:
    """Everything the report needs, each part optional."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.notes: list[str] = []           # missing/odd inputs, shown at the top
        self.config = self.provenance = self.summary = self.clusters = self.modes = None
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
    def load(cls, run_dir: Path) -> "_Run":
        r = cls(run_dir)
        r.config = _read_json(run_dir / "config.json", r.notes)
        r.provenance = _read_json(run_dir / "provenance.json", r.notes)
        r.summary = _read_json(run_dir / "summary.json", r.notes)
        r.clusters = _read_json(run_dir / "clusters.json", r.notes)
        r.modes = _read_json(run_dir / "modes.json", r.notes)
        r.sae, r.sae_error = _read_sae(run_dir)
        if (run_dir / "samples.zarr").exists():
            from spectro.store import SampleStore
            r.samples = SampleStore.open(run_dir / "samples.zarr")
        else:
            r.notes.append("samples.zarr not found")
        if (run_dir / "susceptibilities.zarr").exists():
            import xarray as xr
            r.sus = xr.open_zarr(str(run_dir / "susceptibilities.zarr"), consolidated=False)
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


# --------------------------------------------------------------------------- #
# small helpers
# --------------------------------------------------------------------------- #

_e = html.escape


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    try:
        v = float(x)
    except (TypeError, ValueError):
        return _e(str(x))
    if not math.isfinite(v):
        return "–" if math.isnan(v) else ("∞" if v > 0 else "−∞")
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 10 ** -digits):
        return f"{v:.{digits}g}"
    return f"{v:.{digits}f}"


def _vis(s: str) -> str:
    """HTML for a token text with whitespace made visible."""
    if s == "":
        return '<span class="ws">∅</span>'
    out = []
    for ch in s:
        if ch == " ":
            out.append('<span class="ws">·</span>')
        elif ch == "\n":
            out.append('<span class="ws">⏎</span>')
        elif ch == "\t":
            out.append('<span class="ws">⇥</span>')
        elif ch == "\r":
            out.append('<span class="ws">␍</span>')
        else:
            out.append(_e(ch))
    return "".join(out)


def _clean(x: Any) -> Any:
    """JSON-safe: numpy scalars/arrays to Python, non-finite floats to None."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer, int)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if math.isfinite(v) else None
    if x is None or isinstance(x, str):
        return x
    return str(x)


def _script_json(obj: Any) -> str:
    """JSON for a <script type="application/json"> body: cannot close the element."""
    s = json.dumps(_clean(obj), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return (s.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _pretty_json(obj: Any) -> str:
    return _e(json.dumps(_clean(obj), indent=2, ensure_ascii=False))


def _notice(text: str) -> str:
    return f'<div class="notice">{_e(text)}</div>'


def _bar_svg(values: Sequence[float], labels: Sequence[str], *, width: int = 520, height: int = 84,
             unit: str = "") -> str:
    """Signed bar chart (positive up, negative down) with rotated labels; per-chart scale."""
    v = np.array([np.nan if x is None else float(x) for x in values], dtype=np.float64)
    n = len(v)
    if n == 0:
        return ""
    m = float(np.nanmax(np.abs(v))) if np.isfinite(v).any() else 0.0
    m = m if m > 0 else 1.0
    longest = max((len(s) for s in labels), default=1)
    fs = 10 if n <= 16 else 9
    rot = -90 if n > 24 else -60
    lab_h = int(min(70, 8 + 0.62 * fs * longest))
    pad_l, pad_r, top = 40, 6, 6
    W, H = width, height + lab_h
    plot_w = W - pad_l - pad_r
    step = min(plot_w / n, 34.0)            # few components: narrow bars on the left
    bw = max(1.0, step * 0.72)
    mid = top + height / 2
    half = height / 2 - 2
    parts = [f'<svg class="bars" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img">',
             f'<line class="axis" x1="{pad_l}" x2="{pad_l + step * n:.1f}" y1="{mid:.1f}" y2="{mid:.1f}"/>',
             f'<text class="tick" x="{pad_l - 4}" y="{top + 8}" text-anchor="end">+{_fmt(m, 2)}</text>',
             f'<text class="tick" x="{pad_l - 4}" y="{top + height}" text-anchor="end">−{_fmt(m, 2)}</text>']
    for i, (x, name) in enumerate(zip(v, labels)):
        cx = pad_l + step * (i + 0.5)
        if np.isfinite(x):
            h = abs(x) / m * half
            y = mid - h if x >= 0 else mid
            colour = POS_COLOUR if x >= 0 else NEG_COLOUR
            parts.append(f'<rect x="{cx - bw / 2:.1f}" y="{y:.1f}" width="{bw:.1f}" height="{max(h, 0.5):.1f}" '
                         f'fill="{colour}"><title>{_e(name)}: {_fmt(x)}{_e(unit)}</title></rect>')
        ly = top + height + 6
        parts.append(f'<text class="lab" font-size="{fs}" transform="translate({cx + 3:.1f},{ly}) rotate({rot})" '
                     f'text-anchor="end">{_e(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


# --------------------------------------------------------------------------- #
# sections
# --------------------------------------------------------------------------- #


def _section(key: str, body: str, lead: str = "") -> str:
    lead_html = f'<p class="lead">{lead}</p>' if lead else ""
    return f'<section id="{key}"><h2>{_e(_TITLE[key])}</h2>{lead_html}{body}</section>'


def _kv_table(rows: Sequence[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


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


def _target(rel: Optional[dict]) -> float:
    from spectro.reliability import MIN_RELIABILITY

    t = (rel or {}).get("target")
    return float(t) if isinstance(t, (int, float)) and math.isfinite(t) else MIN_RELIABILITY


def _num(x: Any) -> float:
    """x as a float; NaN for None or anything that is not a number."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def _f2(x: Any) -> str:
    v = _num(x)
    return f"{v:.2f}" if math.isfinite(v) else "–"


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


def _rel_cell(v: float, target: float) -> str:
    if not math.isfinite(v):
        return '<td class="num">–</td>'
    if v < target:
        return f'<td class="num bad" title="below the target {_fmt(target, 2)}">{_f2(v)}</td>'
    return f'<td class="num">{_f2(v)}</td>'


def _verdict_box(run: _Run) -> str:
    """The box under the title: how far to trust the run (module notes)."""
    v, rel, stab = _trust(run)
    if v is None and rel is None and stab is None:
        return ('<div class="verdict none" id="verdict"><div class="verdict-head"><span class="mark">?</span>'
                '<b class="verdict-text">no verdict</b></div><p class="how">The run has no reliability figures yet: '
                'the susceptibilities stage measures reliability and the clusters stage the stability of the '
                'clusters and the verdict (stage=all runs both).</p></div>')
    ok = bool(v.get("ok")) if v else False
    state = "ok" if ok else ("bad" if v is not None and rel is not None else "unknown")
    mark = {"ok": "✓", "bad": "✗", "unknown": "!"}[state]
    text = str(v.get("text")) if v else "no verdict (run the clusters stage)"
    reasons = [str(r) for r in (v or {}).get("reasons") or []]
    target = _target(rel)
    figs = []
    if rel is not None:
        least = rel.get("least_reliable")
        figs.append(("features", "feature reliability", f"median {_f2(rel.get('features_median'))}",
                     f"min {_f2(rel.get('features_min'))}" + (f" ({_e(str(least))})" if least else "")
                     + f"; target {_f2(target)}; features {_e(str(rel.get('features', '–')))}"))
        figs.append(("raw", "raw χ reliability", f"median {_f2(rel.get('raw_median'))}", "over the same components"))
    if stab is not None:
        halves = stab.get("n_clusters_halves")
        sub = (f"on the {_e(str(stab.get('tokens_in_both', '–')))} tokens both halves cluster; "
               f"{_f2(stab.get('ari_all_tokens'))} on all tokens")
        if isinstance(halves, list):
            sub += f"; {' and '.join(map(str, halves))} clusters in the halves"
        figs.append(("stability", "cluster stability", f"ARI {_f2(stab.get('ari'))}", sub))
    elif rel is not None:
        figs.append(("stability", "cluster stability", "–",
                     "not measured (no halves, or the clusters stage has not run)"))
    factor = _num((rel or {}).get("draws_factor_for_target"))
    if rel is not None and math.isfinite(factor) and factor > 1:
        figs.append(("draws", "draws for the target", f"≈ {factor:.1f}×", f"this run's draws, for {_f2(target)}"))
    elif rel is not None and math.isinf(factor):
        figs.append(("draws", "draws for the target", "far more", "reliability ≤ 0: no extrapolation"))
    fig_html = "".join(f'<div class="fig" data-fig="{slug}"><span class="k">{_e(k)}</span><span class="v">{val}</span>'
                       f'<span class="s">{sub}</span></div>' for slug, k, val, sub in figs)
    rs = "".join(f"<li>{_e(r)}</li>" for r in reasons)
    todo = (f"about {factor:.1f}× the draws should bring the feature reliability to {_f2(target)}"
            if math.isfinite(factor) and factor > 1 else "more draws raise both figures")
    how = ("<b>How to read this.</b> Reliability is the predicted correlation, over tokens, between this run's values "
           "and those of an independent run with another seed (two halves of the chains, each with its own half of "
           "the full run, correlated and Spearman-Brown corrected); the features are what the clustering uses, and "
           "need far more draws than raw χ, whose shared overall level is easy to estimate. The cluster stability "
           "is the adjusted Rand index (ARI) between the clusterings of those two halves: 1 is the same partition, "
           "0 chance agreement. If the verdict fails, run longer chains (or more of them): " + todo + ".")
    return (f'<div class="verdict {state}" id="verdict" data-ok="{str(ok).lower()}"><div class="verdict-head">'
            f'<span class="mark">{mark}</span><b class="verdict-text">{_e(text)}</b></div>'
            + (f'<ul class="reasons">{rs}</ul>' if rs else "")
            + (f'<div class="figs">{fig_html}</div>' if fig_html else "")
            + f'<p class="how">{how}</p></div>')


def _run_section(run: _Run) -> str:
    p = run.provenance or {}
    model = p.get("model") or {}
    data = p.get("data") or {}
    blocks = []
    if model:
        rows = [("source", _e(str(model.get("source")))), ("id", _e(str(model.get("id")))),
                ("revision", _e(str(model.get("revision") or "–"))),
                ("architecture", _e(str(model.get("architecture", "–")))),
                ("parameters",
                 _e(f"{model['n_parameters']:,}") if isinstance(model.get("n_parameters"), int) else "–")]
        if model.get("path"):
            rows.append(("path", f"<code>{_e(str(model['path']))}</code>"))
        blocks.append(f'<div class="panel"><h3>Model</h3>{_kv_table(rows)}</div>')
        files = model.get("files") or {}
        if files:
            frows = [(name, f'<code class="hash">{_e(str(h))}</code>') for name, h in sorted(files.items())]
            blocks.append(f'<div class="panel"><h3>Model files (sha256)</h3>{_kv_table(frows)}</div>')
    if data:
        rows = [("corpus", _e(str(data.get("description", "–")))),
                ("content hash", f'<code class="hash">{_e(str(data.get("content_hash", "–")))}</code>'),
                ("documents", _e(str(data.get("n_documents", "–")))),
                ("sources", _e(", ".join(map(str, data.get("sources") or []))))]
        if "n_probe_tokens" in p:
            rows.append(("probe tokens", _e(f"{p['n_probe_tokens']:,}")))
        if "init_loss" in p:
            rows.append(("loss at w*", _fmt(p["init_loss"], 4)))
        blocks.append(f'<div class="panel"><h3>Data</h3>{_kv_table(rows)}</div>')
    versions = [(k, _e(str(p[k]))) for k in ("spectro", "python", "torch", "transformers", "ray", "zarr") if k in p]
    if versions:
        blocks.append(f'<div class="panel"><h3>Versions</h3>{_kv_table(versions)}</div>')
    body = f'<div class="panels">{"".join(blocks)}</div>' if blocks else _notice("provenance.json not found")
    if run.config is not None:
        s = run.config.get("sampler", {}) if isinstance(run.config, dict) else {}
        brief = ", ".join(f"{k} {f'{s[k]:.4g}' if isinstance(s[k], float) else _e(str(s[k]))}"
                          for k in ("step_size", "nbeta", "gamma", "num_chains", "num_draws", "burnin")
                          if k in s)
        body += (f'<details><summary>Resolved config <span class="muted">({brief})</span></summary>'
                 f'<pre class="json">{_pretty_json(run.config)}</pre></details>')
    else:
        body += _notice("config.json not found")
    if run.provenance is not None:
        body += (f'<details><summary>Full provenance</summary>'
                 f'<pre class="json">{_pretty_json(run.provenance)}</pre></details>')
    if run.summary is not None:
        body += (f'<details><summary>Run summary (summary.json)</summary>'
                 f'<pre class="json">{_pretty_json(run.summary)}</pre></details>')
    return _section("run", body)


def _diagnostics_section(run: _Run) -> str:
    s = run.sus
    if s is None:
        return _section("diagnostics", _notice("susceptibilities.zarr not found: no diagnostics; run the "
                                               "susceptibilities stage."))
    comps = [str(c) for c in s["component"].values.tolist()]

    def col(name, dtype=float):
        return s[name].values if name in s else np.full(len(comps), np.nan if dtype is float else -1)

    llc_m, llc_s, rhat, ess = col("llc_mean"), col("llc_std"), col("rhat"), col("ess_bulk")
    used, ndiv = col("n_chains_used", int), col("n_diverged", int)
    not_mixed = s["not_mixed"].values if "not_mixed" in s else np.zeros(len(comps), bool)
    _, rel, _ = _trust(run)
    rel_raw, rel_feat = _per_component_reliability(run, comps, rel)
    target = _target(rel)
    n_chains = run.samples.layout.n_chains if run.samples is not None else None
    thr = s.attrs.get("rhat_threshold")
    rows = []
    for i, c in enumerate(comps):
        flag = bool(not_mixed[i])
        status = '<span class="flag-text">not mixed</span>' if flag else '<span class="ok-text">ok</span>'
        if int(used[i]) == 0:
            status = '<span class="flag-text">no chains</span>'
        chains = f"{int(used[i])}" + (f" / {n_chains}" if n_chains is not None else "")
        rows.append(
            f'<tr class="{"flagged" if flag else ""}" data-component="{_e(c)}"><td><code>{_e(c)}</code></td>'
            f'<td class="num">{_fmt(llc_m[i])} <span class="muted">± {_fmt(llc_s[i])}</span></td>'
            f'<td class="num">{_fmt(rhat[i])}</td><td class="num">{_fmt(ess[i], 1)}</td>'
            f'<td class="num{" bad" if int(ndiv[i]) > 0 else ""}">{int(ndiv[i])}</td>'
            f'<td class="num">{chains}</td>{_rel_cell(rel_raw[i], target)}{_rel_cell(rel_feat[i], target)}'
            f'<td>{status}</td></tr>')
    table = ('<table class="diag"><thead><tr><th>component</th><th>LLC mean ± std</th><th>R-hat</th>'
             '<th>bulk ESS</th><th>divergences</th><th>chains used</th>'
             '<th title="split-half reliability of raw chi: predicted correlation with an independent run">'
             'reliability χ</th><th title="split-half reliability of the clustering features">'
             'reliability features</th><th>status</th></tr></thead>'
             f'<tbody>{"".join(rows)}</tbody></table>')
    n_flag = int(np.sum(not_mixed))
    bits = [f"{len(comps)} components", f"estimator form <code>{_e(str(s.attrs.get('form', '–')))}</code>",
            f"nβ = {_fmt(s.attrs.get('nbeta'), 3)}"]
    if thr is not None:
        bits.append(f"flagged “not mixed” where R-hat &gt; {_fmt(thr, 2)}")
    lead = "; ".join(bits) + "."
    if np.isfinite(rel_raw).any() or np.isfinite(rel_feat).any():
        lead += (" Reliability: the predicted correlation over tokens between this run's values and an independent "
                 f"run's (split halves of the chains, Spearman-Brown), of raw χ and of the clustering features; "
                 f"below {_fmt(target, 2)} in red.")
    extra = ""
    if n_flag:
        extra += _notice(f"{n_flag} of {len(comps)} components have chains that have not mixed; their "
                         "susceptibilities are less reliable (longer chains, more burn-in or a smaller step help).")
    excluded = s.attrs.get("excluded_chains") or []
    if excluded:
        extra += _notice(f"{len(excluded)} diverged chain(s) excluded from the estimates: "
                         + ", ".join(map(str, excluded)))
    if s.attrs.get("partial"):
        extra += _notice("partial estimate: computed from an incomplete sample store.")
    sample = (run.summary or {}).get("sample") if isinstance(run.summary, dict) else None
    if isinstance(sample, dict) and "seconds" in sample:
        lead += (f" Sampling took {_fmt(sample.get('seconds'), 1)} s "
                 f"({_fmt(sample.get('draws_per_second'), 2)} draws/s).")
    return _section("diagnostics", extra + table, lead)


def _sparkline(phi: np.ndarray, diverged: np.ndarray, *, width: int = 300, height: int = 90) -> str:
    """phi (chain, draw): one polyline per chain on a shared y-range."""
    n_chain, n_draw = phi.shape
    stride = max(1, int(math.ceil(n_draw / TRACE_MAX_POINTS)))
    finite = phi[np.isfinite(phi)]
    if finite.size == 0:
        return '<div class="muted small">no finite draws yet</div>'
    lo, hi = float(np.min(finite)), float(np.max(finite))
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    pad_l, pad_b, top = 46, 14, 6
    pw, ph = width - pad_l - 4, height - pad_b - top

    def xy(d, v):
        x = pad_l + (d / max(n_draw - 1, 1)) * pw
        y = top + (1 - (v - lo) / (hi - lo)) * ph
        return x, y

    parts = [f'<svg class="spark" viewBox="0 0 {width} {height}" width="{width}" height="{height}">',
             f'<rect x="{pad_l}" y="{top}" width="{pw}" height="{ph}" class="plotbg"/>',
             f'<text class="tick" x="{pad_l - 3}" y="{top + 8}" text-anchor="end">{_fmt(hi, 3)}</text>',
             f'<text class="tick" x="{pad_l - 3}" y="{top + ph}" text-anchor="end">{_fmt(lo, 3)}</text>',
             f'<text class="tick" x="{pad_l}" y="{height - 2}">0</text>',
             f'<text class="tick" x="{width - 4}" y="{height - 2}" text-anchor="end">draw {n_draw - 1}</text>']
    if lo < 0 < hi:
        _, y0 = xy(0, 0.0)
        parts.append(f'<line class="zero" x1="{pad_l}" x2="{pad_l + pw}" y1="{y0:.1f}" y2="{y0:.1f}"/>')
    order = [k for k in range(n_chain) if diverged[k] < 0] + [k for k in range(n_chain) if diverged[k] >= 0]
    for k in order:
        div = int(diverged[k])
        colour = DIVERGED_COLOUR if div >= 0 else CHAIN_COLOURS[k % len(CHAIN_COLOURS)]
        idx = np.arange(0, n_draw, stride)
        if n_draw - 1 not in idx:
            idx = np.append(idx, n_draw - 1)
        pts, segs = [], []
        for d in idx:
            v = phi[k, d]
            if np.isfinite(v):
                pts.append("%.1f,%.1f" % xy(d, v))
            elif pts:
                segs.append(pts)
                pts = []
        if pts:
            segs.append(pts)
        cls = "line diverged" if div >= 0 else "line"
        title = f"chain {k}" + (f" (diverged at draw {div})" if div >= 0 else "")
        for seg in segs:
            if len(seg) == 1:
                x, y = seg[0].split(",")
                parts.append(f'<circle cx="{x}" cy="{y}" r="1.5" fill="{colour}"><title>{title}</title></circle>')
            else:
                parts.append(f'<polyline class="{cls}" stroke="{colour}" points="{" ".join(seg)}">'
                             f'<title>{title}</title></polyline>')
        if div >= 0:
            fin = np.nonzero(np.isfinite(phi[k, : div + 1]))[0]
            if fin.size:
                x, y = xy(int(fin[-1]), float(phi[k, fin[-1]]))
                parts.append(f'<text class="xmark" x="{x:.1f}" y="{y + 4:.1f}" text-anchor="middle" '
                             f'fill="{DIVERGED_COLOUR}">✕<title>{title}</title></text>')
    parts.append("</svg>")
    return "".join(parts)


def _traces_section(run: _Run) -> str:
    if run.samples is None:
        return _section("traces", _notice("samples.zarr not found: no traces."))
    st = run.samples
    comps = list(st.layout.components)
    loss = np.asarray(st.read("sampling_loss"), dtype=np.float64)    # (component, chain, draw)
    phi = loss - float(st.init_loss)
    diverged = np.asarray(st.diverged_at())
    cards = []
    for ci, c in enumerate(comps):
        n_div = int((diverged[ci] >= 0).sum())
        fin = phi[ci][np.isfinite(phi[ci])]
        mean = _fmt(float(fin.mean()), 4) if fin.size else "–"
        note = f' <span class="flag-text">{n_div} diverged</span>' if n_div else ""
        legend = " ".join(
            f'<span class="chip-chain" style="--c:'
            f'{DIVERGED_COLOUR if diverged[ci, k] >= 0 else CHAIN_COLOURS[k % len(CHAIN_COLOURS)]}">'
            f'{k}{" ✕" if diverged[ci, k] >= 0 else ""}</span>'
            for k in range(phi.shape[1]))
        cards.append(f'<div class="trace"><div class="trace-h"><code>{_e(c)}</code>'
                     f'<span class="muted small">mean φ {mean}</span>{note}</div>'
                     f'{_sparkline(phi[ci], diverged[ci])}<div class="small muted">chains {legend}</div></div>')
    lead = (f"φ = sampling_loss − init_loss (init_loss = {_fmt(st.init_loss, 4)}) at every draw, one line per "
            "chain; diverged chains in red, ✕ at their last finite draw.")
    return _section("traces", f'<div class="traces">{"".join(cards)}</div>', lead)


def _spectrum_svg(share: Sequence[float], cum: Sequence[float], *, width: int = 760, height: int = 200) -> str:
    share = [0.0 if x is None else float(x) for x in share][:MAX_SPECTRUM_BARS]
    cum = [0.0 if x is None else float(x) for x in cum][: len(share)]
    n = len(share)
    if n == 0:
        return ""
    pad_l, pad_r, top, pad_b = 44, 44, 10, 26
    pw, ph = width - pad_l - pad_r, height - top - pad_b
    m = max(max(share), 1e-12)
    step = min(pw / n, 40.0)
    bw = step * 0.7
    parts = [f'<svg class="spectrum" viewBox="0 0 {width} {height}" width="{width}" height="{height}">',
             f'<line class="axis" x1="{pad_l}" x2="{pad_l + step * n:.1f}" y1="{top + ph}" y2="{top + ph}"/>',
             f'<text class="tick" x="{pad_l - 4}" y="{top + 8}" text-anchor="end">{100 * m:.1f}%</text>',
             f'<text class="tick" x="{pad_l - 4}" y="{top + ph}" text-anchor="end">0</text>',
             f'<text class="tick cum" x="{pad_l + step * n + 4:.1f}" y="{top + 8}">100%</text>',
             f'<text class="tick cum" x="{pad_l + step * n + 4:.1f}" y="{top + ph}">0%</text>',
             f'<text class="tick" x="{pad_l + step * n / 2:.1f}" y="{height - 2}" text-anchor="middle">mode</text>']
    for i, x in enumerate(share):
        h = x / m * ph
        parts.append(f'<rect x="{pad_l + i * step + (step - bw) / 2:.1f}" y="{top + ph - h:.1f}" width="{bw:.1f}" '
                     f'height="{max(h, 0.5):.1f}" fill="{POS_COLOUR}"><title>mode {i}: {100 * x:.2f}% of variance'
                     f'{f", cumulative {100 * cum[i]:.1f}%" if i < len(cum) else ""}</title></rect>')
        if n <= 24 or i % 5 == 0:
            parts.append(f'<text class="tick" x="{pad_l + (i + 0.5) * step:.1f}" y="{top + ph + 11}" '
                         f'text-anchor="middle">{i}</text>')
    if cum:
        pts = " ".join(f"{pad_l + (i + 0.5) * step:.1f},{top + ph - c * ph:.1f}" for i, c in enumerate(cum))
        parts.append(f'<polyline class="cumline" points="{pts}"/>')
        parts.extend(f'<circle class="cumdot" cx="{pad_l + (i + 0.5) * step:.1f}" cy="{top + ph - c * ph:.1f}" r="2">'
                     f'<title>cumulative {100 * c:.1f}% after mode {i}</title></circle>' for i, c in enumerate(cum))
    parts.append("</svg>")
    return "".join(parts)


def _token_chip(run: _Run, entry: Any) -> str:
    if not isinstance(entry, dict):             # tolerate [text, score] pairs
        entry = {"text": entry[0], "score": entry[1]} if isinstance(entry, (list, tuple)) and len(entry) >= 2 \
            else {"text": str(entry)}
    text = entry.get("text")
    idx = entry.get("token", entry.get("index"))
    if text is None and isinstance(idx, int) and 0 <= idx < run.n_tokens:
        text = run.text[idx]
    title = ""
    if isinstance(idx, int) and 0 <= idx < run.n_tokens and run.context is not None:
        left, tok, right = _Contexts.of(run).snippet(idx)
        title = f' title="{_e(left + "[" + tok + "]" + right)}"'
    score = f'<span class="cnt">{_fmt(entry.get("score"), 2)}</span>' if "score" in entry else ""
    return f'<span class="chip"{title}><span class="tok">{_vis(str(text))}</span>{score}</span>'


def _modes_section(run: _Run) -> str:
    m = run.modes
    if not isinstance(m, dict):
        return _section("modes", _notice("modes.json not found: no mode spectrum; run the clusters stage."))
    share = m.get("variance_share") or []
    cum = m.get("cumulative_share") or list(np.cumsum([x or 0.0 for x in share]))
    modes = m.get("modes") or []
    lead = ""
    if share:
        k = min(len(modes) or 5, len(cum))
        lead = (f"Singular-value spectrum of the standardized susceptibility matrix: {len(share)} modes; "
                f"the top {k} explain {100 * float(cum[k - 1] or 0):.1f}% of the variance. "
                "Bars: share of variance per mode; line: cumulative share (right axis).")
        if len(share) > MAX_SPECTRUM_BARS:
            lead += f" The first {MAX_SPECTRUM_BARS} modes are drawn."
    cards = []
    comp_names = m.get("components") or (run.clusters or {}).get("components") or []
    for i, mode in enumerate(modes[:MAX_MODES_SHOWN]):
        loadings = mode.get("loadings") or {}
        if isinstance(loadings, dict):
            names, vals = list(loadings.keys()), list(loadings.values())
        else:                                   # a plain list aligned with the components
            vals = list(loadings)
            names = [str(x) for x in comp_names] if len(comp_names) == len(vals) else [str(j) for j in range(len(vals))]
        idx, mshare = mode.get("index", i), mode.get("share")
        if mshare is None and isinstance(idx, int) and 0 <= idx < len(share):
            mshare = share[idx]
        pos = "".join(_token_chip(run, t) for t in (mode.get("top_positive") or [])[:10])
        neg = "".join(_token_chip(run, t) for t in (mode.get("top_negative") or [])[:10])
        share_txt = f'{100 * float(mshare):.1f}% of variance' if mshare is not None else ""
        cards.append(f'<div class="mode"><h3>Mode {_e(str(idx))} '
                     f'<span class="muted small">{share_txt}</span></h3>'
                     '<div class="small muted">component loadings</div>'
                     f'{_bar_svg(vals, names, width=560 if len(names) > 12 else 440, height=70)}'
                     f'<div class="toks"><div><span class="small muted">top + </span>{pos or "–"}</div>'
                     f'<div><span class="small muted">top − </span>{neg or "–"}</div></div></div>')
    more = (f'<p class="muted small">{len(modes) - MAX_MODES_SHOWN} further modes in modes.json are not shown.</p>'
            if len(modes) > MAX_MODES_SHOWN else "")
    body = _spectrum_svg(share, cum) + (f'<div class="modes">{"".join(cards)}</div>' if cards else "") + more
    return _section("modes", body, lead)


FEATURE_TEXT = {"centred": "χ per component z-scored, each token's mean over components removed, rows scaled to "
                           "unit length",
                "zscore": "χ per component z-scored, rows scaled to unit length"}


def _map_section(run: _Run, info: dict, kind: str) -> str:
    body = ('<div class="map-wrap"><div class="map-bar"><span id="map-legend"></span>'
            '<button type="button" id="map-clear" hidden>clear highlight</button></div>'
            '<canvas id="map-canvas" width="1200" height="560"></canvas><div id="map-tip" hidden></div></div>')
    if not info:
        return _section("map", _notice("no map: susceptibilities.zarr not found."))
    feats = f"the clustering features ({_e(FEATURE_TEXT.get(kind, kind))})"
    if info["method"] == "umap":
        u = info["umap"]
        lead = (f"UMAP (n_neighbors {u['n_neighbors']}, min_dist {u['min_dist']}, seed {u['seed']}; "
                f"{_fmt(u['seconds'], 1)} s) of {feats}, coloured by cluster; noise in grey. UMAP keeps "
                "neighbourhoods: nearby tokens have similar features, but the distance between far-apart groups and "
                "the size of a group mean little.")
    else:
        lead = (f"First two principal components ({100 * info['pc_share'][0]:.1f}% and "
                f"{100 * info['pc_share'][1]:.1f}% of variance) of {feats}, coloured by cluster; noise in grey.")
    lead += " Hover a point for its token; click it to open its cluster."
    if info.get("fallback"):
        lead += f" <b>Not UMAP:</b> {_e(info['fallback'])}."
    if info["subsampled"]:
        lead += (f" <b>Subsampled:</b> {info['shown']:,} of {info['n']:,} tokens are drawn (seeded; every cluster "
                 f"keeps at least {MAP_MIN_PER_CLUSTER} members)"
                 + ("; UMAP ran on these tokens only." if info["method"] == "umap" else "."))
    if not info["has_labels"]:
        lead += " No cluster labels (clusters.json missing or inconsistent): all points grey."
    return _section("map", body, lead)


def _gallery_section(run: _Run, gallery: Optional[dict]) -> str:
    if gallery is None:
        return _section("clusters", _notice("clusters.json not found: no clusters to show; run the clusters stage."))
    c = run.clusters
    n_clusters = len(gallery["clusters"])
    n_noise = c.get("n_noise")
    n_tok = c.get("n_tokens")
    n_tok = int(n_tok) if isinstance(n_tok, (int, float)) else run.n_tokens
    method = c.get("method", "?")
    params = c.get("params") or {}
    ptxt = ", ".join(f"{_e(str(k))}={_e(json.dumps(_clean(v)))}" for k, v in params.items())
    lead = (f"<b>{n_clusters} clusters</b> over {n_tok:,} tokens ({_e(str(n_noise))} noise) by "
            f"<code>{_e(str(method))}</code>{f' ({ptxt})' if ptxt else ''}. Largest first. Each card: size, "
            f"conductance (lower is a cleaner cut), profile ({_e(gallery.get('plabel') or '')}), top tokens, "
            "source mix and typical contexts (closest to the cluster's mean feature row) with the token "
            "highlighted.")
    if any(len(g["texts"]) >= SEARCH_TEXTS_PER_CLUSTER for g in gallery["clusters"]):
        lead += (f" Search looks at the {SEARCH_TEXTS_PER_CLUSTER} most frequent distinct token texts of each "
                 "cluster.")
    controls = ('<div class="controls">'
                '<input type="search" id="q" '
                'placeholder="Search token text, e.g. def  or  ⏎  or  #12 for a cluster id" '
                'autocomplete="off" spellcheck="false">'
                '<label>min size <input type="number" id="minsize" min="0" value="0"></label>'
                '<label>sort <select id="sort"><option value="size">size (largest first)</option>'
                '<option value="cond">conductance (lowest first)</option><option value="id">id</option>'
                '</select></label>'
                '<span id="count" class="muted"></span></div>'
                '<div class="pager" id="pager-top"></div><div id="cards" class="cards"></div>'
                '<div class="pager" id="pager-bot"></div>'
                '<noscript><div class="notice">The gallery needs JavaScript.</div></noscript>')
    return _section("clusters", controls, lead)


SAE_DETAILS_MAX = 60       # clusters whose contexts are shown beside their best feature's


def _sae_examples(run: _Run, items: Sequence[Any], with_value: bool) -> str:
    """<ol class="examples"> of probe tokens (indices, or [index, activation] pairs) in their contexts."""
    if not run.n_tokens or run.context is None:
        return '<div class="muted small">no contexts available</div>'
    ctx = _Contexts.of(run)
    rows = []
    for it in items:
        i, v = (int(it[0]), it[1]) if isinstance(it, (list, tuple)) else (int(it), None)
        if not 0 <= i < run.n_tokens:
            continue
        left, tok, right = ctx.snippet(i)
        where = f"{_fmt(v, 2)} · " if with_value and v is not None else ""
        rows.append(f'<li><span class="l"><span>{_vis(left)}</span></span><mark>{_vis(tok)}</mark>'
                    f'<span class="r">{_vis(right)}</span><span class="where">{where}{int(run.context[i])}:'
                    f'{int(run.position[i])}</span></li>')
    return f'<ol class="examples">{"".join(rows)}</ol>' if rows else '<div class="muted small">none</div>'


def _sae_section(run: _Run) -> str:
    """Matched fraction vs its null, per-cluster best feature beside the cluster's contexts (sae.json)."""
    if run.sae_error:
        return _section("sae", _notice(run.sae_error + "."))
    s = run.sae
    if not isinstance(s, dict):
        return _section("sae", _notice("sae.json not found: no SAE validation; run the sae stage (stage=sae)."))
    q, null, cl = s.get("quality") or {}, s.get("null") or {}, s.get("clusters") or []
    pos = "the position that predicts it" if s.get("position") == "predicting" else "its own position"
    lead = (f"A {_e(str(s.get('architecture')))} sparse autoencoder ({_e(str(s.get('d_sae')))} features"
            f"{', k=' + _e(str(s.get('k'))) if s.get('k') else ''}; {_e(str(s.get('source')))}) on "
            f"<code>{_e(str(s.get('hook_name')))}</code>. A probe token reads the activation at {pos}. For each "
            f"cluster, the feature whose set of active probe tokens has the best F1 against the cluster's members; "
            f"a cluster matches when F1 ≥ {_fmt(s.get('threshold'), 2)}. The null permutes the cluster labels over "
            f"all probe tokens ({_e(str(null.get('n', 0)))} times): random clusters of the same sizes.")
    head = _kv_table([
        ("matched clusters", f"<b>{_e(str(s.get('n_matched')))} of {_e(str(s.get('n_clusters')))} = "
                             f"{_fmt(s.get('matched_fraction'))}</b>"),
        ("null: matched fraction", f"mean {_fmt(null.get('matched_fraction_mean'))}, 95% quantile "
                                   f"{_fmt(null.get('matched_fraction_q95'))}, p = {_fmt(null.get('p_value'))}"),
        ("mean best F1", f"{_fmt(s.get('mean_best_f1'))} (null mean {_fmt(null.get('mean_best_f1_mean'))}, 95% "
                         f"quantile {_fmt(null.get('mean_best_f1_q95'))}, "
                         f"p = {_fmt(null.get('p_value_mean_best_f1'))})"),
        ("reconstruction", f"FVE {_fmt(q.get('fve_probe'))} on probe tokens (train {_fmt(q.get('fve_train'))}); "
                           f"L0 {_fmt(s.get('l0_probe'), 1)}; {_e(str(s.get('features_never_active_on_probe')))} "
                           "features never active on probe tokens"),
        ("loss when spliced in", f"{_fmt(q.get('loss_clean'))} → {_fmt(q.get('loss_spliced'))} nats "
                                 f"(+{_fmt(q.get('loss_increase'))}); "
                                 f"mean ablation {_fmt(q.get('loss_mean_ablation'))}; "
                                 f"loss recovered {_fmt(q.get('loss_recovered'))}"),
    ])
    order = sorted(cl, key=lambda c: (-(c.get("f1") or 0.0), c.get("id", 0)))

    def chips(c: dict) -> str:
        return "".join(f'<span class="chip"><span class="tok">{_vis(str(t[0]))}</span><span class="cnt">'
                       f'{_e(str(t[1]))}</span></span>' for t in (c.get("top_tokens") or [])[:5]
                       if isinstance(t, (list, tuple)) and len(t) >= 2) or "–"

    rows = "".join(
        f'<tr class="{"" if c.get("matched") else "flagged"}" data-cluster="{_e(str(c.get("id")))}">'
        f'<td>#{_e(str(c.get("id")))}</td><td>{_e(str(c.get("size")))}</td><td>{chips(c)}</td>'
        f'<td>f{_e(str(c.get("feature")))}</td><td>{_fmt(c.get("f1"))}</td><td>{_fmt(c.get("precision"))}</td>'
        f'<td>{_fmt(c.get("recall"))}</td><td>{_e(str(c.get("feature_active")))}</td>'
        f'<td>{"matched" if c.get("matched") else "–"}</td></tr>' for c in order)
    table = ('<table class="diag sae"><thead><tr><th>cluster</th><th>size</th><th>top tokens</th><th>best feature</th>'
             '<th>F1</th><th>precision</th><th>recall</th><th>feature active on</th><th></th></tr></thead>'
             f'<tbody>{rows}</tbody></table>')
    details = []
    for j, c in enumerate(order[:SAE_DETAILS_MAX]):
        details.append(
            f'<details class="sae-pair"{" open" if j == 0 else ""}><summary>cluster #{_e(str(c.get("id")))} '
            f'({_e(str(c.get("size")))} tokens) '
            f'vs feature f{_e(str(c.get("feature")))}: F1 {_fmt(c.get("f1"))}</summary><div class="panels">'
            f'<div class="panel"><div class="small muted">cluster members</div>'
            f'{_sae_examples(run, c.get("examples") or [], False)}</div>'
            f'<div class="panel"><div class="small muted">top activations of f{_e(str(c.get("feature")))}</div>'
            f'{_sae_examples(run, c.get("feature_top") or [], True)}</div></div></details>')
    more = (f'<p class="muted small">Contexts are shown for the {SAE_DETAILS_MAX} best-matched clusters; '
            'sae.json has all of them.</p>' if len(order) > SAE_DETAILS_MAX else "")
    unexplained = [c for c in order if not c.get("matched")]
    unexp = (f'<h3>Clusters no feature explains ({len(unexplained)})</h3><p class="small">'
             + (", ".join(f'#{_e(str(c.get("id")))} (F1 {_fmt(c.get("f1"), 2)})' for c in unexplained) or "none")
             + "</p>")
    return _section("sae", head + table + unexp + "<h3>Clusters beside their best features</h3>"
                    + "".join(details) + more, lead)


def _probe_mismatch(run: _Run, ctl: _Run) -> Optional[str]:
    """Why the control's probe tokens are not this run's (from each susceptibilities.zarr), or None."""
    if run.sus is None or ctl.sus is None:
        where = "this run" if run.sus is None else "the control"
        return f"{where} has no susceptibilities.zarr, so its probe tokens cannot be checked"

    def col(r: _Run, name: str) -> Optional[np.ndarray]:
        return np.asarray(r.sus[name].values) if name in r.sus.variables else None

    n, m = int(run.sus.sizes.get("token", 0)), int(ctl.sus.sizes.get("token", 0))
    if n != m:
        return f"the control has {m:,} probe tokens, this run {n:,}"
    for name, what in (("token_id", "token ids"), ("token_text", "texts"), ("token_context", "contexts"),
                       ("token_position", "positions")):
        a, b = col(run, name), col(ctl, name)
        if a is None or b is None:
            continue
        if a.dtype.kind not in "iub" or b.dtype.kind not in "iub":      # texts (numpy StringDType included)
            a = np.array([str(t) for t in a.tolist()], dtype=object)
            b = np.array([str(t) for t in b.tolist()], dtype=object)
        diff = int(np.sum(a != b))
        if diff:
            return f"{diff:,} of {n:,} probe tokens have other {what} in the control"
    return None


def _ari(a: np.ndarray, b: np.ndarray) -> dict:
    """Adjusted Rand index of two labellings (-1 = noise) on the tokens both cluster, and on all tokens."""
    from sklearn.metrics import adjusted_rand_score

    both = (a >= 0) & (b >= 0)
    return {"ari": float(adjusted_rand_score(a[both], b[both])) if both.sum() >= 2 else None,
            "ari_all_tokens": float(adjusted_rand_score(a, b)), "tokens_in_both": int(both.sum())}


def _run_figures(r: _Run, labels: Optional[np.ndarray]) -> list[str]:
    """One run's column of the comparison table (HTML cells), in the order of _CONTROL_ROWS."""
    c = r.clusters if isinstance(r.clusters, dict) else {}
    _, rel, stab = _trust(r)
    nbeta = r.sus.attrs.get("nbeta") if r.sus is not None else None
    if nbeta is None and isinstance(r.config, dict):
        nbeta = (r.config.get("sampler") or {}).get("nbeta")
    n_clusters = len(c.get("clusters") or []) if c else None
    share = float((labels >= 0).mean()) if labels is not None and labels.size else None
    ra = c.get("role_agreement") if isinstance(c.get("role_agreement"), dict) else None
    roles = (f"purity {_fmt(ra.get('purity'))} vs {_fmt(ra.get('purity_shuffled'))} shuffled (max "
             f"{_fmt(ra.get('purity_shuffled_max'))}); NMI {_fmt(ra.get('nmi'))} vs {_fmt(ra.get('nmi_shuffled'))}"
             if ra else "–")
    sae, null = r.sae, (r.sae or {}).get("null") or {}
    if sae:
        matched = (f"{_fmt(sae.get('matched_fraction'))} ({_e(str(sae.get('n_matched')))} of "
                   f"{_e(str(sae.get('n_clusters')))}) vs null mean {_fmt(null.get('matched_fraction_mean'))}, "
                   f"95% {_fmt(null.get('matched_fraction_q95'))}; p = {_fmt(null.get('p_value'))}")
        f1 = (f"{_fmt(sae.get('mean_best_f1'))} vs null mean {_fmt(null.get('mean_best_f1_mean'))}, 95% "
              f"{_fmt(null.get('mean_best_f1_q95'))}; p = {_fmt(null.get('p_value_mean_best_f1'))}")
    else:
        matched = f1 = '<span class="muted">no sae.json</span>'
    smp = (r.config or {}).get("sampler") if isinstance(r.config, dict) else None
    smp = smp if isinstance(smp, dict) else {}
    draws = (f"{_e(str(smp.get('num_chains', '–')))} × {_e(str(smp.get('num_draws', '–')))} (seed "
             f"{_e(str(smp.get('seed', '–')))})" if smp else "–")
    return [_fmt(nbeta, 3), draws, _e(str(n_clusters)) if n_clusters is not None else "–",
            f"{100 * share:.1f}%" if share is not None else "–",
            _fmt((stab or {}).get("ari")), _fmt((rel or {}).get("features_median")), roles, matched, f1]


_CONTROL_ROWS = ("nβ", "chains × draws", "clusters", "clustered share (not noise)",
                 "split-half ARI (cluster stability)",
                 "feature reliability (median)", "token roles: purity vs shuffled labels",
                 "SAE: matched fraction vs null", "SAE: mean best F1 vs null")


def _control_section(run: _Run, labels: Optional[np.ndarray], control: Optional[Path]) -> str:
    """This run beside its nβ = 0 control (module notes)."""
    if control is None:
        return _section("control", "", "No control run given. Run the nβ = 0 control "
                        "(<code>experiment=control</code>, another <code>sampler.seed</code>) with the same model and "
                        "data config and pass its directory as <code>report.control</code>: clusters that also appear "
                        "there come from the geometry of the weights and the probe set, not from the loss.")
    if control.resolve() == run.run_dir.resolve():
        return _section("control", _notice("report.control names this run's own directory; pass the control run's "
                                           "directory."))
    ctl = _Run.load(control)
    lead = (f"Control run <code>{_e(str(control))}</code>: the same pipeline with the loss term removed (nβ = 0), so "
            "its chains feel only the localisation around w*. The real run's clusters should agree with the "
            "control's less than two halves of the real run agree with each other. ARI (adjusted Rand index): 1 is "
            "the same partition, 0 chance agreement.")
    why = _probe_mismatch(run, ctl)
    if why:
        return _section("control", _notice(f"Control refused: {why}. Labels of different tokens cannot be compared; "
                                           "run the control with the same model and data config."), lead)
    body = ""
    sampler = (ctl.config or {}).get("sampler") if isinstance(ctl.config, dict) else None
    nb = ctl.sus.attrs.get("nbeta") if ctl.sus is not None else None
    if not (isinstance(sampler, dict) and sampler.get("control")) and _num(nb) != 0:
        body += _notice(f"The run in report.control was sampled with nβ = {_fmt(nb, 3)}, not as the nβ = 0 control "
                        "(experiment=control); it is compared all the same.")
    mine = (run.config or {}).get("sampler") if isinstance(run.config, dict) else None
    if (isinstance(sampler, dict) and isinstance(mine, dict) and "seed" in sampler
            and sampler.get("seed") == mine.get("seed")):
        body += _notice(f"The control was sampled with this run's sampler.seed ({sampler.get('seed')}): the two "
                        "share their SGLD noise and agree more than independent runs would. Rerun the control with "
                        "another sampler.seed for a fair comparison.")
    if ctl.notes:
        body += _notice("Control: " + "; ".join(ctl.notes) + ".")
    ctl_labels = _labels(ctl, ctl.n_tokens) if ctl.clusters is not None else None
    _, _, stab = _trust(run)
    half = _num((stab or {}).get("ari"))
    if labels is not None and ctl_labels is not None:
        a = _ari(labels, ctl_labels)
        x = _num(a["ari"])
        agree = (f'<div class="figs"><div class="fig" data-fig="ari-control"><span class="k">ARI, this run vs control'
                 f'</span><span class="v">{_fmt(a["ari"])}</span><span class="s">on the {a["tokens_in_both"]:,} tokens '
                 f'both cluster; {_fmt(a["ari_all_tokens"])} on all tokens (noise as one more label)</span></div>'
                 f'<div class="fig" data-fig="ari-halves"><span class="k">ARI, this run\'s two halves</span>'
                 f'<span class="v">{_fmt(half)}</span><span class="s">cluster stability (verdict above)</span></div>'
                 '</div>')
        if math.isfinite(x) and math.isfinite(half):
            if x < half:
                msg = ("The control agrees with this run less than this run's halves agree with each other: the "
                       "clusters depend on the loss, not only on the weights' geometry and the probe set.")
                agree += f'<p class="callout ok">{msg}</p>'
            else:
                msg = ("The control agrees with this run at least as well as this run's own halves do: these "
                       "clusters may come from the geometry of the weights and the probe set rather than from the "
                       "loss. (Each half has half the draws, which lowers its ARI; with reliable runs both figures "
                       "are higher and this comparison is sharper.)")
                agree += f'<p class="callout bad">{msg}</p>'
        elif not math.isfinite(x):
            agree += '<p class="muted small">No token is in a cluster in both runs: no ARI on clustered tokens.</p>'
        else:
            agree += '<p class="muted small">This run has no split-half ARI to set the control\'s beside.</p>'
        body += agree
    else:
        which = "this run" if labels is None else "the control"
        body += _notice(f"No ARI: {which} has no usable cluster labels (clusters.json); run its clusters stage.")
    cols = [_run_figures(run, labels), _run_figures(ctl, ctl_labels)]
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{cols[0][i]}</td><td>{cols[1][i]}</td></tr>"
                   for i, k in enumerate(_CONTROL_ROWS))
    body += ('<table class="diag control"><thead><tr><th></th><th>this run</th><th>control (nβ = 0)</th></tr></thead>'
             f"<tbody>{rows}</tbody></table>")
    return _section("control", body, lead)


# --------------------------------------------------------------------------- #
# tokens, features, contexts
# --------------------------------------------------------------------------- #


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


def _subsample(lab: np.ndarray) -> np.ndarray:
    """Indices drawn on the map: all, or a seeded subsample keeping MAP_MIN_PER_CLUSTER of every cluster."""
    n = lab.size
    if n <= MAP_MAX_POINTS:
        return np.arange(n)
    rng = np.random.default_rng(MAP_SEED)
    chosen = np.zeros(n, bool)
    for cid in np.unique(lab[lab >= 0]):
        members = np.nonzero(lab == cid)[0]
        chosen[rng.choice(members, min(MAP_MIN_PER_CLUSTER, members.size), replace=False)] = True
    rest = np.nonzero(~chosen)[0]
    extra = max(0, MAP_MAX_POINTS - int(chosen.sum()))
    chosen[rng.choice(rest, min(extra, rest.size), replace=False)] = True
    return np.nonzero(chosen)[0]


def _pca_xy(x: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """First two principal components of the rows of x, and their shares of the variance."""
    x = x - x.mean(axis=0)
    vals, vecs = np.linalg.eigh(x.T @ x)             # (comp, comp): no N x N
    order = np.argsort(vals)[::-1]
    vals, vecs = np.clip(vals[order], 0.0, None), vecs[:, order]
    if vecs.shape[1] < 2:
        vecs = np.hstack([vecs, np.zeros((vecs.shape[0], 2 - vecs.shape[1]))])
        vals = np.append(vals, np.zeros(2 - len(vals)))
    total = float(vals.sum()) or 1.0
    return x @ vecs[:, :2], [float(vals[0] / total), float(vals[1] / total)]


def _knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest rows of x by Euclidean distance, each row itself first: (indices, distances), (n, k).

    Blocked float32 products and torch's top-k (a third of the time numpy's argpartition takes at 20,000 rows)."""
    import torch

    x32 = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    n = x32.shape[0]
    sq = (x32 * x32).sum(dim=1)
    idx = torch.empty((n, k), dtype=torch.int64)
    dist = torch.empty((n, k), dtype=torch.float32)
    block = max(1, (1 << 24) // max(n, 1))          # 64 MB of float32 distances at a time
    for s in range(0, n, block):
        part = torch.addmm(sq[None, :], x32[s:s + block], x32.T, alpha=-2.0)   # |x_j|^2 - 2 x_i.x_j
        rows = torch.arange(part.shape[0])
        part[rows, s + rows] = -float("inf")        # itself first, also among duplicates
        v, ix = torch.topk(part, k, dim=1, largest=False, sorted=True)
        idx[s:s + block] = ix
        dist[s:s + block] = torch.sqrt(torch.clamp(v + sq[s:s + block, None], min=0.0))
    dist[:, 0] = 0.0
    return idx.numpy(), dist.numpy()


def _umap_xy(x: np.ndarray) -> tuple[np.ndarray, dict]:
    """UMAP of the rows of x (module notes), and its settings for the caption."""
    import time
    import warnings

    n = x.shape[0]
    k = int(min(UMAP_NEIGHBOURS, max(2, n // 10), n - 1))
    t0 = time.perf_counter()
    idx, dist = _knn(x, k)
    with warnings.catch_warnings():                  # n_jobs vs random_state, no search index, disconnected points
        warnings.simplefilter("ignore")
        import umap

        xy = umap.UMAP(n_neighbors=k, min_dist=UMAP_MIN_DIST, n_components=2, random_state=MAP_SEED, n_jobs=1,
                       precomputed_knn=(idx, dist, None)).fit_transform(x)
    xy = np.asarray(xy, dtype=np.float64)
    if xy.shape != (n, 2) or not np.isfinite(xy).all():
        raise ValueError("UMAP returned non-finite coordinates")
    return xy, {"n_neighbors": k, "min_dist": UMAP_MIN_DIST, "seed": MAP_SEED,
                "seconds": round(time.perf_counter() - t0, 2)}


def _map_data(run: _Run, fn: Optional[np.ndarray], labels: Optional[np.ndarray], method: str) -> tuple[dict, dict]:
    """(embedded map data, info for the caption): UMAP or PCA of the unit feature rows (module notes)."""
    if fn is None or fn.shape[0] == 0:
        return {}, {}
    n = fn.shape[0]
    lab = labels if labels is not None else np.full(n, -1, dtype=np.int64)
    keep = _subsample(lab)
    info: dict = {"n": n, "shown": int(keep.size), "subsampled": bool(keep.size < n),
                  "has_labels": labels is not None, "method": "pca", "requested": method}
    xy = None
    if method == "umap":
        if keep.size < MAP_UMAP_MIN_POINTS:
            info["fallback"] = f"UMAP needs at least {MAP_UMAP_MIN_POINTS} points; PCA is shown"
        else:
            try:
                xy, info["umap"] = _umap_xy(fn[keep])
                info["method"] = "umap"
            except Exception as e:  # a display step: the page falls back to PCA and says why
                log.warning("report: UMAP failed (%s); the map shows PCA", e)
                info["fallback"] = f"UMAP failed ({type(e).__name__}: {e}); PCA is shown"
    if xy is None:
        xy_all, info["pc_share"] = _pca_xy(fn)
        xy = xy_all[keep]
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    q = np.round((xy - lo) / span * 10000).astype(np.int64)
    texts = [run.text[i] for i in keep]
    uniq = sorted(set(texts))
    tix = {t: i for i, t in enumerate(uniq)}
    srcs = sorted(set(run.source)) if run.source else []
    six = {s: i for i, s in enumerate(srcs)}
    data = {"x": q[:, 0], "y": q[:, 1], "lab": lab[keep], "tok": keep, "tt": uniq,
            "ti": [tix[t] for t in texts], "si": [six[run.source[i]] for i in keep] if srcs else [],
            "ctx": run.context[keep] if run.context is not None else [],
            "pos": run.position[keep] if run.position is not None else [],
            "ax": ["UMAP 1", "UMAP 2"] if info["method"] == "umap" else ["PC1", "PC2"]}
    return data, info


def _gallery_data(run: _Run, names: list[str], f: Optional[np.ndarray], fn: Optional[np.ndarray],
                  labels: Optional[np.ndarray], max_contexts: int, kind: str) -> Optional[dict]:
    """Cards' data. Profiles are the members' mean feature row (what the clustering saw), or clusters.json's
    profile (mean z-scored chi) when the features are not at hand."""
    c = run.clusters
    if not isinstance(c, dict):
        return None
    sources = sorted(set(run.source)) if run.source else []
    ctx = _Contexts.of(run) if run.n_tokens and run.context is not None else None
    comp_names = list(names) if f is not None and names else list(c.get("components") or names)
    plabel = (PROFILE_LABELS.get(kind, f"mean {kind} features per component") if f is not None
              else "mean z-scored χ per component")
    out = []
    for cl in c.get("clusters") or []:
        cid = int(cl["id"])
        members = cl.get("members")
        if members is not None:
            members = np.asarray(members, dtype=np.int64)
        elif labels is not None:
            members = np.nonzero(labels == cid)[0]
        if members is not None and members.size and (members.max() >= run.n_tokens or members.min() < 0):
            run.notes.append(f"cluster {cid} has member indices outside the run's {run.n_tokens} tokens")
            members = None
        size = int(cl.get("size", members.size if members is not None else 0))
        profile = None if f is not None else cl.get("profile")
        if f is not None and members is not None and members.size:
            profile = f[members].mean(axis=0).tolist()
        member_texts = [run.text[i] for i in members] if members is not None else []
        counts = Counter(member_texts)
        top = cl.get("top_tokens") or [[t, k] for t, k in counts.most_common(TOP_TOKENS_SHOWN)]
        src = cl.get("sources")
        if src is None and members is not None:
            src = dict(Counter(run.source[i] for i in members))
        src = src or {}
        for s in src:
            if s not in sources:
                sources.append(s)
        texts = [t for t, _ in counts.most_common(SEARCH_TEXTS_PER_CLUSTER)] or [str(t[0]) for t in top]
        examples = []
        if members is not None and members.size and ctx is not None:
            if fn is not None:
                centre = fn[members].mean(axis=0)
                score = fn[members] @ centre
                ranked = members[np.argsort(-score, kind="stable")]
            else:
                ranked = members
            picked, seen = [], set()
            for i in ranked:                        # distinct token texts first
                if len(picked) >= max_contexts:
                    break
                t = run.text[i]
                if t not in seen:
                    seen.add(t)
                    picked.append(int(i))
            for i in ranked:
                if len(picked) >= max_contexts:
                    break
                if int(i) not in picked:
                    picked.append(int(i))
            for i in picked:
                left, tok, right = ctx.snippet(i)
                examples.append([left, tok, right, sources.index(run.source[i]) if run.source else -1,
                                 int(run.context[i]), int(run.position[i])])
        out.append({"id": cid, "size": size, "cond": cl.get("conductance"), "profile": profile or [],
                    "top": [[str(t), int(k)] for t, k in top[:TOP_TOKENS_SHOWN]],
                    "src": [int(src.get(s, 0)) for s in sources], "texts": texts, "ex": examples,
                    "roles": [[str(r), int(k)] for r, k in (cl.get("roles") or {}).items()][:4]})
    for o in out:      # sources may have grown while looping
        o["src"] += [0] * (len(sources) - len(o["src"]))
    out.sort(key=lambda o: (-o["size"], o["id"]))
    return {"components": comp_names, "sources": sources, "clusters": out, "n_noise": c.get("n_noise"),
            "plabel": plabel}


PROFILE_LABELS = {"centred": "mean feature per component (z-scored χ, each token's mean over components removed)",
                  "zscore": "mean z-scored χ per component"}


# --------------------------------------------------------------------------- #
# page
# --------------------------------------------------------------------------- #


def _asset(name: str) -> str:
    text = (ASSETS / name).read_text(encoding="utf-8")
    for bad in ("</script", "<script", "<!--", "</style"):   # would end or confuse the inline element
        if bad in text.lower():
            raise ValueError(f"report asset {name} contains {bad!r}; it cannot be inlined")
    return text


def _render(run: _Run, *, max_contexts: int, page_size: int, map_method: str = "umap",
            control: Optional[Path] = None) -> str:
    names_hint = run.clusters.get("components") if isinstance(run.clusters, dict) else None
    kind = _feature_kind(run)
    names, f, fn = _features(run, names_hint, kind)
    n = f.shape[0] if f is not None else run.n_tokens
    labels = _labels(run, n)
    map_data, map_info = _map_data(run, fn, labels, map_method)
    gallery = _gallery_data(run, names, f, fn, labels, max_contexts, kind)
    sections = [_run_section(run), _diagnostics_section(run), _traces_section(run), _modes_section(run),
                _map_section(run, map_info, kind), _gallery_section(run, gallery), _sae_section(run),
                _control_section(run, labels, control)]
    verdict = _verdict_box(run)
    payload = {"page_size": page_size, "gallery": gallery, "map": map_data or None,
               "sources": (gallery or {}).get("sources") or sorted(set(run.source))}
    model = ((run.provenance or {}).get("model") or {})
    model_txt = model.get("id") or model.get("source") or "unknown model"
    n_comp = len(run.samples.layout.components) if run.samples is not None else len(names)
    revision = f" @ {_e(str(model['revision']))}" if model.get("revision") else ""
    facts = [f"model <b>{_e(str(model_txt))}</b>{revision}",
             f"{run.n_tokens:,} probe tokens", f"{n_comp} components (incl. full)" if run.samples is not None
             else f"{n_comp} components"]
    if gallery is not None:
        facts.append(f"{len(gallery['clusters'])} clusters")
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    notes = "".join(_notice(f"Missing or inconsistent input: {t}.") for t in run.notes)
    nav = "".join(f'<a href="#{k}">{_e(t)}</a>' for k, t in SECTIONS)
    title = f"spectro report — {run.run_dir.name}"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{_e(title)}</title><style>{_asset('report.css')}</style></head><body>"
        f'<nav class="top"><span class="brand">spectro</span>{nav}</nav>'
        f'<main><header class="page"><h1>{_e(title)}</h1>{verdict}'
        f'<p class="facts">{" · ".join(facts)} · <span class="muted">generated {generated} from '
        f'<code>{_e(str(run.run_dir))}</code></span></p>'
        f'<div id="js-errors" class="notice error" hidden></div>{notes}</header>'
        + "".join(sections)
        + "</main>"
        f'<script type="application/json" id="report-data">{_script_json(payload)}</script>'
        f"<script>{_asset('report.js')}</script></body></html>\n"
    )
