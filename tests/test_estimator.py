"""The susceptibility estimator against closed forms.

On the Gaussian posterior of linear regression (tests/test_sgld.py), the
sampling loss and every probe loss are quadratics in w, and the covariance of
two quadratics under N(μ, Σ) is known exactly:

    q_i(w) = ½ wᵀA_i w - b_iᵀ w + c_i
    Cov(q_1, q_2) = ½ tr(A_1 Σ A_2 Σ) + (A_1 μ - b_1)ᵀ Σ (A_2 μ - b_2)

so chi = Cov(phi, s - l_k) = Var(s) - Cov(s, l_k) is checked against SGLD draws
pushed through the estimator, with z-scores from its own standard errors."""

import numpy as np
import pytest
import torch

from spectro.estimator import ChainMoments, susceptibility, susceptibility_from_arrays
from spectro.sgld import SGLDHyper, build
from tests.helpers import closed_form, loss_fn, regression_problem


def quad(X, y):
    n = X.shape[0]
    return X.T @ X / n, X.T @ y / n          # A, b with q(w) = ½ wᵀAw - bᵀw + const


def cov_quad(q1, q2, mu, sigma):
    (A1, b1), (A2, b2) = q1, q2
    return 0.5 * torch.trace(A1 @ sigma @ A2 @ sigma) + (A1 @ mu - b1) @ sigma @ (A2 @ mu - b2)


def sgld_draws(X, y, anchor, hyper, n_chains, n_draws, thin, burn, seed):
    sampler = build(hyper, {"w": anchor}, {"w": None}, loss_fn)
    state = sampler.init(n_chains)
    gens = [torch.Generator().manual_seed(seed * 100 + c) for c in range(n_chains)]
    batch = (X.expand(n_chains, *X.shape), y.expand(n_chains, *y.shape))
    out = []
    for t in range(burn + n_draws * thin):
        state, _ = sampler.update(state, batch, gens)
        if t >= burn and (t - burn) % thin == thin - 1:
            out.append(state.params["w"].clone())
    return torch.stack(out, 1)                 # (chains, draws, d)


def losses(W, Xs, ys, Xp, yp):
    """W (chains, draws, d) -> sampling loss (chains, draws), probe loss (chains, draws, k)."""
    rs = ys - torch.einsum("nd,ctd->ctn", Xs, W)
    rp = yp - torch.einsum("kd,ctd->ctk", Xp, W)
    return (0.5 * rs * rs).mean(-1).numpy(), (0.5 * rp * rp).numpy()


@pytest.fixture(scope="module")
def setup():
    X, y, w_hat = regression_problem(d=2, n=200, seed=4)
    anchor = w_hat + torch.tensor([0.2, 0.1], dtype=torch.float64)
    nbeta, gamma, eps = 4.0, 2.0, 0.05
    hyper = SGLDHyper(step_size=eps, nbeta=nbeta, gamma=gamma)
    mu, sigma = closed_form(X, y, w_hat, anchor, nbeta, gamma, eps)
    g = torch.Generator().manual_seed(9)
    Xs, ys = X[:64], y[:64]                    # the fixed "sampling set"
    Xp = torch.randn(6, 2, generator=g, dtype=torch.float64)
    yp = Xp @ w_hat + torch.randn(6, generator=g, dtype=torch.float64)
    qs = quad(Xs, ys)
    exact = []
    for k in range(6):
        qk = (torch.outer(Xp[k], Xp[k]), yp[k] * Xp[k])
        exact.append(float(cov_quad(qs, qs, mu, sigma) - cov_quad(qs, qk, mu, sigma)))
    init = float((0.5 * (ys - Xs @ anchor) ** 2).mean())
    comp = losses(sgld_draws(X, y, anchor, hyper, 16, 400, 5, 200, seed=1), Xs, ys, Xp, yp)
    full = losses(sgld_draws(X, y, anchor, hyper, 16, 400, 5, 200, seed=2), Xs, ys, Xp, yp)
    return np.array(exact), init, comp, full


@pytest.mark.parametrize("form", ["covariance", "peer"])
def test_estimator_recovers_closed_form_covariance(setup, form):
    exact, init, (s, l), (fs, fl) = setup
    est = susceptibility_from_arrays(s, l, init, fs, fl, form=form)
    z = (est.chi - exact) / est.chi_se
    assert np.all(np.abs(z) < 5), f"{form}: chi {est.chi} exact {exact} z {z}"
    # the signal is real: some exact values are many of their own standard errors from zero
    assert np.max(np.abs(exact) / est.chi_se) > 5
    assert est.chi_per_chain.shape == (16, 6)


def test_moments_merge_equals_single_pass_and_peer_formula():
    rng = np.random.default_rng(0)
    s = rng.normal(3, 0.1, size=(3, 40))
    l = rng.normal(3, 1.0, size=(3, 40, 7))
    fs = rng.normal(3, 0.1, size=(2, 30))
    fl = rng.normal(3, 1.0, size=(2, 30, 7))
    init = 2.95
    whole = susceptibility_from_arrays(s, l, init, fs, fl)
    chunked = []
    for c in range(3):
        m = ChainMoments(7)
        for a, b in [(0, 13), (13, 29), (29, 40)]:
            m = m.merge(ChainMoments(7).add(s[c, a:b], l[c, a:b], init))
        chunked.append(m)
    full = [ChainMoments(7).add(fs[c], fl[c], init) for c in range(2)]
    other = susceptibility(chunked, full)
    np.testing.assert_allclose(other.chi, whole.chi, rtol=1e-12, atol=1e-15)
    # the devinterp formula, written out: E[phi*s] - E[phi*l] - E[phi] * (E_full[s] - E_full[l])
    phi = s - init
    ref = (phi * s).mean() - (phi[:, :, None] * l).mean((0, 1)) - phi.mean() * (fs.mean() - fl.mean((0, 1)))
    np.testing.assert_allclose(whole.chi, ref, rtol=1e-10, atol=1e-14)
    cov = susceptibility_from_arrays(s, l, init, fs, fl, form="covariance")
    D = s[:, :, None] - l
    ref_cov = ((phi[:, :, None] - phi.mean()) * (D - D.mean((0, 1)))).mean((0, 1))
    np.testing.assert_allclose(cov.chi, ref_cov, rtol=1e-10, atol=1e-14)


def test_estimator_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown estimator form"):
        susceptibility([ChainMoments(2).add(np.ones(2), np.ones((2, 2)), 0.0)],
                       [ChainMoments(2).add(np.ones(2), np.ones((2, 2)), 0.0)], form="bogus")
    with pytest.raises(ValueError, match="no draws"):
        susceptibility([ChainMoments(2)], [ChainMoments(2).add(np.ones(2), np.ones((2, 2)), 0.0)])


# --------------------------------------------------------------------------- #
# what the two forms estimate (docs/method.md, "What the estimator estimates")
# --------------------------------------------------------------------------- #


def _quadratic_world(coupled: bool, seed: int = 0):
    """A Gaussian 'full localised posterior' over w = (a, b) (a: the component's 3 weights, b: the rest, 4) with
    quadratic sampling loss L and probe loss l; `coupled` adds a-b cross terms to both losses and a-b
    correlation to the posterior."""
    rng = np.random.default_rng(seed)
    p, q = 3, 4
    n = p + q

    def sym(scale):
        m = rng.normal(size=(n, n)) * scale
        return m @ m.T

    H, K = sym(0.5), sym(0.7)
    g = rng.normal(size=n)
    S = np.diag(rng.uniform(0.2, 0.5, n))
    if not coupled:
        for M in (H, K):
            M[:p, p:] = M[p:, :p] = 0.0
    else:
        S = S + 0.3 * np.ones((n, n))
        cross = 2.0 * rng.normal(size=(p, q))
        K[:p, p:] += cross
        K[p:, :p] += cross.T
    L = lambda w: 0.5 * np.einsum("...i,ij,...j->...", w, H, w)                      # noqa: E731
    ell = lambda w: 1.0 + w @ g + 0.5 * np.einsum("...i,ij,...j->...", w, K, w)     # noqa: E731
    return p, S, L, ell


@pytest.mark.parametrize("coupled", [False, True])
def test_the_covariance_form_is_a_full_posterior_covariance_of_a_pinned_observable(coupled):
    """Exact identity: peer = covariance + E_C[phi] (E_C[D] - E_full[D]). And where the component's weights are
    independent of the rest under the full localised posterior and the losses have no cross terms between them,
    the covariance form Cov_C(phi_C, D) equals Cov_full(phi_C(w_C, w*_rest), D(w)): the covariance, under the
    full posterior, of the component's loss rise with the other weights pinned at w*. With coupling it does not."""
    p, S, L, ell = _quadratic_world(coupled)
    rng = np.random.default_rng(1)
    n = 400_000
    w_full = rng.multivariate_normal(np.zeros(S.shape[0]), S, size=n)             # (n, 7): the full run
    w_comp = np.zeros_like(w_full)                                                 # the component run: rest pinned
    w_comp[:, :p] = rng.multivariate_normal(np.zeros(p), S[:p, :p], size=n)        # its marginal, as p_C has
    pinned = lambda w: np.concatenate([w[:, :p], np.zeros((len(w), S.shape[0] - p))], axis=1)  # noqa: E731
    phi_c = L(w_comp) - L(np.zeros(S.shape[0]))
    D_c, D_f = L(w_comp) - ell(w_comp), L(w_full) - ell(w_full)
    covariance = np.mean(phi_c * D_c) - phi_c.mean() * D_c.mean()
    peer = np.mean(phi_c * D_c) - phi_c.mean() * D_f.mean()
    assert peer == pytest.approx(covariance + phi_c.mean() * (D_c.mean() - D_f.mean()), rel=1e-9, abs=1e-12)
    A = L(pinned(w_full)) - L(np.zeros(S.shape[0]))                                # phi_C pinned outside C
    full_cov = np.mean(A * D_f) - A.mean() * D_f.mean()
    se = np.std(A * D_f) / np.sqrt(n) + np.std(phi_c * D_c) / np.sqrt(n)
    if coupled:
        assert abs(covariance - full_cov) > 8 * se
    else:
        assert abs(covariance - full_cov) < 4 * se
        assert abs(peer - full_cov) > 8 * se        # the peer form carries E_C[phi] times the rest's mean shift
