"""Compare two finished runs on the same probe tokens: do their numbers hold?

    python benchmarks/compare_runs.py runs/seed0 runs/seed1             # two seeds of one setting
    python benchmarks/compare_runs.py runs/seed0 runs/seed1 --control runs/control

Prints, for the two runs A and B:
- R-hat (max over components, `full` included) and bulk ESS (min) of each;
- agreement of chi between the runs: Pearson r per component of raw chi and of
  the clustering features (z-scored columns, centred rows), median and min
  over components, next to each run's own within-run reliability (what the
  run predicted the agreement would be);
- their clusters: count, share of probe tokens clustered, the adjusted Rand
  index between the two labellings on the tokens both cluster (and on all
  tokens), and each run's split-half stability;
- role purity against the largest of 20 shuffled-role baselines, and the SAE
  check (matched fraction and mean best F1 against the null's 95% quantile),
  from each run's clusters.json / sae.json;
- locality: E[phi] of `full` and the largest displacement of each run;
- known answers (labelled probe tokens): per label the best cluster's F1 and
  the readout AUC of each run, from clusters.json;
- with --control: the same cluster agreement, role purity, SAE and known-answer
  figures for the control against run A, and the agreement of A's features
  with the control's, raw and divided by sqrt(reliability A x reliability
  control) per component (noise-corrected: 1 means the same signal), and the
  difference of their known-answer F1 per label.

Every agreement figure comes with a 95% interval from a bootstrap over probe
contexts (tokens of one context are resampled together, since they share
their context; `--bootstrap` resamples, 200 by default): a figure is
`value [low, high]`. The reliabilities that correct for noise are taken as
fixed, so the corrected interval is somewhat too narrow.

Nothing is recomputed that the runs did not write, except the correlations
and ARIs; the figures in docs/calibration.md come from this script.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sklearn.metrics import adjusted_rand_score  # noqa: E402

from spectro.features import feature_matrix  # noqa: E402
from spectro.known_answers import MIN_POSITIVES, best_cluster  # noqa: E402
from spectro.reliability import column_correlations  # noqa: E402
from spectro.roles import role_agreement, token_roles  # noqa: E402
from spectro.store import read_susceptibilities  # noqa: E402


def load(run: Path) -> dict:
    ds = read_susceptibilities(run / "susceptibilities.zarr")
    clusters = json.loads((run / "clusters.json").read_text())
    sae = json.loads((run / "sae.json").read_text()) if (run / "sae.json").exists() else None
    names = [str(c) for c in ds["component"].values]
    comps = clusters["components"]
    chi = np.asarray(ds["chi"].values, dtype=np.float64)[:, [names.index(c) for c in comps]]
    return {"dir": run, "ds": ds, "names": names, "components": comps, "chi": chi, "clusters": clusters, "sae": sae,
            "labels": np.asarray(clusters["labels"]), "token_id": np.asarray(ds["token_id"].values),
            "text": [str(t) for t in ds["token_text"].values], "source": [str(s) for s in ds["token_source"].values],
            "context": np.asarray(ds["token_context"].values),
            "positives": {n: np.asarray(ds["token_labels"].values[:, i], dtype=bool)
                          for i, n in enumerate(ds["label"].values)} if "token_labels" in ds else {}}


def bootstrap(stat, context: np.ndarray, n: int, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of stat(rows) over `n` resamples of whole contexts (module notes)."""
    ids, inverse = np.unique(context, return_inverse=True)
    members = [np.flatnonzero(inverse == i) for i in range(ids.size)]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        rows = np.concatenate([members[i] for i in rng.integers(0, ids.size, ids.size)])
        v = stat(rows)
        if v is not None and np.isfinite(v):
            out.append(v)
    if not out:
        return float("nan"), float("nan")
    lo, hi = np.percentile(out, [2.5, 97.5])
    return float(lo), float(hi)


def with_interval(value: float, stat, context: np.ndarray, n: int) -> str:
    if n <= 0:
        return f"{value:.3f}"
    lo, hi = bootstrap(stat, context, n)
    return f"{value:.3f} [{lo:.3f}, {hi:.3f}]"


def co_clustered_ari(a: np.ndarray, b: np.ndarray) -> float:
    both = (a >= 0) & (b >= 0)
    return float(adjusted_rand_score(a[both], b[both])) if both.sum() > 1 else float("nan")


def best_f1_of(labels: np.ndarray, positive: np.ndarray) -> float:
    b = best_cluster(labels, positive)
    return b["f1"] if b else 0.0


def mixing(r: dict) -> str:
    rhat, ess = r["ds"]["rhat"].values, r["ds"]["ess_bulk"].values
    bad = [n for n, v in zip(r["names"], rhat) if not v <= 1.1]
    return (f"R-hat max {np.nanmax(rhat):.3f} ({len(bad)} of {len(rhat)} above 1.1{': ' + ', '.join(bad) if bad else ''})"
            f", bulk ESS min {np.nanmin(ess):.0f}")


def cluster_agreement(a: np.ndarray, b: np.ndarray, context: np.ndarray, n_boot: int) -> str:
    both = (a >= 0) & (b >= 0)
    ari = with_interval(co_clustered_ari(a, b), lambda rows: co_clustered_ari(a[rows], b[rows]), context, n_boot)
    return f"ARI {ari} on the {both.sum()} tokens both cluster, {adjusted_rand_score(a, b):.3f} on all tokens"


def clusters_line(r: dict) -> str:
    c, lab = r["clusters"], r["labels"]
    stab = c.get("stability") or {}
    s = f"{c['n_clusters']} clusters, {(lab >= 0).mean():.1%} of tokens clustered"
    if stab.get("ari") is not None:
        s += f", split-half stability ARI {stab['ari']:.3f}"
    return s


def roles_line(r: dict, shuffles: int = 20) -> str:
    ra = role_agreement(r["labels"], token_roles(r["text"], r["source"]), seed=0, shuffles=shuffles)
    base = ra["purity_shuffled_max"]
    ratio = ra["purity"] / base if base else float("nan")
    return f"role purity {ra['purity']:.3f} vs shuffled max {base:.3f} ({ratio:.2f}x)"


def sae_line(r: dict) -> str:
    s = r["sae"]
    if s is None:
        return "SAE: not run"
    null = s.get("null") or {}
    q = null.get("matched_fraction_q95", float("nan"))
    fq = null.get("mean_best_f1_q95", float("nan"))
    mf, bf = s.get("matched_fraction"), s.get("mean_best_f1")
    if mf is None or bf is None:
        return "SAE: no clusters to match"
    return f"SAE: matched {mf:.3f} (null q95 {q:.3f}), mean best F1 {bf:.3f} (null q95 {fq:.3f})"


def locality_line(r: dict) -> str:
    ds, names = r["ds"], r["names"]
    if "mean_phi" not in ds:
        return "locality: not recorded"
    phi = dict(zip(names, np.asarray(ds["mean_phi"].values, dtype=float)))
    disp = np.asarray(ds["displacement"].values, dtype=float)
    i = int(np.nanargmax(disp))
    return f"E[phi] full {phi.get('full', float('nan')):.3f} nats, displacement max {disp[i]:.3f} ({names[i]})"


def answers_line(r: dict) -> str:
    ka = r["clusters"].get("known_answers") or {}
    parts = []
    for e in ka.get("labels", []):
        if "best_cluster" not in e:
            continue
        f1 = (e["best_cluster"] or {}).get("f1")
        auc, rf1 = e.get("readout_auc"), e.get("readout_f1")
        parts.append(f"{e['label']} F1 {f1 if f1 is None else round(f1, 2)} AUC {auc if auc is None else round(auc, 2)}"
                     + ("" if rf1 is None else f" readout F1 {rf1:.2f}"))
    return "known answers: " + ("; ".join(parts) if parts else "none (no labels)")


def corrected(r: np.ndarray, a: dict, b: dict) -> np.ndarray:
    """r per component divided by sqrt of the two runs' feature reliabilities (NaN where either is <= 0)."""
    if "reliability_features" not in a["ds"] or "reliability_features" not in b["ds"]:
        return np.full(r.shape, np.nan)                 # a run without split halves has no reliability
    ra = np.asarray(a["ds"]["reliability_features"].values, dtype=float)
    rb = np.asarray(b["ds"]["reliability_features"].values, dtype=float)
    ia = [a["names"].index(c) for c in a["components"]]
    den = np.sqrt(np.clip(ra[ia], 0, None) * np.clip(rb[ia], 0, None))
    return np.divide(r, den, out=np.full(r.shape, np.nan), where=den > 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--control", type=Path, default=None)
    ap.add_argument("--bootstrap", type=int, default=200, help="resamples of contexts for the intervals (0: none)")
    args = ap.parse_args()
    A, B = load(args.a), load(args.b)
    if not np.array_equal(A["token_id"], B["token_id"]) or A["components"] != B["components"]:
        print("the runs have different probe tokens or components: nothing to compare", file=sys.stderr)
        return 2
    for tag, r in (("A", A), ("B", B)):
        rel = r["ds"].attrs.get("reliability") or {}
        print(f"{tag} {r['dir']}: {mixing(r)}")
        print(f"   within-run reliability: raw median {rel.get('raw_median', float('nan')):.3f}, features median "
              f"{rel.get('features_median', float('nan')):.3f} (min {rel.get('features_min', float('nan')):.3f})")
        print(f"   {clusters_line(r)}; {roles_line(r)}; {sae_line(r)}")
        print(f"   {locality_line(r)}; {answers_line(r)}")
    ctx, nb = A["context"], args.bootstrap
    raw = column_correlations(A["chi"], B["chi"])
    fa, fb = feature_matrix(A["chi"]), feature_matrix(B["chi"])
    feat = column_correlations(fa, fb)
    med = with_interval(float(np.median(feat)), lambda rows: np.median(column_correlations(fa[rows], fb[rows])), ctx, nb)
    print(f"A vs B chi: raw r median {np.median(raw):.3f} (min {raw.min():.3f}); features r median "
          f"{med} (min {feat.min():.3f}, {A['components'][int(np.argmin(feat))]})")
    print("   per component: " + " ".join(f"{c}:{v:.2f}" for c, v in zip(A["components"], feat)))
    print(f"A vs B clusters: {cluster_agreement(A['labels'], B['labels'], ctx, nb)}")
    if args.control:
        C = load(args.control)
        if not np.array_equal(A["token_id"], C["token_id"]):
            print("the control has different probe tokens", file=sys.stderr)
            return 2
        print(f"control {C['dir']}: {mixing(C)}")
        print(f"   {clusters_line(C)}; {roles_line(C)}; {sae_line(C)}")
        print(f"   {locality_line(C)}; {answers_line(C)}")
        print(f"A vs control clusters: {cluster_agreement(A['labels'], C['labels'], ctx, nb)}")
        fc = feature_matrix(C["chi"])
        cf = column_correlations(fa, fc)
        cc = corrected(cf, A, C)
        noise = ("no reliabilities to correct with" if not np.isfinite(cc).any() else
                 "noise-corrected median " + with_interval(
                     float(np.nanmedian(cc)), lambda rows: np.nanmedian(corrected(column_correlations(fa[rows], fc[rows]),
                                                                                  A, C)), ctx, nb)
                 + f" (min {np.nanmin(cc):.3f}, {A['components'][int(np.nanargmin(cc))]})")
        med = with_interval(float(np.median(cf)), lambda rows: np.median(column_correlations(fa[rows], fc[rows])), ctx, nb)
        print(f"A vs control features r median {med} (min {cf.min():.3f}); {noise}")
        for label, pos in A["positives"].items():
            if pos.sum() < MIN_POSITIVES:
                continue
            gap = best_f1_of(A["labels"], pos) - best_f1_of(C["labels"], pos)
            diff = with_interval(gap, lambda rows: best_f1_of(A["labels"][rows], pos[rows])
                                 - best_f1_of(C["labels"][rows], pos[rows]), ctx, nb)
            print(f"A - control, {label} best-cluster F1: {diff}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
