"""The known-answers box under the verdict: for every label of the probe set,
did the clusters find it (spectro.known_answers)? And the box after it: the
structure at several scales, each with its stability (spectro.clusters.scales).

Non-obvious choices:
- One row per label: the best cluster's F1 beside the ceiling its size allows
  and the chance level (shuffled clusters), then the readout AUC (whether the
  information is in chi at all, without clustering) and the components that
  separate the label most, with the heads the model's own ablation names
  marked. With a control run (`report.control`) each figure is shown as
  "this run / control".
- A label with too few tokens is listed with its count only.
"""

from __future__ import annotations

from typing import Optional

from spectro.report.html import _e, _f2
from spectro.report.loading import _Run


def _answers(run: Optional[_Run]) -> dict:
    doc = (run.clusters or {}).get("known_answers") if run is not None and isinstance(run.clusters, dict) else None
    return {e["label"]: e for e in (doc or {}).get("labels", [])}


def _components(entry: dict) -> str:
    out = []
    for c in entry.get("components", [])[:3]:
        named = "".join(f' <span class="tag">{_e(k)}</span>' for k in c.get("named", []))
        out.append(f"<code>{_e(c['component'])}</code> d={c['effect_size']:+.2f}{named}")
    return ", ".join(out) or "–"


def _half(e: dict) -> str:
    half = e.get("readout_auc_half")
    return f' <span class="muted">(half the draws {_f2(half)})</span>' if half is not None else ""


def _loss(e: dict) -> str:
    if e.get("loss_auc") is None:
        return ""
    return (f' <span class="muted">(token loss alone: AUC {_f2(e.get("loss_auc"))}, '
            f'F1 {_f2(e.get("loss_f1"))})</span>')


def _pair(mine: Optional[float], theirs: Optional[float], control: bool) -> str:
    return f"{_f2(mine)} / {_f2(theirs)}" if control else _f2(mine)


def answers_box(run: _Run, control: Optional[_Run] = None) -> str:
    """The box (module notes); empty when the run's probe set has no labels."""
    mine, theirs = _answers(run), _answers(control)
    if not mine:
        return ""
    named = ((run.clusters or {}).get("known_answers") or {}).get("named_heads") or {}
    ctl = control is not None
    rows = []
    for label, e in mine.items():
        if "best_cluster" not in e:
            rows.append(f'<tr><th title="{_e(e.get("rule", ""))}">{_e(label)}</th><td>{e["n_tokens"]:,}</td>'
                        f'<td colspan="5" class="muted">too few tokens for figures</td></tr>')
            continue
        b, o = e.get("best_cluster") or {}, theirs.get(label, {})
        ob = o.get("best_cluster") or {}
        rows.append(
            f'<tr data-label="{_e(label)}"><th title="{_e(e.get("rule", ""))}">{_e(label)}</th>'
            f'<td>{e["n_tokens"]:,}</td>'
            f'<td>{_pair(b.get("f1"), ob.get("f1"), ctl)} <span class="muted">(ceiling {_f2(b.get("ceiling"))}, '
            f'cluster {b.get("cluster", "–")} of {b.get("size", "–")})</span></td>'
            f'<td>{_pair(e.get("shuffled_f1"), o.get("shuffled_f1"), ctl)}</td>'
            f'<td>{_pair(e.get("readout_auc"), o.get("readout_auc"), ctl)}{_half(e)}</td>'
            f'<td>{_pair(e.get("readout_f1"), o.get("readout_f1"), ctl)}{_loss(e)}</td>'
            f'<td>{_components(e)}</td></tr>')
    heads = "; ".join(f"{k.replace('_', ' ')}: {', '.join(v) or 'none'}" for k, v in named.items())
    how = ("<b>How to read this.</b> Each label marks tokens whose role is known without susceptibilities (hover a "
           "label for its rule). Best cluster F1: how well one cluster matches the label's tokens; the ceiling is "
           "the best F1 a cluster of that size could reach, chance the same figure with the clusters shuffled. "
           "Readout AUC: a cross-validated linear readout of the label from the clustering features (0.5 is "
           "chance): high AUC with low F1 means the information is in χ but the clustering does not isolate it. "
           "Readout F1: the best F1 that supervised readout reaches on held-out contexts, a ceiling for any "
           "cluster built from these features; if half the draws read the label as well as all of them, more "
           "draws will not raise it. Token loss alone: the same readout from each token's own loss; what χ adds "
           "beyond how easy a token is, is the gap to it. "
           "Separating components: effect size (Cohen's d) of χ between the label's tokens and the rest"
           + (f"; heads named by the model's own ablation: {_e(heads)}" if heads else "") + ".")
    head = ("<tr><th>label</th><th>tokens</th><th>best cluster F1" + (" (this run / control)" if ctl else "")
            + "</th><th>chance F1</th><th>readout AUC</th><th>readout F1</th><th>separating components</th></tr>")
    return (f'<div class="answers" id="known-answers"><h3>Known answers</h3>'
            f'<table class="diag answers"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'
            f'<p class="how">{how}</p></div>')


def scales_box(run: _Run) -> str:
    """The structure at several scales (clusters.json "scales", spectro.clusters.scales): per Leiden resolution the
    clusters, the share clustered, the agreement of the two halves' clusterings, and each label's best cluster;
    the chosen scale marked. Empty when the run has no scales table."""
    path = (run.clusters or {}).get("scales") if isinstance(run.clusters, dict) else None
    if not path or not path.get("scales"):
        return ""
    labels = sorted({k for sc in path["scales"] for k in sc.get("known_answers", {})})
    rows = []
    for i, sc in enumerate(path["scales"]):
        chosen = i == path.get("chosen")
        cells = "".join(
            f'<td>{_f2(a.get("f1"))} <span class="muted">({_f2(a.get("ceiling"))})</span></td>'
            if (a := sc.get("known_answers", {}).get(name)) else "<td>–</td>" for name in labels)
        rows.append(f'<tr data-resolution="{sc["resolution"]:g}"{" class=chosen" if chosen else ""}>'
                    f'<th>{sc["resolution"]:g}{" ◀" if chosen else ""}</th><td>{sc["n_clusters"]}</td>'
                    f'<td>{sc["clustered_share"]:.0%}</td><td>{_f2(sc.get("halves_ari"))}</td>{cells}</tr>')
    stable, threshold = path.get("stable"), path.get("min_stability")
    if stable:
        what = f"the finest scale whose halves agree at ARI ≥ {threshold} (◀)"
    elif stable is False:
        what = f"no scale's halves agree at ARI ≥ {threshold}: ◀ marks the most stable"
    else:
        what = "no halves to measure stability: ◀ marks the finest scale"
    head = ("<tr><th>resolution</th><th>clusters</th><th>clustered</th><th>halves' ARI</th>"
            + "".join(f"<th>{_e(n)} F1 (ceiling)</th>" for n in labels) + "</tr>")
    how = ("<b>How to read this.</b> Leiden on the run's kNN graph at each resolution (larger: finer clusters), "
           "each scale clustered again on each half of the chains; halves' ARI is their agreement on the tokens "
           "both cluster, the stability of that scale. Structure finer than the last stable scale is noise in χ. "
           "Per label, the best cluster's F1 at that scale and the ceiling its size allows. The clusters above "
           f"are the run's own method ({_e(str((run.clusters or {}).get('method')))}); this table is {what}.")
    return (f'<div class="answers" id="scales"><h3>Structure at several scales</h3>'
            f'<table class="diag scales"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'
            f'<p class="how">{how}</p></div>')
