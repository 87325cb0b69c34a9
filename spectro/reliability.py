"""How far to trust a run: split-half reliability of chi and of the clustering
features, and the plain verdict the summary and the report show.

chi is a Monte Carlo estimate. Its uniform mode (every component responding
alike) is estimated well from few draws; the component-specific pattern that
separates token types needs far more. So every run measures, per component:

    r      = Pearson r over tokens between chi from half A and chi from half B
    rel    = 2 r / (1 + r)        (Spearman-Brown: the reliability of the whole run)

where the halves split the independent units (chains, or antithetic pairs) of
the component *and of the full run* (`estimator.Susceptibility.chi_half`), so
the halves share no draw and `rel` predicts the correlation between this run
and an independent run with another seed. It is computed on raw chi and on the
clustering features (`spectro.features.feature_matrix`: z-scored columns,
centred rows), and summarised by the median over components.

Non-obvious choices:
- Halves that shared the `full` run (as per-chain estimates do) would look
  more alike than two independent runs: every estimate of the peer form is
  centred on E_full[D]. The split therefore splits `full` too.
- Spearman-Brown assumes the noise variance halves when the draws double,
  which holds for a sum over independent units; `draws_factor` inverts it to
  say how many more draws a target reliability needs.
- The verdict needs both the features (median reliability >= `min_reliability`)
  and the clusters (ARI between the clusterings of the two halves >=
  `min_stability`, computed by the clusters stage) to pass.
- R-hat's null (`rhat_null_p`): with a few units of a few dozen draws R-hat
  is itself noisy, and a run takes it over every component, so a sampler
  that mixes perfectly still crosses a fixed threshold in a good share of
  runs (docs/method.md measures the share). A component above the threshold
  is therefore compared with R-hat of independent AR(1) traces of its own
  lag-1 autocorrelation and the run's units and draws (what a sampler whose
  only memory is its step-to-step correlation gives), and counts as not
  mixed only if fewer than `RHAT_FAMILY_ALPHA` / (components) of those reach
  it: a slow mode the lag-1 correlation does not explain, at a run-wide
  false-alarm rate of about 5%.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from spectro.features import DEFAULT_KIND, feature_matrix

MIN_RELIABILITY = 0.8           # median feature reliability for "reliable"
MIN_STABILITY = 0.5             # ARI between the halves' clusterings for "reproducible"
RHAT_NULL_REPS = 2000           # simulated null R-hats per flagged component
RHAT_FAMILY_ALPHA = 0.05        # run-wide false-alarm rate of "not mixed" for a perfectly mixing sampler


def spearman_brown(r: np.ndarray | float, factor: float = 2.0) -> np.ndarray | float:
    """Reliability of an estimate `factor` times as long as the one whose reliability is r."""
    r = np.asarray(r, dtype=np.float64)
    out = factor * r / (1.0 + (factor - 1.0) * r)
    return float(out) if out.ndim == 0 else out


def draws_factor(reliability: float, target: float = MIN_RELIABILITY) -> float:
    """How many times the run's draws reach `target` (Spearman-Brown inverted); inf if reliability <= 0."""
    if not reliability > 0:
        return float("inf")
    if reliability >= target:
        return 1.0
    return target * (1.0 - reliability) / (reliability * (1.0 - target))


def rank_rhat(x: np.ndarray) -> np.ndarray | float:
    """Rank-normalised split R-hat (arviz-stats) of (..., units, draws): one value per leading index."""
    import warnings

    from arviz_stats.base import array_stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = np.asarray(array_stats.rhat(np.asarray(x, dtype=np.float64), chain_axis=-2, draw_axis=-1,
                                          method="rank"))
    return float(out) if out.ndim == 0 else out


def lag1(x: np.ndarray) -> float:
    """Lag-1 autocorrelation of (units, draws) traces, pooled over units (each centred on its own mean)."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(1, keepdims=True)
    den = float((x * x).sum())
    return float((x[:, :-1] * x[:, 1:]).sum() / den) if den > 0 else 0.0


def ar1(rng: np.random.Generator, rho: float, shape: tuple[int, ...]) -> np.ndarray:
    """Stationary AR(1) traces of unit variance and lag-1 correlation rho (clipped to [0, 0.99]) along the last
    axis of `shape`."""
    rho = float(np.clip(rho, 0.0, 0.99))
    e = rng.standard_normal(shape)
    x = np.empty_like(e)
    x[..., 0] = e[..., 0]
    for t in range(1, shape[-1]):
        x[..., t] = rho * x[..., t - 1] + np.sqrt(1.0 - rho * rho) * e[..., t]
    return x


def rhat_null_p(phi: np.ndarray, observed: float, rng: np.random.Generator, reps: int = RHAT_NULL_REPS) -> float:
    """Share of R-hats of `reps` AR(1) runs shaped like `phi` (units, draws), at its lag-1 autocorrelation, that
    reach `observed`; (1 + count) / (1 + reps), so never 0 (module notes)."""
    null = rank_rhat(ar1(rng, lag1(phi), (reps, *np.shape(phi))))          # (reps,)
    return float((1 + np.sum(null >= observed)) / (1 + reps))


def not_mixed(rhat: np.ndarray, rhat_p: np.ndarray, threshold: float) -> np.ndarray:
    """Per component: R-hat above `threshold` and beyond its null (rhat_p below RHAT_FAMILY_ALPHA / the number of
    components with an R-hat; module notes). A NaN R-hat (fewer than 2 units or 4 draws) counts as not shown mixed;
    rhat_p is only read where R-hat is above the threshold."""
    rhat, rhat_p = np.asarray(rhat, dtype=np.float64), np.asarray(rhat_p, dtype=np.float64)
    beyond = ~(rhat_p >= RHAT_FAMILY_ALPHA / max(int(np.isfinite(rhat).sum()), 1))
    return ~(rhat <= threshold) & beyond


def column_correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of each column of a with the same column of b (tokens, k) -> (k,); NaN for a constant column."""
    a = np.asarray(a, dtype=np.float64) - np.mean(a, axis=0)
    b = np.asarray(b, dtype=np.float64) - np.mean(b, axis=0)
    num = (a * b).sum(0)
    den = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    return np.divide(num, den, out=np.full(num.shape, np.nan), where=den > 0)


def split_half(chi_half: np.ndarray, components: Sequence[str], kind: str = DEFAULT_KIND) -> Optional[dict]:
    """Reliability per component from chi_half (2, tokens, components) of the clustered components.

    Returns None when the halves are missing (fewer than two units in a run)."""
    chi_half = np.asarray(chi_half, dtype=np.float64)
    keep = np.isfinite(chi_half).all(axis=(0, 1))
    if chi_half.shape[0] != 2 or not keep.any():
        return None
    names = [c for c, k in zip(components, keep) if k]
    h0, h1 = chi_half[0][:, keep], chi_half[1][:, keep]
    r_raw = column_correlations(h0, h1)
    if len(names) >= 2 or kind != "centred":
        r_feat = column_correlations(feature_matrix(h0, kind), feature_matrix(h1, kind))
    else:                                  # one component: nothing left after centring
        r_feat = np.full(1, np.nan)
    rel_raw, rel_feat = spearman_brown(r_raw), spearman_brown(r_feat)

    def stat(f, x):
        return float(f(x)) if np.isfinite(x).any() else float("nan")

    med = stat(np.nanmedian, rel_feat)
    return {
        "method": "split halves of independent units, each with its own half of full; Spearman-Brown",
        "features": kind,
        "components": names,
        "split_raw": [float(x) for x in r_raw],
        "split_features": [float(x) for x in r_feat],
        "raw": [float(x) for x in rel_raw],
        "features_reliability": [float(x) for x in rel_feat],
        "raw_median": stat(np.nanmedian, rel_raw),
        "features_median": med,
        "features_min": stat(np.nanmin, rel_feat),
        "least_reliable": names[int(np.nanargmin(rel_feat))] if np.isfinite(rel_feat).any() else None,
        "draws_factor_for_target": draws_factor(med),
        "target": MIN_RELIABILITY,
    }


def verdict(reliability: Optional[dict], stability: Optional[dict] = None, not_mixed: Sequence[str] = ()) -> dict:
    """The plain verdict: {"ok": bool, "text": str, "reasons": [...]}, from the figures above."""
    reasons, ok = [], True
    if reliability is None:
        return {"ok": False, "text": "reliability unknown: the run has fewer than 2 independent units per run "
                "(raise sampler.num_chains)", "reasons": []}
    med = reliability["features_median"]
    if not np.isfinite(med):
        ok = False
        reasons.append("feature reliability undefined (fewer than two components to compare)")
    elif med >= reliability["target"]:
        reasons.append(f"feature reliability {med:.2f} (median over components) >= {reliability['target']}")
    else:
        ok = False
        factor = reliability["draws_factor_for_target"]
        more = f"about {factor:.1f}x the draws" if np.isfinite(factor) else "far more draws"
        reasons.append(f"feature reliability {med:.2f} < {reliability['target']}: run longer chains ({more} "
                       f"to reach {reliability['target']})")
    if stability is not None and stability.get("ari") is not None:
        ari = stability["ari"]
        if ari >= MIN_STABILITY:
            reasons.append(f"clusters of the two halves agree (ARI {ari:.2f} >= {MIN_STABILITY})")
        else:
            ok = False
            halves = stability.get("n_clusters_halves") or []
            if halves and min(halves) <= 1:
                reasons.append(f"a half of the draws finds no cluster structure (the halves find "
                               f"{' and '.join(map(str, halves))} clusters; ARI {ari:.2f} < {MIN_STABILITY})")
            else:
                reasons.append(f"clusters of the two halves disagree (ARI {ari:.2f} < {MIN_STABILITY})")
    if not_mixed:
        ok = False
        reasons.append(f"R-hat above threshold and beyond its null for {len(not_mixed)} component(s): "
                       f"{', '.join(list(not_mixed)[:6])}")
    if stability is None:
        text = "chi reliable" if ok else "not reliable: run longer chains"
    elif ok:
        text = "clusters reproducible"
    elif np.isfinite(med) and med >= reliability["target"] and not not_mixed:
        # more draws will not help much here: the features are reliable, their cluster structure is not
        text = "clusters not reproducible: the features are reliable, but no cluster structure is stable"
    else:
        text = "clusters not reproducible: run longer chains"
    return {"ok": ok, "text": text, "reasons": reasons}
