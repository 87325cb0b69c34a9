"""Report sections about the run itself: the verdict box under the title, run
configuration and provenance, the rounds of a run sampled until reliable,
sampling diagnostics per component, per-chain traces, and the mode spectrum.

Non-obvious choices:
- The verdict box shows clusters.json's `verdict`, its reasons, the
  split-half reliability of the clustering features and of raw chi and the
  ARI between the clusterings of two halves of the chains, with how to read
  them; where they come from when clusters.json lacks them is
  `spectro.report.loading`'s business (`_trust`). A run without any gets a
  grey box saying which stage provides them, not a warning.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from spectro.report.analysis import _target
from spectro.report.html import (_bar_svg, CHAIN_COLOURS, DIVERGED_COLOUR, _e, _f2, _fmt, _kv_table, MAX_SPECTRUM_BARS,
                                 _notice, _pretty_json, _rel_cell, _section, _sparkline, _spectrum_svg, _vis)
from spectro.report.loading import _Contexts, _num, _per_component_reliability, _Run, _trust


MAX_MODES_SHOWN = 20


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


def _rounds_box(run: _Run) -> str:
    """The box under the verdict of a run sampled in rounds (rounds.json, spectro.rounds): each round's draws,
    median and minimum feature reliability, largest R-hat and whether it met the targets, and why the rounds stopped."""
    doc = run.rounds if isinstance(run.rounds, dict) else None
    if not doc or not doc.get("rounds"):
        return ""
    t = doc.get("targets") or {}
    over = t.get("over") or "min"                      # rounds.json written before `over` existed: the min
    named = (("reliability", f"feature reliability ({over})", "≥"), ("rhat", "R-hat", "≤"))
    targets = ", ".join(f"{name} {op} {t[key]}" for key, name, op in named if t.get(key) is not None)
    rows = "".join(
        f'<tr data-round="{r.get("round")}"><th>{_e(str(r.get("round")))}</th><td>{_e(str(r.get("draws")))}</td>'
        f'<td>{_f2(r.get("reliability_median"))}</td><td>{_f2(r.get("reliability_min"))}</td>'
        f'<td>{_fmt(r.get("rhat_max"), 3)}</td>'
        f'<td>{"✓" if r.get("met") else "✗"}</td><td>{_fmt(r.get("seconds"), 0)}</td></tr>' for r in doc["rounds"])
    why = doc.get("stopped_because") or "not finished"
    head = ("<tr><th>round</th><th>draws</th><th>feature reliability (median)</th><th>(min)</th>"
            "<th>R-hat max</th><th>met?</th>"
            "<th>seconds</th></tr>")
    return (f'<div class="answers" id="rounds"><h3>Sampling rounds</h3>'
            f'<p>Sampled in rounds of {_e(str(doc.get("round_draws")))} draws until {_e(targets or "the targets")}; '
            f'stopped after round {len(doc["rounds"])} ({_e(str(doc.get("draws")))} draws): <b>{_e(why)}</b>. '
            f'The figures below are the final round\'s.</p>'
            f'<table class="diag rounds"><thead>{head}</thead><tbody>{rows}</tbody></table></div>')


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
    not_local = s["not_local"].values if "not_local" in s else np.zeros(len(comps), bool)
    not_mixed = s["not_mixed"].values if "not_mixed" in s else np.zeros(len(comps), bool)
    _, rel, _ = _trust(run)
    rel_raw, rel_feat = _per_component_reliability(run, comps, rel)
    target = _target(rel)
    table = _diagnostics_table(run, comps, not_local, not_mixed, rel_raw, rel_feat, target)
    lead_llc = ("LLC = nβ·E[φ] reads as a local learning coefficient only where the chains stay local (E[φ] and "
                "displacement below the thresholds; otherwise flagged).")
    bits = [f"{len(comps)} components", f"estimator form <code>{_e(str(s.attrs.get('form', '–')))}</code>",
            f"nβ = {_fmt(s.attrs.get('nbeta'), 3)}"]
    thr = s.attrs.get("rhat_threshold")
    if thr is not None:
        bits.append(f"flagged “not mixed” where R-hat &gt; {_fmt(thr, 2)} and beyond its null (p, the share of "
                    "perfectly mixing runs of this layout that reach it, below 0.05 / components)")
    lead = "; ".join(bits) + ". " + lead_llc
    if np.isfinite(rel_raw).any() or np.isfinite(rel_feat).any():
        lead += (" Reliability: the predicted correlation over tokens between this run's values and an independent "
                 f"run's (split halves of the chains, Spearman-Brown), of raw χ and of the clustering features; "
                 f"below {_fmt(target, 2)} in red.")
    sample = (run.summary or {}).get("sample") if isinstance(run.summary, dict) else None
    if isinstance(sample, dict) and "seconds" in sample:
        lead += (f" Sampling took {_fmt(sample.get('seconds'), 1)} s "
                 f"({_fmt(sample.get('draws_per_second'), 2)} draws/s).")
    return _section("diagnostics", _diagnostics_notices(s, comps, not_local, not_mixed) + table, lead)


def _diagnostics_table(run: _Run, comps: list[str], not_local, not_mixed, rel_raw, rel_feat, target) -> str:
    """One row per component: LLC, E[φ], displacement, R-hat, ESS, divergences, chains, reliability, status."""
    s = run.sus

    def col(name, dtype=float):
        return s[name].values if name in s else np.full(len(comps), np.nan if dtype is float else -1)

    llc_m, llc_s, rhat, ess = col("llc_mean"), col("llc_std"), col("rhat"), col("ess_bulk")
    rhat_p = col("rhat_p")
    phi, disp = col("mean_phi"), col("displacement")
    used, ndiv = col("n_chains_used", int), col("n_diverged", int)
    n_chains = run.samples.layout.n_chains if run.samples is not None else None
    rows = []
    for i, c in enumerate(comps):
        flag = bool(not_mixed[i]) or bool(not_local[i])
        problems = [t for t, bad in (("not mixed", not_mixed[i]), ("not local", not_local[i])) if bad]
        status = (f'<span class="flag-text">{", ".join(problems)}</span>' if flag
                  else '<span class="ok-text">ok</span>')
        if int(used[i]) == 0:
            status = '<span class="flag-text">no chains</span>'
        chains = f"{int(used[i])}" + (f" / {n_chains}" if n_chains is not None else "")
        p_txt = f' <span class="muted">(p {_fmt(rhat_p[i], 2)})</span>' if np.isfinite(rhat_p[i]) else ""
        rows.append(
            f'<tr class="{"flagged" if flag else ""}" data-component="{_e(c)}"><td><code>{_e(c)}</code></td>'
            f'<td class="num">{_fmt(llc_m[i])} <span class="muted">± {_fmt(llc_s[i])}</span></td>'
            f'<td class="num{" bad" if not_local[i] else ""}">{_fmt(phi[i])}</td>'
            f'<td class="num{" bad" if not_local[i] else ""}">{_fmt(disp[i])}</td>'
            f'<td class="num">{_fmt(rhat[i])}{p_txt}</td>'
            f'<td class="num">{_fmt(ess[i], 1)}</td>'
            f'<td class="num{" bad" if int(ndiv[i]) > 0 else ""}">{int(ndiv[i])}</td>'
            f'<td class="num">{chains}</td>{_rel_cell(rel_raw[i], target)}{_rel_cell(rel_feat[i], target)}'
            f'<td>{status}</td></tr>')
    return ('<table class="diag"><thead><tr><th>component</th><th>LLC mean ± std</th>'
            '<th title="mean loss rise of the sampled models, nats">E[φ]</th>'
            '<th title="RMS(w - w*) / RMS(w*) over the component\'s sampled weights">displacement</th><th>R-hat</th>'
            '<th>bulk ESS</th><th>divergences</th><th>chains used</th>'
            '<th title="split-half reliability of raw chi: predicted correlation with an independent run">'
            'reliability χ</th><th title="split-half reliability of the clustering features">'
            'reliability features</th><th>status</th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def _diagnostics_notices(s, comps: list[str], not_local, not_mixed) -> str:
    """The warnings above the table: components not local, not mixed, excluded chains, a partial estimate."""
    extra = ""
    n_far = int(np.sum(not_local))
    if n_far:
        far = ", ".join(c for c, bad in zip(comps, not_local) if bad)
        extra += _notice(f"{n_far} of {len(comps)} components are not local ({_e(far)}): their chains' models lose "
                         f"more than {_fmt(s.attrs.get('local_max_phi', 0.5), 2)} nats on average or moved more "
                         f"than {_fmt(s.attrs.get('local_max_displacement', 0.5), 2)} of their weights' size from "
                         "w*, so nβ·E[φ] there is not a local learning coefficient and χ mixes in the response of "
                         "a different, worse model (raise sampler.gamma; docs/method.md, Locality).")
    n_flag = int(np.sum(not_mixed))
    if n_flag:
        extra += _notice(f"{n_flag} of {len(comps)} components have chains that have not mixed; their "
                         "susceptibilities are less reliable (longer chains, more burn-in or a smaller step help).")
    excluded = s.attrs.get("excluded_chains") or []
    if excluded:
        extra += _notice(f"{len(excluded)} diverged chain(s) excluded from the estimates: "
                         + ", ".join(map(str, excluded)))
    if s.attrs.get("partial"):
        extra += _notice("partial estimate: computed from an incomplete sample store.")
    return extra


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
