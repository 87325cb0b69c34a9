"""Synthetic susceptibility matrices with known token groups, for measuring the clusterings.

Two generators:

- `planted_partition`: the easy family (a few groups of similar size, no shared mode).
  Kept for tests of the kNN graph and the outputs, where the data only has to have
  some structure.
- `hard_planted`: the family the clustering defaults are chosen on (see its docstring
  and docs/clustering.md). It reproduces what makes real chi hard to cluster: one
  shared mode with nearly all the variance, many groups of very unequal size, tokens
  that belong to no group, components on very different scales with different
  signal and noise levels.

And one closed form for the sampler's tests:

- `gaussian_stationary_moments`: the exact stationary mean and covariance of
  full-batch SGLD on a Gaussian target.
"""

from __future__ import annotations

import numpy as np
import torch


def planted_partition(n_tokens: int, rng: np.random.Generator, n_components: int = 20, n_groups: int = 8,
                      modes_per_group: int = 3, noise: float = 0.3, spread: float = 0.3,
                      noise_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Susceptibility-like vectors with known groups (the easy family).

    There are `n_components` random unit mode directions in component space.
    Each group uses `modes_per_group` of them with its own coefficients (+-[1, 2]);
    a token of the group draws each coefficient around the group's with standard
    deviation `spread`, adds Gaussian noise of standard deviation `noise` per
    component (relative to a unit-norm group direction), and is scaled by a
    log-normal magnitude (as real tokens differ in overall susceptibility).
    A `noise_fraction` of tokens are pure isotropic noise of similar magnitude.
    Group sizes vary by a factor of up to 3. Returns chi (tokens, components)
    and the true group of each token (-1 for the noise tokens); tokens are shuffled.
    """
    n_noise = int(round(noise_fraction * n_tokens))
    n_grouped = n_tokens - n_noise
    weights = rng.uniform(1.0, 3.0, n_groups)
    sizes = np.floor(weights / weights.sum() * n_grouped).astype(int)
    sizes[: n_grouped - sizes.sum()] += 1
    directions = rng.standard_normal((n_components, n_components))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    rows, groups = [], []
    for g, size in enumerate(sizes):
        use = rng.choice(n_components, size=modes_per_group, replace=False)
        centre = rng.uniform(1.0, 2.0, modes_per_group) * rng.choice([-1.0, 1.0], modes_per_group)
        norm = np.linalg.norm(centre @ directions[use])
        coef = centre + spread * np.abs(centre).mean() * rng.standard_normal((size, modes_per_group))
        x = coef @ directions[use] / norm + noise / np.sqrt(n_components) * rng.standard_normal((size, n_components))
        rows.append(x)
        groups.append(np.full(size, g))
    rows.append(rng.standard_normal((n_noise, n_components)) / np.sqrt(n_components))
    groups.append(np.full(n_noise, -1))
    chi = np.concatenate(rows) * rng.lognormal(0.0, 0.5, (n_tokens, 1))
    groups = np.concatenate(groups)
    perm = rng.permutation(n_tokens)
    return chi[perm], groups[perm]


def zipf_sizes(total: int, n_groups: int, exponent: float) -> np.ndarray:
    """Group sizes proportional to 1 / rank**exponent, summing to `total` (largest first)."""
    w = 1.0 / np.arange(1, n_groups + 1) ** exponent
    sizes = np.floor(w / w.sum() * total).astype(np.int64)
    sizes[: total - int(sizes.sum())] += 1
    return sizes


def _centred_unit(x: np.ndarray) -> np.ndarray:
    """Rows with their mean over components removed, then scaled to unit length."""
    x = x - x.mean(axis=1, keepdims=True)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def hard_planted(n_tokens: int = 20000, rng: np.random.Generator | int = 0, n_components: int = 32,
                 n_groups: int = 60, zipf: float = 1.0, background: float = 0.15, n_families: int = 15,
                 family_spread: float = 1.0, spread: float = 0.5, noise: float = 0.6, uniform: float = 1.6,
                 amplitude_df: float = 3.0, signal_sigma: float = 0.5, component_signal_spread: float = 5.0,
                 component_noise_spread: float = 3.0, noise_coupling: float = 0.5,
                 scale_spread: float = 30.0) -> tuple[np.ndarray, np.ndarray]:
    """A hard planted family: chi (tokens, components) and each token's group (-1: background).

    Every token i is, before the per-component scales,

        x_i = a_i * 1  +  b_i * d_i  +  e_i

    - `a_i * 1`, the uniform mode: the same loading on every component, with a
      heavy-tailed signed amplitude a_i = `uniform` * t (Student t with `amplitude_df`
      degrees of freedom, scaled to unit standard deviation). It carries most of the
      variance: with the defaults about 94-96% of the column-z-scored variance is in the
      first singular mode (compare the real chi in tests/reference/embedded_chi.npz:
      97.9%).
    - `b_i * d_i`, the token's own direction, with b_i log-normal (sigma `signal_sigma`,
      median 1) and d_i of unit length, orthogonal to the uniform mode. For a grouped
      token, d_i = unit(m_g + `spread` * xi_i) with xi_i a random centred unit vector
      and m_g its group's centre; for a background token (a share `background` of all
      tokens) d_i is a random centred unit vector of its own.
      Group centres come in `n_families` families: m_g = unit(p_f + `family_spread` * q_g)
      with p_f the family's direction and q_g random (centred, unit), so sibling groups
      are closer to each other (cosine about 1 / (1 + family_spread**2)) than to other
      groups. Centres and background directions weight component j by w_j, log-uniform
      over a `component_signal_spread`-fold range: some components carry more group
      signal than others.
      Group sizes follow Zipf's law with exponent `zipf` (`zipf_sizes`); the smallest
      group of the default 20,000 tokens has about 60 tokens, the largest about 3,600.
    - `e_i`, Gaussian noise of norm about `noise` * (1 + `noise_coupling` * |a_i| / `uniform`):
      noisier for tokens with a large uniform amplitude (as the standard errors of real
      chi grow with |chi|), with per-component levels spread log-uniformly over
      `component_noise_spread`-fold.

    Then chi[:, j] = s_j * x[:, j] + o_j, with scales s_j log-uniform over a
    `scale_spread`-fold range and small offsets o_j. Column z-scoring divides s_j out but
    not w_j or the noise levels, and because those differ between components, the uniform
    mode's loadings after z-scoring are only nearly equal: row centring removes most of it
    but leaves a residue proportional to a_i, largest on the heavy-tailed tokens.

    `rng` is a Generator or an integer seed. Tokens are shuffled."""
    rng = np.random.default_rng(rng)
    C = int(n_components)
    if C < 3:
        raise ValueError(f"n_components must be at least 3, got {C}")
    n_bg = int(round(background * n_tokens))
    sizes = zipf_sizes(n_tokens - n_bg, n_groups, zipf)
    if sizes.min() < 1:
        raise ValueError(f"{n_tokens} tokens are too few for {n_groups} Zipf groups; raise n_tokens")
    w = np.exp(rng.uniform(0.0, np.log(component_signal_spread), C))
    eta = np.exp(rng.uniform(0.0, np.log(component_noise_spread), C))
    eta /= np.sqrt((eta ** 2).mean())
    parents = _centred_unit(rng.standard_normal((n_families, C)) * w)
    family = rng.integers(0, n_families, n_groups)
    centres = _centred_unit(parents[family] + family_spread * _centred_unit(rng.standard_normal((n_groups, C)) * w))
    groups = np.concatenate([np.repeat(np.arange(n_groups), sizes), np.full(n_bg, -1)])
    n = groups.size
    grouped = groups >= 0
    d = np.empty((n, C))
    xi = _centred_unit(rng.standard_normal((int(grouped.sum()), C)))
    d[grouped] = _centred_unit(centres[groups[grouped]] + spread * xi)
    d[~grouped] = _centred_unit(rng.standard_normal((n_bg, C)) * w)
    t = rng.standard_t(amplitude_df, n)
    if amplitude_df > 2:
        t /= np.sqrt(amplitude_df / (amplitude_df - 2))
    a = uniform * t
    b = rng.lognormal(0.0, signal_sigma, n)
    level = noise * (1.0 + noise_coupling * np.abs(a) / uniform)
    e = level[:, None] * eta * rng.standard_normal((n, C)) / np.sqrt(C)
    x = a[:, None] + b[:, None] * d + e
    s = np.exp(rng.uniform(0.0, np.log(scale_spread), C))
    o = 0.05 * uniform * s * rng.standard_normal(C)
    chi = x * s + o
    perm = rng.permutation(n)
    return chi[perm], groups[perm]


def gaussian_stationary_moments(precision: torch.Tensor, mean: torch.Tensor, step_size: float,
                                noise_level: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact stationary mean and covariance of full-batch SGLD on a Gaussian target.

    For potential U(w) = ½ (w-μ)ᵀ Λ (w-μ) the update w' = w - (ε/2) Λ (w-μ) + σ√ε ξ
    is a linear recursion whose stationary covariance solves Σ = A Σ A + σ²ε I with
    A = I - (ε/2)Λ; since A and Λ commute, Σ = σ² (Λ - ε Λ²/4)⁻¹ (→ σ² Λ⁻¹ as ε → 0).
    The closed form the sampler must reproduce.
    """
    lam = precision.double()
    cov = noise_level ** 2 * torch.linalg.inv(lam - step_size * lam @ lam / 4.0)
    return mean.double(), cov
