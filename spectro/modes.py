"""Modes of the susceptibility matrix (docs/method.md): the SVD spectrum of the
standardized `chi`, the share of variance in each mode, and for the top modes
their component loadings and the tokens at either end.

Non-obvious choices:
- Standardization is a column z-score (each component to mean 0, standard
  deviation 1 over tokens). A component whose values are all equal has no
  variance to standardize: its column becomes 0, so it contributes nothing
  rather than a division by zero (`spectro.features.standardize`).
- The matrix is tokens x components with few components (32 for Pythia-14M),
  so an exact thin SVD (`np.linalg.svd(full_matrices=False)`) costs
  O(tokens x components^2): about a second for 200,000 tokens. No randomized
  SVD is needed and the result is exact.
- A singular vector is defined only up to sign. Each mode's sign is fixed so
  that its largest-magnitude loading is positive, which makes the output
  reproducible and lets a reader say "mode 2 is the l1h3 mode".
- Variance share is s_i^2 / sum(s^2) over all singular values, i.e. the share
  of the total variance of the standardized matrix; cumulative share is its
  running sum.
- A token's score on a mode is its coordinate U[:, i] * s_i (its projection
  on the loading vector); "top positive" / "top negative" are the tokens with
  the largest / smallest scores.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from spectro import rundir
from spectro.errors import ConfigError, DataError
from spectro.features import standardize


def modes(chi: np.ndarray, components: Sequence[str], token_text: Sequence[str],
          n_modes: int = 8, n_top: int = 15) -> dict:
    """SVD spectrum of the standardized chi and a description of its top modes.

    Returns a JSON-ready dict: components, n_tokens, singular_values,
    variance_share, cumulative_share (all modes), and `modes`: for each of the
    top `n_modes`, its index, singular value, share, cumulative share, one
    loading per component (aligned with `components`), and the `n_top` tokens
    with the most positive and most negative scores ({"token", "text", "score"}).
    """
    chi = np.asarray(chi, dtype=np.float64)
    components = [str(c) for c in components]
    if isinstance(n_modes, bool) or not isinstance(n_modes, (int, np.integer)) or n_modes < 1:
        raise ConfigError(f"n_modes must be a positive integer, got {n_modes!r}")
    if isinstance(n_top, bool) or not isinstance(n_top, (int, np.integer)) or n_top < 1:
        raise ConfigError(f"n_top must be a positive integer, got {n_top!r}")
    z = standardize(chi)
    n_tokens, n_comp = z.shape
    if len(components) != n_comp:
        raise DataError(f"chi has {n_comp} components but {len(components)} component names were given")
    if len(token_text) != n_tokens:
        raise DataError(f"chi has {n_tokens} tokens but {len(token_text)} token texts were given")

    u, s, vt = np.linalg.svd(z, full_matrices=False)
    total = float(np.sum(s ** 2))
    share = s ** 2 / total if total > 0 else np.zeros_like(s)
    cumulative = np.cumsum(share)

    out_modes = []
    n_top = min(int(n_top), n_tokens)
    for i in range(min(int(n_modes), s.size)):
        loading = vt[i].copy()
        sign = 1.0 if loading[np.argmax(np.abs(loading))] >= 0 else -1.0
        loading *= sign
        score = u[:, i] * s[i] * sign
        order = np.argsort(score, kind="stable")
        pos, neg = order[::-1][:n_top], order[:n_top]
        out_modes.append({
            "index": i,
            "singular_value": float(s[i]),
            "share": float(share[i]),
            "cumulative_share": float(cumulative[i]),
            "loadings": [float(x) for x in loading],
            "top_positive": [{"token": int(t), "text": str(token_text[t]), "score": float(score[t])} for t in pos],
            "top_negative": [{"token": int(t), "text": str(token_text[t]), "score": float(score[t])} for t in neg],
        })
    return {
        "components": components,
        "n_tokens": int(n_tokens),
        "singular_values": [float(x) for x in s],
        "variance_share": [float(x) for x in share],
        "cumulative_share": [float(x) for x in cumulative],
        "modes": out_modes,
    }


def write_modes(run_dir, result: dict) -> rundir.Location:
    """Write `result` (from `modes`) to `<run_dir>/modes.json`; returns the path."""
    run_dir = rundir.location(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"run directory {run_dir} does not exist; create it or pass the run's directory")
    return rundir.write_json(run_dir / rundir.MODES, result, indent=None)
