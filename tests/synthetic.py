"""Synthetic data with known answers for the tests.

- `planted_partition`: susceptibility-like vectors in a few groups of similar size with
  no shared mode (the easy family), for tests of the kNN graph and the outputs, where the
  data only has to have some structure. The hard family the clustering defaults are chosen
  on is product code: `spectro.clusters.planted.hard_planted` (docs/clustering.md).
- `gaussian_stationary_moments`: the exact stationary mean and covariance of
  full-batch SGLD on a Gaussian target, for the sampler's tests.
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
