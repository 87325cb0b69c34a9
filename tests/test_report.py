"""report.html: one self-contained page built from a real (small) run.

The run directory comes from the real pipeline (embedded model, Ray actors,
covariance job, clusters stage, a short SAE stage, report stage), once per
module; so does a second run, the nβ = 0 control (`sampler.control=true`,
another seed, no SAE), on the same probe tokens.

One token text is rewritten to `</script><b>"x'&amp;` in the stores (of both
runs) and the run's clusters stage is run again, so the page must escape it
everywhere. The headless-browser test loads the page in Debian's Chromium and
reads its console log, the DOM after scripts ran, and a screenshot.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest

DANGER = "</script><b>\"x'&amp;"
CHROMIUM = Path("/usr/bin/chromium")
PAGE = 3                                   # cards per page in the fixture report: paging is exercised

pytestmark = pytest.mark.slow              # two real pipeline runs, then a headless browser


# --------------------------------------------------------------------------- #
# fixture run
# --------------------------------------------------------------------------- #


def make_dangerous(run_dir: Path) -> str:
    """Rewrite every occurrence of the most common token text to DANGER in both stores."""
    import zarr

    g = zarr.open_group(str(run_dir / "samples.zarr"), mode="r+")
    texts = [str(t) for t in g["token_text"][:].tolist()]
    common = Counter(texts).most_common(1)[0][0]
    new = np.array([DANGER if t == common else t for t in texts], dtype=g["token_text"][:].dtype)
    g["token_text"][:] = new
    s = zarr.open_group(str(run_dir / "susceptibilities.zarr"), mode="r+")
    assert [str(t) for t in s["token_text"][:].tolist()] == texts
    s["token_text"][:] = new
    assert [str(t) for t in g["token_text"][:].tolist()].count(DANGER) == texts.count(common)
    return common


def fixture_config(control: bool = False):
    from spectro.config import to_config

    return to_config({"components": ["l0h1", "l1.mlp", "l2h0", "l3h3"],
                      "sampler": {"num_chains": 4, "num_draws": 4, "chain_group": 4, "checkpoint_every": 2,
                                  "burnin": 0, "control": control, "seed": 1 if control else 0},
                      "data": {"n_probe_contexts": 8, "n_train_contexts": 64, "n_sampling_contexts": 8},
                      "ray": {"num_actors": 2}, "report": {"page_size": PAGE},
                      # a short SAE stage gives the run's page its section; the control skips it
                      "sae": {"steps": 200, "n_null": 50, "enabled": not control}})


def build_run(run_dir: Path, control: bool = False):
    """stage=all: sample -> susceptibilities -> clusters -> (sae) -> report; the stage's page is kept aside."""
    from spectro import pipeline

    cfg = fixture_config(control)
    pipeline.run(cfg, run_dir)
    if (run_dir / "report.html").exists():
        (run_dir / "report.html").rename(run_dir / "report.pipeline.html")
    return cfg


@pytest.fixture(scope="module")
def ray_own():
    """Like conftest's ray_local, but always a fresh local instance: a bare ray.init() joins a cluster that
    someone started with `ray start` on this machine (address="local" never does)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def run_dir(ray_own, tmp_path_factory):
    from spectro import pipeline

    d = tmp_path_factory.mktemp("report") / "run"
    cfg = build_run(d)
    make_dangerous(d)
    pipeline.run_clusters(cfg, d)       # the real clusters stage again, on the rewritten texts
    return d


@pytest.fixture(scope="module")
def control_dir(run_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("report") / "control"
    build_run(d, control=True)
    make_dangerous(d)                   # the same probe tokens as the run, the same text rewritten
    return d


@pytest.fixture(scope="module")
def report(run_dir):
    from spectro.report import write_report

    path = write_report(run_dir, page_size=PAGE)
    return path, path.read_text(encoding="utf-8")


# --------------------------------------------------------------------------- #
# the page as text
# --------------------------------------------------------------------------- #


def test_self_contained_no_network(report, run_dir):
    from spectro.report import ASSETS

    path, page = report
    assert path.name == "report.html" and page.startswith("<!DOCTYPE html>")
    # nothing is pulled in: attributes hold in-page anchors only, no CSS url()/@import, no external elements
    refs = re.findall(r"""\b(?:src|href|srcset|action|poster|xlink:href)\s*=\s*["']?([^"'\s>]*)""", page, flags=re.I)
    assert refs and all(r.startswith("#") for r in refs), refs
    assert not re.search(r"url\(|@import|<link\b|<iframe\b|<img\b|<object\b|<embed\b|fetch\(|XMLHttpRequest",
                         page, flags=re.I)
    assert page.count("<script") == 2      # the JSON data and the inlined script, neither with src=
    for asset in ASSETS.iterdir():          # the templates themselves name no network address
        assert "http:" not in asset.read_text() and "https:" not in asset.read_text()
    # the page names none at all (token texts could quote one: the fixture's quote none)
    import xarray as xr
    texts = xr.open_zarr(str(run_dir / "susceptibilities.zarr"), consolidated=False)["token_text"].values.tolist()
    assert not any("//" in str(t) for t in texts), "a token text of the fixture quotes an address"
    assert "http://" not in page and "https://" not in page


def test_sections_diagnostics_and_counts(report, run_dir):
    from spectro.report import SECTIONS
    from spectro.store import SampleStore

    _, page = report
    for key, title in SECTIONS:
        assert f'<section id="{key}"><h2>{title}</h2>' in page
    comps = SampleStore.open(run_dir / "samples.zarr").layout.components
    rows = re.findall(r'<tr class="[a-z]*" data-component="([^"]+)">', page)
    assert rows == list(comps)
    clusters = json.loads((run_dir / "clusters.json").read_text())
    assert f"<b>{len(clusters['clusters'])} clusters</b>" in page
    traces = page.split('<section id="traces">')[1].split("</section>")[0]
    assert traces.count('<svg class="spark"') == len(comps)
    n_chains = SampleStore.open(run_dir / "samples.zarr").layout.n_chains
    assert traces.count('<polyline class="line"') == len(comps) * n_chains     # every chain healthy
    # rows flagged where not mixed, with text
    import xarray as xr
    ds = xr.open_zarr(str(run_dir / "susceptibilities.zarr"), consolidated=False)
    flagged = [str(c) for c, f in zip(ds["component"].values, ds["not_mixed"].values) if f]
    for c in flagged:
        row = re.search(rf'<tr class="flagged" data-component="{re.escape(c)}">.*?</tr>', page)
        assert row and "not mixed" in row.group(0)
    # provenance and config are there
    prov = json.loads((run_dir / "provenance.json").read_text())
    for h in prov["model"]["files"].values():
        assert h in page
    assert prov["data"]["content_hash"] in page


def test_dangerous_token_text_is_escaped(report):
    _, page = report
    assert "</script><b>" not in page
    assert "<b>\"x" not in page
    data = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, flags=re.S)
    payload = json.loads(data.group(1))
    texts = {t for c in payload["gallery"]["clusters"] for t, _ in c["top"]}
    assert DANGER in texts                  # it survives the round trip as data
    assert "&lt;/script&gt;&lt;b&gt;" in page  # and static parts (modes) show it escaped


def test_pipeline_report_stage_wrote_the_page(run_dir):
    from spectro.report import SECTIONS

    page = (run_dir / "report.pipeline.html").read_text(encoding="utf-8")
    assert all(f'<section id="{key}"><h2>{title}</h2>' in page for key, title in SECTIONS)
    payload = json.loads(re.search(r'id="report-data">(.*?)</script>', page, flags=re.S).group(1))
    assert payload["page_size"] == PAGE and payload["gallery"] is not None and payload["map"] is not None


def test_missing_cluster_outputs_render_what_they_can(run_dir, tmp_path):
    from spectro.report import write_report

    d = tmp_path / "run"
    shutil.copytree(run_dir, d, ignore=shutil.ignore_patterns("checkpoints", "report*.html"))
    (d / "clusters.json").unlink()
    (d / "modes.json").unlink()
    (d / "summary.json").unlink()
    page = write_report(d, map_method="pca").read_text(encoding="utf-8")
    notices = _header_notices(page)
    assert any("clusters.json not found" in t for t in notices) and any("modes.json not found" in t for t in notices)
    assert any("summary.json not found" in t for t in notices)
    assert 'data-component="l0h1"' in page and '<svg class="spark"' in page
    assert '"gallery":null' in page
    # no verdict without clusters.json and summary.json, but the zarr's reliability is still shown
    box = _verdict_html(page)
    assert 'class="verdict unknown"' in box and "no verdict" in box
    import xarray as xr
    rel = xr.open_zarr(str(d / "susceptibilities.zarr"), consolidated=False).attrs["reliability"]
    assert f"median {rel['features_median']:.2f}" in box


def test_sparse_schema_and_nan_estimates(run_dir, tmp_path):
    """clusters.json with labels but no members/profiles/top tokens, list loadings, extra keys, and a
    component whose estimates are all NaN: the page still renders every section, and its data parses."""
    import zarr

    from spectro.report import write_report

    d = tmp_path / "run"
    shutil.copytree(run_dir, d, ignore=shutil.ignore_patterns("checkpoints", "report*.html"))
    full = json.loads((d / "clusters.json").read_text())
    sparse = {"labels": full["labels"], "components": full["components"], "new_key": {"x": 1},
              "clusters": [{"id": c["id"], "size": c["size"], "conductance": None} for c in full["clusters"]]}
    (d / "clusters.json").write_text(json.dumps(sparse))
    (d / "modes.json").write_text(json.dumps({"variance_share": [0.6, 0.4], "modes": [
        {"index": 0, "loadings": [0.5, -0.5, 0.1, 0.0], "top_positive": [["a<b", 1.0]], "top_negative": []}]}))
    s = zarr.open_group(str(d / "susceptibilities.zarr"), mode="r+")
    chi = np.array(s["chi"][:])
    chi[:, 2] = np.nan
    s["chi"][:] = chi
    llc = np.array(s["llc_mean"][:])
    llc[2] = np.nan
    s["llc_mean"][:] = llc
    page = write_report(d).read_text(encoding="utf-8")
    data = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, flags=re.S)
    payload = json.loads(data.group(1))     # strict JSON: no NaN
    g = payload["gallery"]["clusters"]
    assert [c["id"] for c in g] == [c["id"] for c in sorted(full["clusters"], key=lambda c: (-c["size"], c["id"]))]
    assert all(c["top"] and c["ex"] and len(c["profile"]) == len(full["components"]) for c in g)
    assert all(c["cond"] is None for c in g)
    assert "a&lt;b" in page and "Mode 0" in page and "60.0% of variance" in page
    row = re.search(r'data-component="l1.mlp">.*?</tr>', page).group(0)
    assert "<td class=\"num\">– <span" in row


def test_diverged_chain_and_mixing_flags(run_dir, tmp_path):
    import zarr

    from spectro.report import write_report

    d = tmp_path / "run"
    shutil.copytree(run_dir, d, ignore=shutil.ignore_patterns("checkpoints", "report*.html"))
    g = zarr.open_group(str(d / "samples.zarr"), mode="r+")
    g["diverged_at"][2, 1] = 2                          # l1.mlp chain 1 diverged at draw 2
    g["sampling_loss"][2, 1, 3] = np.nan
    s = zarr.open_group(str(d / "susceptibilities.zarr"), mode="r+")
    mixed = np.array(s["not_mixed"][:])
    mixed[:] = True
    mixed[1] = False                                    # only l0h1 mixed
    s["not_mixed"][:] = mixed
    s["not_local"][:] = np.zeros_like(mixed)            # this test is about mixing: no locality flag
    page = write_report(d).read_text(encoding="utf-8")
    traces = page.split('<section id="traces">')[1].split("</section>")[0]
    assert traces.count('class="line diverged"') == 1 and "1 diverged" in traces and "✕" in traces
    assert "diverged at draw 2" in traces
    ok_row = re.search(r'<tr class="" data-component="l0h1">.*?</tr>', page).group(0)
    assert "not mixed" not in ok_row and ">ok<" in ok_row
    bad_row = re.search(r'<tr class="flagged" data-component="l1.mlp">.*?</tr>', page).group(0)
    assert "not mixed" in bad_row
    assert "4 of 5 components have chains that have not mixed" in page


def _header_notices(page: str) -> list[str]:
    header = page.split('<header class="page">')[1].split("</header>")[0]
    return re.findall(r'<div class="notice">(.*?)</div>', header)


def _verdict_html(page: str) -> str:
    return page.split('<header class="page">')[1].split('<p class="facts">')[0]


def _section_html(page: str, key: str) -> str:
    return page.split(f'<section id="{key}">')[1].split("</section>")[0]


def _payload(page: str) -> dict:
    return json.loads(re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page,
                                flags=re.S).group(1))


def test_no_notice_on_a_complete_fresh_run(report, run_dir):
    """Neither the page the pipeline's report stage wrote nor a rewrite has a notice at the top: every input is
    there (summary.json is written before the report stage)."""
    pipeline_page = (run_dir / "report.pipeline.html").read_text(encoding="utf-8")
    for page in (pipeline_page, report[1]):
        assert "Missing or inconsistent input" not in page
        assert _header_notices(page) == []
        assert 'id="js-errors" class="notice error" hidden' in page


def test_verdict_box_shows_the_runs_figures(report, run_dir):
    import html as html_mod

    import xarray as xr

    _, page = report
    c = json.loads((run_dir / "clusters.json").read_text())
    v, rel, stab = c["verdict"], c["reliability"], c["stability"]
    assert v and rel and stab, "the clusters stage writes the verdict, reliability and stability"
    box = _verdict_html(page)
    # right under the title, before the facts line and every section
    assert page.index("</h1>") < page.index('id="verdict"') < page.index('<p class="facts">')
    assert f'class="verdict {"ok" if v["ok"] else "bad"}"' in box and f'data-ok="{str(v["ok"]).lower()}"' in box
    assert f'<b class="verdict-text">{html_mod.escape(v["text"])}</b>' in box
    for reason in v["reasons"]:
        assert f"<li>{html_mod.escape(reason)}</li>" in box
    fig = lambda slug: re.search(rf'data-fig="{slug}">(.*?)</div>', box).group(1)  # noqa: E731
    assert f"median {rel['features_median']:.2f}" in fig("features")
    assert f"min {rel['features_min']:.2f} ({rel['least_reliable']})" in fig("features")
    assert f"median {rel['raw_median']:.2f}" in fig("raw")
    assert f"ARI {stab['ari']:.2f}" in fig("stability") and f"{stab['ari_all_tokens']:.2f} on all tokens" in fig(
        "stability")
    factor = float(rel["draws_factor_for_target"])              # above 1: the draws the target needs
    if math.isinf(factor):
        assert "far more" in fig("draws")
    elif factor > 1:
        assert f"≈ {factor:.1f}×" in fig("draws")
    else:                                                       # at the target already: no such figure
        assert 'data-fig="draws"' not in box
    assert "How to read this" in box and "independent run" in box and "adjusted Rand index" in box
    # per-component reliability in the diagnostics table, flagged below the target
    ds = xr.open_zarr(str(run_dir / "susceptibilities.zarr"), consolidated=False)
    for i, comp in enumerate(str(x) for x in ds["component"].values):
        row = re.search(rf'data-component="{re.escape(comp)}">(.*?)</tr>', page).group(1)
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
        for value, cell in zip((ds["reliability_raw"].values[i], ds["reliability_features"].values[i]), cells[8:10]):
            assert cell == ("–" if not np.isfinite(value) else f"{value:.2f}")
        bad = re.findall(r'<td class="num bad" title="below the target', row)
        assert len(bad) == sum(np.isfinite(x) and x < rel["target"] for x in
                               (ds["reliability_raw"].values[i], ds["reliability_features"].values[i]))



def test_scales_box_shows_the_runs_resolution_path(report, run_dir):
    """clusters.json carries the structure at several scales (clustering.scales), with each scale's halves'
    agreement and the chosen scale; the page shows one row per resolution with the chosen one marked, and
    summary.json the chosen scale."""
    _, page = report
    path = json.loads((run_dir / "clusters.json").read_text())["scales"]
    sc = path["scales"]
    assert [s["resolution"] for s in sc] == [1.0, 2.0, 4.0, 8.0] and 0 <= path["chosen"] < 4
    assert all(s["halves_ari"] is None or -1 <= s["halves_ari"] <= 1 for s in sc)
    assert all(len(s["n_clusters_halves"]) == 2 and 0 <= s["clustered_share"] <= 1 for s in sc)
    ok = [i for i, s in enumerate(sc) if (s["halves_ari"] or -1) >= 0.5 and s["clustered_share"] >= 0.5]
    assert path["stable"] is bool(ok)
    box = page[page.index('id="scales"'):]
    box = box[:box.index("</div>")]
    rows = re.findall(r'<tr data-resolution="([^"]+)"( class=chosen)?>(.*?)</tr>', box)
    assert [r[0] for r in rows] == ["1", "2", "4", "8"]
    assert [i for i, r in enumerate(rows) if r[1]] == [path["chosen"]]
    for (_, _, cells), s in zip(rows, sc):
        assert f"<td>{s['n_clusters']}</td>" in cells
    summary = json.loads((run_dir / "summary.json").read_text())["clusters"]["scales"]
    assert summary["resolution"] == sc[path["chosen"]]["resolution"] and summary["stable"] is path["stable"]


def test_verdict_box_colours(run_dir, tmp_path):
    """Green when the verdict is ok, red when not, amber when the run has figures but no verdict."""
    from spectro.report import write_report

    d = tmp_path / "run"
    shutil.copytree(run_dir, d, ignore=shutil.ignore_patterns("checkpoints", "report*.html"))
    c = json.loads((d / "clusters.json").read_text())
    c["verdict"] = {"ok": True, "text": "clusters reproducible", "reasons": ["feature reliability 0.91 >= 0.8"]}
    (d / "clusters.json").write_text(json.dumps(c))
    box = _verdict_html(write_report(d, map_method="pca").read_text(encoding="utf-8"))
    assert 'class="verdict ok"' in box and "✓" in box and "clusters reproducible" in box
    del c["verdict"]
    (d / "clusters.json").write_text(json.dumps(c))
    (d / "summary.json").write_text(json.dumps({"run_dir": str(d)}))
    box = _verdict_html(write_report(d, map_method="pca").read_text(encoding="utf-8"))
    assert 'class="verdict unknown"' in box and "no verdict (run the clusters stage)" in box
    assert 'data-fig="features"' in box and 'data-fig="stability"' in box


def test_map_umap_and_pca_both_render(run_dir, tmp_path, monkeypatch):
    from spectro.report import analysis as report_mod      # the map settings live there
    from spectro.report import write_report

    d = tmp_path / "run"
    shutil.copytree(run_dir, d, ignore=shutil.ignore_patterns("checkpoints", "report*.html"))
    n = len(json.loads((d / "clusters.json").read_text())["labels"])
    maps = {}
    for method in ("umap", "pca", "umap"):
        page = write_report(d, map_method=method).read_text(encoding="utf-8")
        m = _payload(page)["map"]
        x, y = np.asarray(m["x"], dtype=float), np.asarray(m["y"], dtype=float)
        assert x.shape == y.shape == (n,) and np.isfinite(x).all() and np.isfinite(y).all()
        assert x.min() == 0 and x.max() == 10000 and y.min() == 0 and y.max() == 10000
        lead = _section_html(page, "map")
        if method == "umap":
            assert m["ax"] == ["UMAP 1", "UMAP 2"] and "UMAP (n_neighbors 45, min_dist 0.1, seed 0" in lead
        else:
            assert m["ax"] == ["PC1", "PC2"] and "First two principal components" in lead
        assert "Not UMAP" not in lead and "Subsampled" not in lead
        maps.setdefault(method, []).append((m["x"], m["y"]))
    assert maps["umap"][0] == maps["umap"][1]            # a fixed seed: the same picture every time
    assert maps["umap"][0] != maps["pca"][0]
    # without an argument the run's own config.json decides
    cfg = json.loads((d / "config.json").read_text())
    cfg["report"]["map"] = "pca"
    (d / "config.json").write_text(json.dumps(cfg))
    assert _payload(write_report(d).read_text(encoding="utf-8"))["map"]["ax"] == ["PC1", "PC2"]
    # above MAP_MAX_POINTS: UMAP on a seeded subsample that keeps members of every cluster, and the page says so
    monkeypatch.setattr(report_mod, "MAP_MAX_POINTS", 200)
    page = write_report(d, map_method="umap").read_text(encoding="utf-8")
    m = _payload(page)["map"]
    assert len(m["x"]) == 200 and m["ax"] == ["UMAP 1", "UMAP 2"]
    assert "Subsampled:</b> 200 of" in _section_html(page, "map") and "UMAP ran on these tokens only" in page
    labels = np.asarray(json.loads((d / "clusters.json").read_text())["labels"])
    for cid, size in Counter(labels[labels >= 0].tolist()).items():
        assert sum(1 for lab in m["lab"] if lab == cid) >= min(size, report_mod.MAP_MIN_PER_CLUSTER)


def test_map_and_contexts_use_the_clustering_features(run_dir):
    """The report's features are spectro.features' of the clustered components, rows at unit length."""
    import xarray as xr

    from spectro.features import feature_matrix
    from spectro.report import _Run, _feature_kind, _features

    run = _Run.load(run_dir)
    c = json.loads((run_dir / "clusters.json").read_text())
    kind = _feature_kind(run)
    assert kind == c["params"].get("features", "centred")
    names, f, fn = _features(run, c["components"], kind)
    ds = xr.open_zarr(str(run_dir / "susceptibilities.zarr"), consolidated=False)
    chi = ds["chi"].sel(component=c["components"]).values
    assert names == c["components"]
    np.testing.assert_allclose(f, feature_matrix(chi, kind))
    norms = np.linalg.norm(fn, axis=1)
    assert np.allclose(norms[norms > 0], 1.0)
    np.testing.assert_allclose(fn[norms > 0], f[norms > 0] / np.linalg.norm(f[norms > 0], axis=1, keepdims=True))


def _ari_text(a, b):
    from sklearn.metrics import adjusted_rand_score

    from spectro.report import _fmt

    a, b = np.asarray(a), np.asarray(b)
    both = (a >= 0) & (b >= 0)
    return _fmt(adjusted_rand_score(a[both], b[both])), _fmt(adjusted_rand_score(a, b)), int(both.sum())


def test_control_section_against_a_real_control(run_dir, control_dir, tmp_path):
    from spectro.report import _fmt, write_report

    d = tmp_path / "run"
    shutil.copytree(run_dir, d, ignore=shutil.ignore_patterns("checkpoints", "report*.html"))
    page = write_report(d, map_method="pca", control=control_dir).read_text(encoding="utf-8")
    sec = _section_html(page, "control")
    assert '<section id="control"><h2>Against the nβ = 0 control</h2>' in page
    assert "refused" not in sec and 'class="notice"' not in sec
    mine, ctl = (json.loads((x / "clusters.json").read_text()) for x in (d, control_dir))
    ari, ari_all, both = _ari_text(mine["labels"], ctl["labels"])
    fig = re.search(r'data-fig="ari-control">(.*?)</div>', sec).group(1)
    assert f'<span class="v">{ari}</span>' in fig and f"on the {both:,} tokens both cluster; {ari_all} on all" in fig
    halves = re.search(r'data-fig="ari-halves">(.*?)</div>', sec).group(1)
    assert f'<span class="v">{_fmt(mine["stability"]["ari"])}</span>' in halves
    assert sec.count('class="callout ') == 1
    rows = dict(re.findall(r"<tr><th>(.*?)</th>(.*?)</tr>", sec))
    for i, doc in enumerate((mine, ctl)):
        cells = lambda key: re.findall(r"<td>(.*?)</td>", rows[key])[i]  # noqa: E731
        assert cells("clusters") == str(len(doc["clusters"]))
        share = 100 * np.mean(np.asarray(doc["labels"]) >= 0)
        assert cells("clustered share (not noise)") == f"{share:.1f}%"
        ra = doc["role_agreement"]
        assert (f"purity {_fmt(ra['purity'])} vs {_fmt(ra['purity_shuffled'])} shuffled"
                in cells("token roles: purity vs shuffled labels"))
        assert cells("split-half ARI (cluster stability)") == _fmt(doc["stability"]["ari"])
    sae = json.loads((d / "sae.json").read_text())
    matched = re.findall(r"<td>(.*?)</td>", rows["SAE: matched fraction vs null"])
    assert matched[0].startswith(f"{_fmt(sae['matched_fraction'])} ({sae['n_matched']} of {sae['n_clusters']}) vs "
                                 f"null mean {_fmt(sae['null']['matched_fraction_mean'])}")
    assert "no sae.json" in matched[1]                # the control ran without the SAE stage
    f1 = re.findall(r"<td>(.*?)</td>", rows["SAE: mean best F1 vs null"])[0]
    assert f1.startswith(f"{_fmt(sae['mean_best_f1'])} vs null mean {_fmt(sae['null']['mean_best_f1_mean'])}")
    assert re.findall(r"<td>(.*?)</td>", rows["nβ"])[1] == "0.000"
    # the control named in the run's config.json (what the report stage of a stage=all run reads)
    cfg = json.loads((d / "config.json").read_text())
    cfg["report"]["control"] = str(control_dir)
    (d / "config.json").write_text(json.dumps(cfg))
    assert 'data-fig="ari-control"' in _section_html(write_report(d, map_method="pca").read_text(), "control")
    # a control sampled with the run's own seed shares its noise: said so
    c2 = tmp_path / "same-seed"
    shutil.copytree(control_dir, c2, ignore=shutil.ignore_patterns("checkpoints", "report*.html"))
    cc = json.loads((c2 / "config.json").read_text())
    cc["sampler"]["seed"] = cfg["sampler"]["seed"]
    (c2 / "config.json").write_text(json.dumps(cc))
    sec = _section_html(write_report(d, map_method="pca", control=c2).read_text(), "control")
    assert "share their SGLD noise" in sec and 'data-fig="ari-control"' in sec


def test_control_refused_when_its_tokens_differ(run_dir, control_dir, tmp_path):
    import zarr

    from spectro.report import write_report

    d = tmp_path / "run"
    shutil.copytree(run_dir, d, ignore=shutil.ignore_patterns("checkpoints", "report*.html"))
    c = tmp_path / "control"
    shutil.copytree(control_dir, c, ignore=shutil.ignore_patterns("checkpoints", "report*.html"))
    s = zarr.open_group(str(c / "susceptibilities.zarr"), mode="r+")
    ids = np.array(s["token_id"][:])
    ids[:5] = (ids[:5] + 1) % 96
    s["token_id"][:] = ids
    sec = _section_html(write_report(d, map_method="pca", control=c).read_text(encoding="utf-8"), "control")
    assert "Control refused: 5 of" in sec and "other token ids" in sec
    assert 'data-fig="ari-control"' not in sec and "<table" not in sec
    # no section at all without a control: a pointer to experiment=control, no notice
    sec = _section_html(write_report(d, map_method="pca", control=None).read_text(encoding="utf-8"), "control")
    assert "No control run given" in sec and 'class="notice"' not in sec


def test_control_directory_that_does_not_exist_is_an_error(run_dir, tmp_path):
    from spectro.config import to_config
    from spectro.errors import ConfigError
    from spectro.report import write_report

    missing = tmp_path / "no-such-control"
    with pytest.raises(ConfigError, match="report.control.*does not exist"):
        write_report(run_dir, control=missing)
    with pytest.raises(ConfigError, match=r"report.control must be an existing run directory"):
        to_config({"report": {"control": str(missing)}})
    with pytest.raises(ConfigError, match=r"report.map must be 'umap' or 'pca'"):
        to_config({"report": {"map": "tsne"}})
    with pytest.raises(ConfigError, match="report.map"):
        write_report(run_dir, map_method="tsne")
    cfg = to_config({"report": {"control": str(run_dir), "map": "pca"}})
    assert cfg.report.control == str(run_dir) and cfg.report.map == "pca"
    assert to_config({}).report.map == "umap" and to_config({}).report.control is None


# --------------------------------------------------------------------------- #
# the page in a browser
# --------------------------------------------------------------------------- #


def _chromium(page: Path, tmp: Path, *mode: str, query: str = "") -> subprocess.CompletedProcess:
    args = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp}", "--enable-logging=stderr", "--v=0", "--hide-scrollbars",
            "--window-size=1400,2400", *mode, page.resolve().as_uri() + query]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def _console(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]


def _dom(path: Path, tmp: Path, query: str = "") -> str:
    out = _chromium(path, tmp, "--dump-dom", query=query)
    assert out.returncode == 0, out.stderr[-2000:]
    assert _console(out.stderr) == []       # the page logs nothing: any console line is an error
    return out.stdout


def _cards(dom: str) -> list[str]:
    return re.findall(r'<article class="card" id="cluster-(\d+)"', dom)


needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                                  "(apt-get install -y chromium)")


@needs_chromium
def test_headless_chromium_renders_gallery(report, run_dir, tmp_path):
    path, _ = report
    clusters = json.loads((run_dir / "clusters.json").read_text())["clusters"]
    dom = _dom(path, tmp_path / "p1")
    shown = min(PAGE, len(clusters))        # largest first
    by_size = sorted(clusters, key=lambda c: (-c["size"], c["id"]))
    assert _cards(dom) == [str(c["id"]) for c in by_size[:shown]]
    assert f'data-rendered="{shown}"' in dom
    assert 'id="js-errors" class="notice error" hidden' in dom
    if len(clusters) > PAGE:
        assert f"page 1 of {-(-len(clusters) // PAGE)}" in dom
    else:
        assert "page 1 of" not in dom
    assert "<canvas" in dom and 'class="lg"' in dom   # the map legend was built

    # the top of the page, and the map + gallery with the sections above folded (?fold=...)
    keep = os.environ.get("SPECTRO_REPORT_SCREENSHOTS")     # a folder to keep them in, for a look
    for name, query in [("report-top.png", ""), ("report-gallery.png", "?fold=run,diagnostics,traces,modes")]:
        shot = tmp_path / name
        out = _chromium(path, tmp_path / "p2", f"--screenshot={shot}", query=query)
        assert out.returncode == 0, out.stderr[-2000:]
        assert _console(out.stderr) == []
        assert shot.exists() and shot.stat().st_size > 20_000
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, Path(keep) / name)
    folded = _dom(path, tmp_path / "p2", "?fold=run,diagnostics,traces,modes")
    assert folded.count('class="folded"') == 4 and len(_cards(folded)) == shown


PROBE_JS = """<script>
// test probe, appended to a copy of the page: hover and click a map point, type a search, page on
(function () {
  var out = {}, D = JSON.parse(document.getElementById("report-data").textContent), M = D.map;
  var canvas = document.getElementById("map-canvas"), r = canvas.getBoundingClientRect();
  var i = M.lab.findIndex(function (l) { return l >= 0; });
  var x = r.left + 18 + M.x[i] / 10000 * (r.width - 36), y = r.top + 18 + (1 - M.y[i] / 10000) * (r.height - 36);
  canvas.dispatchEvent(new MouseEvent("mousemove", {clientX: x, clientY: y, bubbles: true}));
  var tip = document.getElementById("map-tip");
  out.tipHidden = tip.hidden; out.tip = tip.textContent; out.tipText = M.tt[M.ti[i]]; out.tipLabel = M.lab[i];
  canvas.dispatchEvent(new MouseEvent("click", {clientX: x, clientY: y, bubbles: true}));
  out.afterClick = Array.prototype.map.call(document.querySelectorAll("#cards article"), function (a) { return a.id; });
  out.query = document.getElementById("q").value;
  document.querySelector("#cards button.onmap").click();
  out.clearShown = !document.getElementById("map-clear").hidden;
  var q = document.getElementById("q");
  q.value = ""; q.dispatchEvent(new Event("input"));
  setTimeout(function () {
    var ids = function () {
      return Array.prototype.map.call(document.querySelectorAll("#cards article"), function (a) { return a.id; });
    };
    out.afterClear = ids();
    var next = document.querySelector("#pager-top button[data-p='1']");
    if (next) { next.click(); out.page2 = ids(); out.pagerText = document.getElementById("pager-top").textContent; }
    var pre = document.createElement("pre"); pre.id = "probe-out"; pre.textContent = JSON.stringify(out);
    document.body.appendChild(pre);
  }, 400);
})();
</script>"""


@needs_chromium
def test_headless_map_hover_click_and_paging(run_dir, tmp_path):
    from spectro.report import write_report

    d = tmp_path / "run"                     # one card per page, so paging happens whenever there are 2 clusters
    shutil.copytree(run_dir, d, ignore=shutil.ignore_patterns("checkpoints", "report*.html"))
    page = write_report(d, page_size=1).read_text(encoding="utf-8")
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE_JS + "</body>"), encoding="utf-8")
    out = _chromium(probe, tmp_path / "p6", "--dump-dom", "--virtual-time-budget=3000")
    assert out.returncode == 0 and _console(out.stderr) == [], out.stderr[-2000:]
    found = re.search(r'<pre id="probe-out">(.*?)</pre>', out.stdout, flags=re.S)
    assert found, "the probe did not finish"
    import html as html_mod
    res = json.loads(html_mod.unescape(found.group(1)))
    vis = res["tipText"].replace(" ", "·").replace("\n", "⏎").replace("\t", "⇥") or "∅"
    assert not res["tipHidden"] and vis in res["tip"] and f"cluster #{res['tipLabel']}" in res["tip"]
    assert res["afterClick"] == [f"cluster-{res['tipLabel']}"] and res["query"] == f"#{res['tipLabel']}"
    assert res["clearShown"]
    n = len(json.loads((run_dir / "clusters.json").read_text())["clusters"])
    assert n >= 2, "the fixture run should have at least two clusters"
    order = [f"cluster-{c['id']}" for c in sorted(json.loads((run_dir / "clusters.json").read_text())["clusters"],
                                                   key=lambda c: (-c["size"], c["id"]))]
    assert res["afterClear"] == order[:1] and res["page2"] == order[1:2]
    assert f"page 2 of {n}" in res["pagerText"]


@needs_chromium
def test_headless_search_and_min_size(report, run_dir, tmp_path):
    path, _ = report
    c = json.loads((run_dir / "clusters.json").read_text())
    labels = np.asarray(c["labels"])
    import xarray as xr
    texts = np.array([str(t) for t in xr.open_zarr(str(run_dir / "susceptibilities.zarr"),
                                                   consolidated=False)["token_text"].values.tolist()], dtype=object)
    # search by token text: exactly the clusters with a member whose text contains it (the dangerous one)
    want = sorted({int(x) for x in labels[(labels >= 0) & (texts == DANGER)]})
    assert want, "the dangerous text should be in some cluster"
    dom = _dom(path, tmp_path / "p3", "?q=" + quote("</script>"))
    got = _cards(dom)
    if len(want) <= PAGE:
        assert sorted(map(int, got)) == want
    else:
        assert len(got) == PAGE and set(map(int, got)) <= set(want)
    cards = dom.split('id="cards"')[1].split('id="pager-bot"')[0]
    assert "&lt;/script&gt;&lt;b&gt;" in cards and "<b>\"x" not in dom   # shown as text, never as markup
    assert 'class="chip hit"' in cards
    # minimum size
    sizes = sorted((cl["size"] for cl in c["clusters"]), reverse=True)
    assert sizes[0] > sizes[-1], "the fixture run should have clusters of different sizes"
    cut = max(sizes[min(2, len(sizes) - 1)], sizes[-1] + 1)         # leaves out at least the smallest cluster
    dom = _dom(path, tmp_path / "p4", f"?min={cut}&page=1")
    n = sum(s >= cut for s in sizes)
    assert 1 <= n < len(sizes) and len(_cards(dom)) == min(n, PAGE)
    assert f"{n} of {len(sizes)} clusters match" in dom
    # by cluster id
    cid = c["clusters"][-1]["id"]
    assert _cards(_dom(path, tmp_path / "p5", "?q=" + quote(f"#{cid}"))) == [str(cid)]
