"""Honest uncertainty: chi_se covers the known value, and the within-run
reliability predicts what an independent run gives.

The draws are synthetic but have the structure of real ones: per chain an
AR(1) latent u (the chain's position), the observable phi = a + sd_phi * u,
per-token losses l = m(x) + beta(x) * u + sd_l * v(x) with AR(1) v, and a
`full` run with its own means and a stronger autocorrelation. Antithetic
pairs negate the innovations of the odd chain. The population value of the
peer form is then known exactly:

    chi = E_C[phi (s - l)] - E_C[phi] E_F[s - l],   s = init + phi
        = a^2 + sd_phi^2 - a m_C - sd_phi beta - a a_F + a m_F
"""

import numpy as np
import pytest

from spectro.estimator import ChainMoments, susceptibility, t_quantile, units_of
from spectro.features import feature_matrix
from spectro.reliability import (column_correlations, draws_factor, lag1, rank_rhat, rhat_null_p, spearman_brown,
                                 split_half, verdict)
from spectro.reliability import ar1 as ar1_traces

INIT = 3.0


def ar1(rng, shape, rho, antithetic=False):
    """Unit-variance AR(1) along axis -2 of (..., chains, draws, k); odd chains mirror even ones if antithetic."""
    e = rng.standard_normal(shape)
    if antithetic:
        e[..., 1::2, :, :] = -e[..., 0::2, :, :]
    x = np.empty(shape)
    x[..., 0, :] = e[..., 0, :]
    c = np.sqrt(1 - rho ** 2)
    for t in range(1, shape[-2]):
        x[..., t, :] = rho * x[..., t - 1, :] + c * e[..., t, :]
    return x


def draws(rng, m, beta, a, sd_phi, sd_l, chains, n, rho, antithetic=False):
    """sampling loss (..., chains, n) and probe losses (..., chains, n, tokens) with the structure above."""
    lead = m.shape[:-1]
    u = ar1(rng, (*lead, chains, n, 1), rho, antithetic)
    v = ar1(rng, (*lead, chains, n, m.shape[-1]), rho, antithetic)
    phi = a + sd_phi * u[..., 0]
    s = INIT + phi
    lo = m[..., None, None, :] + beta[..., None, None, :] * u + sd_l * v
    return s, lo


def moments(s, lo):
    return [ChainMoments(lo.shape[-1]).add(s[k], lo[k], INIT) for k in range(s.shape[0])]


def exact_chi(m_c, beta, a, sd_phi, a_f, m_f):
    return a * a + sd_phi ** 2 - a * m_c - sd_phi * beta - a * a_f + a * m_f


@pytest.mark.parametrize("chains,antithetic", [(4, False), (4, True), (8, True)])
def test_chi_se_interval_covers_the_known_value(chains, antithetic):
    """600 replicate runs of 5 tokens: the 95% t-interval chi ± t(dof) chi_se covers the exact value in
    90-99% of the 3,000 intervals, also with only two antithetic pairs and a strongly autocorrelated full run
    whose noise every estimate shares."""
    rng = np.random.default_rng(chains + 10 * antithetic)
    T, R, N = 5, 600, 60
    m_c = np.array([3.0, 3.5, 2.0, 4.0, 3.2])
    m_f = m_c + np.array([0.5, 1.0, 0.2, 2.0, 0.0])
    beta = np.array([0.05, -0.10, 0.02, 0.20, 0.0])
    a, sd_phi, a_f = 0.2, 0.05, 1.0
    exact = exact_chi(m_c, beta, a, sd_phi, a_f, m_f)
    s, lo = draws(rng, np.broadcast_to(m_c, (R, T)), np.broadcast_to(beta, (R, T)), a, sd_phi, 0.5, chains, N,
                  rho=0.6, antithetic=antithetic)
    fs, flo = draws(rng, np.broadcast_to(m_f, (R, T)), np.broadcast_to(0.3 * beta, (R, T)), a_f, 0.1, 1.0, chains,
                    N, rho=0.95, antithetic=antithetic)
    units = units_of(chains, antithetic)
    covered = []
    for r in range(R):
        est = susceptibility(moments(s[r], lo[r]), moments(fs[r], flo[r]), "peer", units, units)
        q = t_quantile(est.se_dof)
        covered.append(np.abs(est.chi - exact) <= q * est.chi_se)
    rate = np.mean(covered)
    assert 0.90 <= rate <= 0.99, f"coverage {rate:.3f} (chains {chains}, antithetic {antithetic})"


def test_standard_error_without_full_noise_would_under_cover():
    """The control for the test above: the per-chain spread with E_full fixed (the earlier chi_se) misses the
    noise of the full run and covers far less than 95% when that run is noisy."""
    rng = np.random.default_rng(3)
    T, R, N, K = 5, 400, 60, 8
    m_c = np.linspace(2.0, 4.0, T)
    m_f = m_c + 1.0
    beta = np.zeros(T)
    a, sd_phi, a_f = 0.5, 0.05, 1.0
    exact = exact_chi(m_c, beta, a, sd_phi, a_f, m_f)
    s, lo = draws(rng, np.broadcast_to(m_c, (R, T)), np.broadcast_to(beta, (R, T)), a, sd_phi, 0.3, K, N, rho=0.5)
    fs, flo = draws(rng, np.broadcast_to(m_f, (R, T)), np.broadcast_to(beta, (R, T)), a_f, 0.1, 1.0, K, N, rho=0.95)
    ours, old = [], []
    for r in range(R):
        est = susceptibility(moments(s[r], lo[r]), moments(fs[r], flo[r]))
        old_se = est.chi_per_chain.std(0, ddof=1) / np.sqrt(K)
        ours.append(np.abs(est.chi - exact) <= t_quantile(est.se_dof) * est.chi_se)
        old.append(np.abs(est.chi - exact) <= t_quantile(K - 1) * old_se)
    assert 0.90 <= np.mean(ours) <= 0.99
    assert np.mean(old) < 0.8, f"per-chain spread covered {np.mean(old):.3f}: the control lost its power"


def planted_run(rng, truth, chains, n, sd_l, full_sd_l, antithetic=False):
    """One run's chi and chi_half for every planted component, sharing one full run."""
    m_c, beta, a, m_f = truth
    C, T = m_c.shape
    fs, flo = draws(rng, m_f[None], 0.0 * m_f[None], 1.0, 0.1, full_sd_l, chains, n, rho=0.95,
                    antithetic=antithetic)
    full = moments(fs[0], flo[0])
    units = units_of(chains, antithetic)
    chi, half, half_shared = np.empty((T, C)), np.empty((2, T, C)), np.empty((2, T, C))
    s, lo = draws(rng, m_c, beta, a[:, None, None], 0.05, sd_l, chains, n, rho=0.6, antithetic=antithetic)
    for c in range(C):
        comp = moments(s[c], lo[c])
        est = susceptibility(comp, full, "peer", units, units)
        chi[:, c], half[:, :, c] = est.chi, est.chi_half
        k = len(units) // 2
        for h, us in enumerate((units[:k], units[k:])):   # halves that share the whole full run (the naive split)
            idx = [i for u in us for i in u]
            half_shared[h, :, c] = susceptibility([comp[i] for i in idx], full, "peer").chi
    return chi, half, half_shared


def test_within_run_reliability_predicts_an_independent_run():
    """Planted components: a strong uniform mode (a token's overall sensitivity, shared by every component)
    plus a weaker component-specific pattern, per-token noise of known size, and a noisy, autocorrelated full
    run. The run's split-half figure (its own halves of full, Spearman-Brown) is within 0.06 of the correlation
    between two independent runs, on raw chi and on the features; halves that share full overstate raw
    reliability by far more."""
    rng = np.random.default_rng(7)
    C, T = 10, 1500
    uniform = rng.lognormal(0.0, 0.6, T)                             # (tokens,)
    pattern = rng.standard_normal((C, T)) * np.linspace(0.05, 0.3, C)[:, None]
    m_c = 3.0 + uniform[None, :] * rng.uniform(0.5, 1.5, (C, 1)) + pattern
    beta = 0.02 * rng.standard_normal((C, T))
    a = rng.uniform(0.05, 0.5, C)
    m_f = 3.0 + 3.0 * uniform
    truth = (m_c, beta, a, m_f)
    runs = [planted_run(rng, truth, chains=8, n=40, sd_l=1.5, full_sd_l=3.0) for _ in range(3)]
    cross_raw, cross_feat = [], []
    for i in range(3):
        for j in range(i + 1, 3):
            cross_raw.append(np.median(column_correlations(runs[i][0], runs[j][0])))
            cross_feat.append(np.median(column_correlations(feature_matrix(runs[i][0]), feature_matrix(runs[j][0]))))
    names = [f"c{c}" for c in range(C)]
    within = [split_half(r[1], names) for r in runs]
    shared = [split_half(r[2], names) for r in runs]
    within_raw = np.mean([w["raw_median"] for w in within])
    within_feat = np.mean([w["features_median"] for w in within])
    shared_raw = np.mean([w["raw_median"] for w in shared])
    assert abs(within_raw - np.mean(cross_raw)) < 0.06, (within_raw, cross_raw)
    assert abs(within_feat - np.mean(cross_feat)) < 0.06, (within_feat, cross_feat)
    assert shared_raw - np.mean(cross_raw) > 0.1, (shared_raw, cross_raw)   # the naive split is fooled
    assert 0.2 < np.mean(cross_feat) < 0.95                                   # neither trivial nor hopeless


def test_spearman_brown_and_draws_factor():
    assert spearman_brown(0.5) == pytest.approx(2 / 3)
    assert spearman_brown(0.6, factor=1.0) == pytest.approx(0.6)
    # draws_factor inverts Spearman-Brown: that many times the draws reach the target
    r = 0.6
    assert spearman_brown(r, draws_factor(r, 0.8)) == pytest.approx(0.8)
    assert draws_factor(0.9, 0.8) == 1.0 and draws_factor(0.0) == float("inf")


def test_verdict_reads_the_figures():
    rel = {"features_median": 0.85, "target": 0.8, "draws_factor_for_target": 1.0}
    assert verdict(rel, {"ari": 0.7})["ok"] and verdict(rel, {"ari": 0.7})["text"] == "clusters reproducible"
    bad = verdict({"features_median": 0.5, "target": 0.8, "draws_factor_for_target": 4.0}, {"ari": 0.7})
    assert not bad["ok"] and "run longer chains" in bad["text"] and "4.0x the draws" in bad["reasons"][0]
    weak = verdict(rel, {"ari": 0.2})
    assert not weak["ok"] and weak["text"] == ("clusters not reproducible: the features are reliable, but no cluster "
                                               "structure is stable")
    assert weak["reasons"][1] == "clusters of the two halves disagree (ARI 0.20 < 0.5)"
    flat = verdict(rel, {"ari": 0.0, "n_clusters_halves": [1, 2]})
    assert flat["reasons"][1] == "a half of the draws finds no cluster structure (the halves find 1 and 2 clusters; " \
                                 "ARI 0.00 < 0.5)"
    assert not verdict(rel, None, not_mixed=["l0h1"])["ok"]
    assert not verdict(None)["ok"]


def test_ar1_has_the_asked_correlation_and_lag1_reads_it():
    x = ar1_traces(np.random.default_rng(0), 0.5, (4, 20000))
    assert x.var() == pytest.approx(1.0, abs=0.03)
    assert lag1(x) == pytest.approx(0.5, abs=0.02)
    assert lag1(ar1_traces(np.random.default_rng(1), 0.0, (2, 20000))) == pytest.approx(0.0, abs=0.02)


def test_rhat_null_p_separates_a_slow_mode_from_r_hat_noise():
    """Two units of 40 draws: units that sit at different levels (a mode the chains did not cross) have a p at the
    floor 1 / (reps + 1); a perfectly mixing pair at the null's median R-hat has p about 0.5; p is the share of null
    R-hats that reach the observed one, so it falls as R-hat rises."""
    rng = np.random.default_rng(3)
    slow = ar1_traces(rng, 0.06, (2, 40)) + np.array([[1.5], [-1.5]])
    assert rank_rhat(slow) > 1.5
    assert rhat_null_p(slow, rank_rhat(slow), np.random.default_rng(0), reps=500) == pytest.approx(1 / 501)
    mixing = ar1_traces(rng, 0.06, (2, 40))
    median = float(np.median(rank_rhat(ar1_traces(np.random.default_rng(9), lag1(mixing), (4000, 2, 40)))))
    assert rhat_null_p(mixing, median, np.random.default_rng(0), reps=2000) == pytest.approx(0.5, abs=0.04)
    ps = [rhat_null_p(mixing, r, np.random.default_rng(0), reps=500) for r in (1.02, 1.06, 1.1, 1.2)]
    assert ps == sorted(ps, reverse=True) and ps[-1] < ps[0]
