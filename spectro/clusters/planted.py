"""A planted family: susceptibility matrices with known token groups, built to be hard to cluster
in the ways real chi is (`hard_planted`).

The clustering defaults (`spectro.clusters.params`) were chosen on this family and are measured
on it (docs/clustering.md, benchmarks/bench_clusters.py); it reproduces what makes real chi hard
to cluster: one shared mode with nearly all the variance, many groups of very unequal size,
tokens that belong to no group, components on very different scales with different signal and
noise levels. Use it to check a clustering setting against known groups before trusting it on a
real run.
"""

from __future__ import annotations

import numpy as np


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
    # longer than 60 lines because the docstring defines the model term by term; the code is 35 lines
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
