"""Linear regression as a spectro `Problem` (tests only).

With a full-batch gradient the localized, tempered posterior of w is
Gaussian and full-batch SGLD's stationary law is known exactly, so every
number the pipeline produces has a closed form. Data rows are [x | y]. The
SGLD pool holds two copies of the whole data set and the batch size is 2, so
every minibatch gradient is the exact full-data gradient.
"""


import torch

from spectro.components import Component
from spectro.errors import ComponentError
from spectro.sampling import make_problem
from tests.synthetic import gaussian_stationary_moments


class Regression(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(w.clone())


def _w(model, params):
    return params["w"] if "w" in params else model.w


def loss(model, params, batch):
    rows = batch.reshape(-1, batch.shape[-1])
    r = rows[:, -1] - rows[:, :-1] @ _w(model, params)
    return 0.5 * (r * r).mean()


@torch.no_grad()
def per_token(model, params, data):
    rows = data.reshape(-1, data.shape[-1])
    r = rows[:, -1] - rows[:, :-1] @ _w(model, params)
    return (0.5 * r * r).reshape(-1, 1)


def components(model, names):
    d = model.w.shape[0]
    out = []
    for name in names:
        if name == "full":
            masks = {"w": None}
        elif name.startswith("w") and name[1:].isdigit() and int(name[1:]) < d:
            m = torch.zeros(d, dtype=torch.bool)
            m[int(name[1:])] = True
            masks = {"w": m}
        else:
            raise ComponentError(f"unknown component {name!r}")
        out.append(Component(name=name, layer=0, masks=masks, shapes={"w": (d,)}))
    return out


def setup(d=2, n=200, n_sampling=64, n_probe=6, seed=4, offset=(0.2, 0.1)):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    w_true = torch.tensor([1.0, -2.0, 0.5][:d], dtype=torch.float64)
    y = X @ w_true + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    w_hat = torch.linalg.solve(X.T @ X, X.T @ y)
    anchor = w_hat + torch.tensor(offset[:d], dtype=torch.float64)
    data = torch.cat([X, y[:, None]], 1)                                 # (n, d+1)
    Xp = torch.randn(n_probe, d, generator=g, dtype=torch.float64)
    yp = Xp @ w_hat + torch.randn(n_probe, generator=g, dtype=torch.float64)
    probe = torch.cat([Xp, yp[:, None]], 1)
    problem = make_problem(Regression(anchor), data.expand(2, n, d + 1).clone(), data[:n_sampling].clone(),
                           probe, loss=loss, per_token=per_token, components=components)
    return problem, dict(X=X, y=y, w_hat=w_hat, anchor=anchor, sampling=data[:n_sampling], probe=probe)


def posterior(info, component, nbeta, gamma, eps):
    """Exact stationary N(mu, Sigma) of full-batch SGLD for a component ('full' or 'w<i>')."""
    X, w_hat, anchor = info["X"], info["w_hat"], info["anchor"]
    n, d = X.shape
    H = X.T @ X / n
    lam = nbeta * H + gamma * torch.eye(d, dtype=torch.float64)
    if component == "full":
        mu = torch.linalg.solve(lam, nbeta * H @ w_hat + gamma * anchor)
        return gaussian_stationary_moments(lam, mu, eps)
    i = int(component[1:])
    # 1-D in coordinate i with the others fixed at w*: U'(w_i) = nβ (H (w - ŵ))_i + γ (w_i - w*_i)
    lam_i = lam[i, i]
    rest = anchor.clone()
    rest[i] = 0.0
    mu_i = (nbeta * (H[i] @ w_hat - H[i] @ rest) + gamma * anchor[i]) / lam_i
    mu = anchor.clone()
    mu[i] = mu_i
    sigma = torch.zeros(d, d, dtype=torch.float64)
    sigma[i, i] = 1.0 / (lam_i - eps * lam_i ** 2 / 4)
    return mu, sigma


def quad(rows):
    """q(w) = mean ½ (y - x·w)² = ½ wᵀAw - bᵀw + c."""
    X, y = rows[:, :-1], rows[:, -1]
    n = X.shape[0]
    return X.T @ X / n, X.T @ y / n, 0.5 * (y * y).mean()


def mean_q(q, mu, sigma):
    A, b, c = q
    return 0.5 * torch.trace(A @ sigma) + 0.5 * mu @ A @ mu - b @ mu + c


def cov_q(q1, q2, mu, sigma):
    (A1, b1, _), (A2, b2, _) = q1, q2
    return 0.5 * torch.trace(A1 @ sigma @ A2 @ sigma) + (A1 @ mu - b1) @ sigma @ (A2 @ mu - b2)


def exact_chi(info, component, nbeta, gamma, eps, form):
    """Closed-form chi for each probe example under the exact stationary laws."""
    mu, sig = posterior(info, component, nbeta, gamma, eps)
    mu_f, sig_f = posterior(info, "full", nbeta, gamma, eps)
    qs = quad(info["sampling"])
    s_star = float(0.5 * ((info["sampling"][:, -1] - info["sampling"][:, :-1] @ info["anchor"]) ** 2).mean())
    out = []
    for row in info["probe"]:
        ql = quad(row[None])
        cov = cov_q(qs, qs, mu, sig) - cov_q(qs, ql, mu, sig)          # Cov_C(phi, D)
        if form == "covariance":
            out.append(float(cov))
            continue
        e_phi = mean_q(qs, mu, sig) - s_star
        e_d_c = mean_q(qs, mu, sig) - mean_q(ql, mu, sig)
        e_d_f = mean_q(qs, mu_f, sig_f) - mean_q(ql, mu_f, sig_f)
        out.append(float(cov + e_phi * (e_d_c - e_d_f)))
    return out
