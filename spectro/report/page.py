"""`write_report`: the report page of a run directory, assembled from its
sections and written to `<run_dir>/report.html` (through spectro.rundir's
atomic writer).

Non-obvious choices:
- `map_method` and `control` not passed to `write_report` are taken from the
  run's own config.json (`report.map`, `report.control`).
- A run or control directory that does not exist is a `ConfigError`.
"""

from __future__ import annotations

import datetime as _dt
import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np

from spectro import rundir
from spectro.config import ReportConfig
from spectro.report.analysis import _gallery_data, _map_data
from spectro.report.html import _asset, _e, _notice, _script_json, SECTIONS
from spectro.report.loading import _feature_kind, _features, _labels, _Run
from spectro.report.sections_answers import answers_box, scales_box
from spectro.report.sections_clusters import _control_section, _gallery_section, _map_section, _sae_section
from spectro.report.sections_run import (_diagnostics_section, _modes_section, _rounds_box, _run_section,
                                         _traces_section, _verdict_box)

log = logging.getLogger("spectro")


MAP_METHODS = ("umap", "pca")
_R = ReportConfig()       # the schema's defaults: the one place they are written
_FROM_RUN = object()      # write_report's default for `control`: the run's own config.json says


def write_report(run_dir: rundir.PathLike, *, max_contexts: int = _R.max_contexts, page_size: int = _R.page_size,
                 map_method: Optional[str] = None, control: Any = _FROM_RUN) -> rundir.Location:
    """Write `<run_dir>/report.html` from whatever the run directory holds; returns its path.

    `map_method` ("umap" | "pca") and `control` (a control run's directory, or None for no comparison) default
    to the run's config.json (`report.map`, `report.control`). Raises ConfigError for a run or control directory
    that does not exist, or bad settings."""
    from spectro.errors import ConfigError

    run_dir = rundir.location(run_dir)          # a local directory or a URL (storage.uri)
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
    out = rundir.write_text(run_dir / rundir.REPORT, page)
    log.info("report written to %s (%.1f kB)", out, len(page.encode("utf-8")) / 1024)
    return out


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
    verdict = _verdict_box(run) + _rounds_box(run)
    verdict += answers_box(run, _Run.load(control) if control is not None and Path(control).is_dir() else None)
    verdict += scales_box(run)
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
