"""SGLD against closed forms: on linear regression the localized, tempered
posterior is Gaussian, and full-batch SGLD's stationary law is known exactly
(`gaussian_stationary_moments`), so mean and covariance are checked with
Monte Carlo z-scores over independent chains."""

import math

import pytest
import torch

from spectro.sgld import SGLDHyper, build
from tests.helpers import closed_form, loss_fn, regression_problem
from tests.synthetic import gaussian_stationary_moments


def run_chains(hyper, anchor, X, y, n_chains, n_steps, burn, mask=None, mode="vmap", seed=0):
    sampler = build(hyper, {"w": anchor}, {"w": mask}, loss_fn, chain_mode=mode)
    state = sampler.init(n_chains)
    gens = [torch.Generator().manual_seed(seed * 1000 + c) for c in range(n_chains)]
    batch = (X.expand(n_chains, *X.shape), y.expand(n_chains, *y.shape))
    draws = []
    for t in range(n_steps):
        state, info = sampler.update(state, batch, gens)
        if t >= burn:
            draws.append(state.params["w"].clone())
    return torch.stack(draws, 1), info  # (chains, draws, d)


@pytest.mark.slow  # thousands of steps for Monte Carlo z-scores
def test_sgld_matches_gaussian_posterior_mean_and_covariance():
    X, y, w_hat = regression_problem()
    anchor = w_hat + torch.tensor([0.3, -0.2], dtype=torch.float64)   # w* away from the optimum
    nbeta, gamma, eps = 4.0, 2.0, 0.05
    hyper = SGLDHyper(step_size=eps, nbeta=nbeta, gamma=gamma)
    draws, _ = run_chains(hyper, anchor, X, y, n_chains=16, n_steps=3000, burn=200)
    mean, cov = closed_form(X, y, w_hat, anchor, nbeta, gamma, eps)

    # per-chain time averages are (nearly) independent replicates -> z-scores
    chain_mean = draws.mean(1)                                      # (chains, d)
    m = chain_mean.mean(0)
    se = chain_mean.std(0) / math.sqrt(chain_mean.shape[0])
    z = ((m - mean) / se).abs()
    assert torch.all(z < 5), f"mean z-scores {z}"
    # the posterior mean differs from both w* and w_hat by many SEs: the test can fail
    assert torch.all(((mean - anchor) / se).abs() > 5) or torch.all(((mean - w_hat) / se).abs() > 5)

    centred = draws - mean                                          # (chains, draws, d)
    chain_cov = torch.einsum("cti,ctj->cij", centred, centred) / centred.shape[1]  # (chains, d, d)
    c = chain_cov.mean(0)
    c_se = chain_cov.std(0) / math.sqrt(chain_cov.shape[0])
    zc = ((c - cov) / c_se).abs()
    assert torch.all(zc < 5), f"cov z-scores {zc}\nest {c}\nexact {cov}"
    rel = torch.linalg.norm(c - cov) / torch.linalg.norm(cov)
    assert rel < 0.08, f"relative covariance error {rel:.3f}"
    # the discretisation correction is visible relative to the continuous-time Λ⁻¹
    n = X.shape[0]
    lam = nbeta * X.T @ X / n + gamma * torch.eye(2, dtype=torch.float64)
    assert torch.linalg.norm(cov - torch.linalg.inv(lam)) > 0.01 * torch.linalg.norm(cov)


@pytest.mark.slow  # thousands of steps for Monte Carlo z-scores
def test_small_step_converges_to_continuous_posterior():
    X, y, w_hat = regression_problem(seed=1)
    anchor = w_hat.clone()
    hyper = SGLDHyper(step_size=0.01, nbeta=4.0, gamma=2.0)
    draws, _ = run_chains(hyper, anchor, X, y, n_chains=16, n_steps=4000, burn=400, seed=3)
    n = X.shape[0]
    lam = 4.0 * X.T @ X / n + 2.0 * torch.eye(2, dtype=torch.float64)
    exact = torch.linalg.inv(lam)
    flat = draws.reshape(-1, 2)
    est = torch.cov(flat.T)
    assert torch.linalg.norm(est - exact) / torch.linalg.norm(exact) < 0.1


def test_masked_entries_never_move_and_vmap_equals_loop():
    X, y, w_hat = regression_problem(d=3)
    mask = torch.tensor([True, False, True])
    hyper = SGLDHyper(step_size=0.02, nbeta=4.0, gamma=1.0)
    a, _ = run_chains(hyper, w_hat, X, y, n_chains=3, n_steps=50, burn=0, mask=mask, mode="vmap")
    b, _ = run_chains(hyper, w_hat, X, y, n_chains=3, n_steps=50, burn=0, mask=mask, mode="loop")
    assert torch.equal(a[:, :, 1], w_hat[1].expand_as(a[:, :, 1]))
    assert (a[:, -1, 0] - w_hat[0]).abs().min() > 0            # masked entries do move
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_rmsprop_runs_and_is_deterministic():
    X, y, w_hat = regression_problem()
    hyper = SGLDHyper(step_size=0.01, nbeta=4.0, gamma=2.0, precondition="rmsprop")
    a, info = run_chains(hyper, w_hat, X, y, n_chains=2, n_steps=100, burn=0)
    b, _ = run_chains(hyper, w_hat, X, y, n_chains=2, n_steps=100, burn=0)
    assert torch.equal(a, b)
    assert torch.isfinite(a).all() and info.noise_norm.min() > 0
    # a different seed gives a different trajectory
    c, _ = run_chains(hyper, w_hat, X, y, n_chains=2, n_steps=100, burn=0, seed=1)
    assert not torch.equal(a, c)


def test_chain_trajectory_independent_of_group():
    """Chain 1 run alone equals chain 1 run beside chain 0: randomness is per chain."""
    X, y, w_hat = regression_problem()
    hyper = SGLDHyper(step_size=0.02, nbeta=4.0, gamma=1.0)
    sampler = build(hyper, {"w": w_hat}, {"w": None}, loss_fn)
    both = sampler.init(2)
    alone = sampler.init(1)
    g_both = [torch.Generator().manual_seed(10), torch.Generator().manual_seed(11)]
    g_alone = [torch.Generator().manual_seed(11)]
    for _ in range(20):
        both, _ = sampler.update(both, (X.expand(2, *X.shape), y.expand(2, *y.shape)), g_both)
        alone, _ = sampler.update(alone, (X.expand(1, *X.shape), y.expand(1, *y.shape)), g_alone)
    torch.testing.assert_close(both.params["w"][1], alone.params["w"][0], rtol=1e-12, atol=1e-14)


def test_one_step_and_its_traces_match_the_formula_in_float64():
    """One step of float32 chains against the update written out in float64 with the same noise: new weights,
    and the traces (grad, noise and distance norms, accumulated in float64 without full-size temporaries) to 1e-6.
    A parameter of 4096 * 3 + 5 entries exercises both the blocked part and the remainder of `_sq_norms`;
    an inactive chain keeps its weights, and the state passed in is not modified."""
    g = torch.Generator().manual_seed(3)
    d = 4096 * 3 + 5
    X = torch.randn(64, d, generator=g) / math.sqrt(d)
    y = torch.randn(64, generator=g)
    anchor = 0.1 * torch.randn(d, generator=g)
    hyper = SGLDHyper(step_size=1e-3, nbeta=30.0, gamma=100.0, noise_level=0.7)
    sampler = build(hyper, {"w": anchor}, {"w": None}, loss_fn)
    state = sampler.init(3)
    state = state._replace(params={"w": state.params["w"] + 0.01 * torch.randn(3, d, generator=g)})
    batch = (X.expand(3, *X.shape), y.expand(3, *y.shape))
    before = state.params["w"].clone()
    seeds = (5, 6, 7)
    new, info = sampler.update(state, batch, [torch.Generator().manual_seed(s) for s in seeds],
                               active=torch.tensor([True, False, True]))

    w = state.params["w"].double()                                            # (chains, d)
    r = y.double() - w @ X.double().T                                         # (chains, n)
    grad = -(r @ X.double()) / X.shape[0]                                     # (chains, d)
    xi = torch.stack([torch.randn(d, generator=torch.Generator().manual_seed(s)) for s in seeds]).double()
    noise = math.sqrt(hyper.step_size) * hyper.noise_level * xi
    expect = w - 0.5 * hyper.step_size * (hyper.nbeta * grad + hyper.gamma * (w - anchor.double())) + noise
    expect[1] = w[1]
    torch.testing.assert_close(new.params["w"].double(), expect, rtol=0, atol=1e-6)
    torch.testing.assert_close(info.grad_norm, hyper.nbeta * grad.norm(dim=1), rtol=1e-6, atol=0)
    torch.testing.assert_close(info.noise_norm, noise.norm(dim=1), rtol=1e-6, atol=0)
    torch.testing.assert_close(info.distance, (expect - anchor.double()).norm(dim=1), rtol=1e-6, atol=0)
    torch.testing.assert_close(info.loss.double(), 0.5 * (r * r).mean(1), rtol=1e-5, atol=0)
    assert torch.equal(state.params["w"], before)                             # the state passed in is untouched


def test_control_run_samples_only_the_localisation():
    """nβ = 0 (the control run): no gradient is taken, and the chains sample the localisation alone,
    N(w*, (γ - εγ²/4)⁻¹ I) exactly (the closed form with Λ = γ I), whatever the loss."""
    X, y, w_hat = regression_problem()
    anchor = w_hat + torch.tensor([0.3, -0.2], dtype=torch.float64)
    gamma, eps = 2.0, 0.05
    calls = []

    def counting_loss(p, batch):
        calls.append(torch.is_grad_enabled())
        return loss_fn(p, batch)

    sampler = build(SGLDHyper(step_size=eps, nbeta=0.0, gamma=gamma), {"w": anchor}, {"w": None}, counting_loss)
    state = sampler.init(16)
    gens = [torch.Generator().manual_seed(c) for c in range(16)]
    batch = (X.expand(16, *X.shape), y.expand(16, *y.shape))
    draws = []
    for t in range(2000):
        state, info = sampler.update(state, batch, gens)
        if t >= 100:
            draws.append(state.params["w"].clone())
    assert not any(calls)                                       # the loss is evaluated, never differentiated
    assert torch.all(info.grad_norm == 0) and torch.isfinite(info.loss).all()
    draws = torch.stack(draws, 1)                               # (chains, draws, d)
    mean, cov = gaussian_stationary_moments(gamma * torch.eye(2, dtype=torch.float64), anchor, eps)
    chain_mean = draws.mean(1)
    z = (chain_mean.mean(0) - mean) / (chain_mean.std(0) / math.sqrt(16))
    assert torch.all(z.abs() < 5), z
    per_chain = torch.stack([torch.cov(d.T) for d in draws])                # (chains, d, d)
    z = (per_chain.mean(0) - cov) / (per_chain.std(0) / math.sqrt(16))
    assert torch.all(z.abs() < 5), (per_chain.mean(0), cov, z)
