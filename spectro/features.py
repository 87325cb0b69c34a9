"""Token features from a susceptibility matrix: what the clustering, the map
and the reliability figures all look at.

    z = column z-score of chi            (each component: mean 0, sd 1 over tokens)
    f = z - mean over components of z    (row centring: the uniform mode removed)

Non-obvious choices:
- Column z-scoring puts components of very different scales (the
  unembedding's chi is ~10x a head's) on one footing.
- Row centring removes each token's mean response over components. On real
  models one mode, the same sign and size on every component, holds most of
  the variance (a token's overall sensitivity); it says how much a token
  responds, not to what, and a graph built on it slices that one mode into
  pieces. What is left is the component-specific pattern, which is what can
  tell token types apart.
- `kind="zscore"` skips the centring (the earlier behaviour), for comparison.
- A zero-variance column becomes 0 rather than a division by zero.
- A centred row shorter than 1e-9 of its z-scored row (a token that was
  nothing but the uniform mode) is set to exactly 0: it has no direction.
"""

from __future__ import annotations

import numpy as np

from spectro.config import ClusterConfig
from spectro.errors import ConfigError, DataError

KINDS = ("centred", "zscore")
DEFAULT_KIND = ClusterConfig().features     # the schema's default (clustering.features)
_ZERO_ROW = 1e-9     # a centred row shorter than this times its z-scored row has no direction


def standardize(chi: np.ndarray) -> np.ndarray:
    """Column z-score of a (tokens, components) matrix; zero-variance columns become 0.

    Raises DataError if the matrix is not 2-D, is empty, or has NaN/inf entries."""
    chi = np.asarray(chi, dtype=np.float64)
    if chi.ndim != 2:
        raise DataError(f"chi must be a (tokens, components) matrix, got shape {chi.shape}")
    if chi.shape[0] < 2 or chi.shape[1] < 1:
        raise DataError(f"chi needs at least 2 tokens and 1 component, got shape {chi.shape}")
    bad = ~np.isfinite(chi)
    if bad.any():
        rows, cols = np.nonzero(bad)
        raise DataError(
            f"chi has {int(bad.sum())} non-finite (NaN or inf) entries in {np.unique(rows).size} tokens and "
            f"{np.unique(cols).size} components; drop those components or tokens (a component with no usable "
            f"chain is all NaN) or re-run the susceptibilities stage")
    mean = chi.mean(axis=0)
    std = chi.std(axis=0)
    scale = np.where(std > 0, std, 1.0)
    z = (chi - mean) / scale
    z[:, std == 0] = 0.0
    return z


def feature_matrix(chi: np.ndarray, kind: str = DEFAULT_KIND) -> np.ndarray:
    """(tokens, components) float64 features before any row normalisation (module notes)."""
    if kind not in KINDS:
        raise ConfigError(f"features must be one of {', '.join(KINDS)}; got {kind!r}")
    z = standardize(chi)                                  # (tokens, components)
    if kind == "zscore":
        return z
    c = z - z.mean(axis=1, keepdims=True)                 # (tokens, components)
    c[np.linalg.norm(c, axis=1) <= _ZERO_ROW * np.linalg.norm(z, axis=1)] = 0.0
    return c
