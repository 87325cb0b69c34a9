"""Report sections about the clusters: the token map, the cluster gallery
(rendered in the browser from embedded JSON), the SAE validation, and the
comparison with the nβ = 0 control run.

Non-obvious choices:
- The control comparison is refused (a notice in its section, not an error)
  when the control's probe tokens differ from this run's (count, token ids,
  texts, positions): labels of different tokens cannot be compared. A
  control directory that does not exist is a `ConfigError` (config
  validation raises it before any work; `write_report` again).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from spectro.report.analysis import MAP_MIN_PER_CLUSTER, _probe_mismatch, SEARCH_TEXTS_PER_CLUSTER
from spectro.report.html import _clean, _e, _fmt, _kv_table, _notice, _section, _vis
from spectro.report.loading import _Contexts, _labels, _num, _Run, _trust
from spectro.stability import agreement


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
    unexplained = [c for c in order if not c.get("matched")]
    unexp = (f'<h3>Clusters no feature explains ({len(unexplained)})</h3><p class="small">'
             + (", ".join(f'#{_e(str(c.get("id")))} (F1 {_fmt(c.get("f1"), 2)})' for c in unexplained) or "none")
             + "</p>")
    return _section("sae", head + _sae_scales(s.get("scales")) + _sae_table(order) + unexp
                    + "<h3>Clusters beside their best features</h3>" + _sae_pairs(run, order), lead)


def _sae_scales(scales) -> str:
    """The match at every scale of the run's resolution path (sae.json "scales"): finer scales have clusters small
    enough for a feature to match; a scale counts when its matched fraction is above its null's 95% quantile."""
    if not scales:
        return ""
    rows = "".join(
        f'<tr data-resolution="{sc["resolution"]:g}"><td>{sc["resolution"]:g}</td><td>{_fmt(sc.get("halves_ari"), 2)}'
        f'</td><td>{sc["n_clusters"]}</td><td>{sc["n_can_match"]}</td><td>{sc["n_matched"]}</td>'
        f'<td>{_fmt(sc.get("matched_fraction"))}</td><td>{_fmt(sc.get("null_q95"))}</td>'
        f'<td>{_fmt(sc.get("p_value"))}</td><td>{_fmt(sc.get("mean_best_f1"))} '
        f'<span class="muted">(null 95% {_fmt(sc.get("null_mean_best_f1_q95"))})</span></td></tr>' for sc in scales)
    return ('<h3>Matches at several scales</h3><p class="small">The Leiden scales of the known-answers table, each '
            'matched like the run\'s clusters: the clusters whose size lets a feature reach the threshold, the '
            'clusters matched, and the null of random clusters of the same sizes.</p>'
            '<table class="diag sae-scales"><thead><tr><th>resolution</th><th>halves\' ARI</th><th>clusters</th>'
            '<th>could match</th><th>matched</th><th>matched fraction</th><th>null 95%</th><th>p</th>'
            '<th>mean best F1</th></tr></thead>'
            f'<tbody>{rows}</tbody></table>')


def _sae_table(order: list[dict]) -> str:
    """Per cluster (best F1 first): size, top tokens, its best feature, F1, precision, recall, matched."""
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
    return ('<table class="diag sae"><thead><tr><th>cluster</th><th>size</th><th>top tokens</th><th>best feature</th>'
            '<th>F1</th><th>precision</th><th>recall</th><th>feature active on</th><th></th></tr></thead>'
            f'<tbody>{rows}</tbody></table>')


def _sae_pairs(run: _Run, order: list[dict]) -> str:
    """The best-matched clusters' contexts beside their feature's top activations (at most SAE_DETAILS_MAX)."""
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
    return "".join(details) + more


_CONTROL_ROWS = ("nβ", "chains × draws", "clusters", "clustered share (not noise)",
                 "split-half ARI (cluster stability)",
                 "feature reliability (median)", "token roles: purity vs shuffled labels",
                 "SAE: matched fraction vs null", "SAE: mean best F1 vs null")


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


def _control_section(run: _Run, labels: Optional[np.ndarray], control: Optional[Path]) -> str:
    """This run beside its nβ = 0 control (module notes)."""
    if control is None:
        return _section("control", "", "No control run given. Run the nβ = 0 control "
                        "(<code>experiment=control</code>, another <code>sampler.seed</code>) with the same model and "
                        "data config and pass its directory as <code>report.control</code>: clusters that also appear "
                        "there come from the geometry of the weights and the probe set, not from the loss.")
    if run.run_dir.local and control.resolve() == run.run_dir.path.resolve():
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
    body = _control_notices(run, ctl)
    ctl_labels = _labels(ctl, ctl.n_tokens) if ctl.clusters is not None else None
    if labels is not None and ctl_labels is not None:
        body += _control_agreement(run, labels, ctl_labels)
    else:
        which = "this run" if labels is None else "the control"
        body += _notice(f"No ARI: {which} has no usable cluster labels (clusters.json); run its clusters stage.")
    cols = [_run_figures(run, labels), _run_figures(ctl, ctl_labels)]
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{cols[0][i]}</td><td>{cols[1][i]}</td></tr>"
                   for i, k in enumerate(_CONTROL_ROWS))
    body += ('<table class="diag control"><thead><tr><th></th><th>this run</th><th>control (nβ = 0)</th></tr></thead>'
             f"<tbody>{rows}</tbody></table>")
    return _section("control", body, lead)


def _control_notices(run: _Run, ctl: _Run) -> str:
    """Warnings about the control: not sampled at nβ = 0, the same sampler seed as this run, its own notes."""
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
    return body


def _control_agreement(run: _Run, labels: np.ndarray, ctl_labels: np.ndarray) -> str:
    """ARI of this run's clusters with the control's, beside the ARI of this run's halves, and what it means."""
    _, _, stab = _trust(run)
    half = _num((stab or {}).get("ari"))
    a = agreement(labels, ctl_labels)
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
    return agree
