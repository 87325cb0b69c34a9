"""Modes on synthetic data: a planted rank-3 matrix is recovered
(variance shares, loadings, extreme tokens), pure noise gives a flat
spectrum, and bad input gives clear errors."""

import itertools
import json

import numpy as np
import pytest
from scipy.linalg import hadamard

from spectro.errors import ConfigError, DataError
from spectro.modes import modes, standardize, write_modes

N, C = 2000, 16


def planted_rank3(rng, noise=0.05):
    """chi = A B^T + noise with B three orthonormal Hadamard directions: every component has
    the same variance, so column z-scoring only rescales and keeps the planted directions."""
    B = hadamard(C)[1:4].T / np.sqrt(C)                 # (C, 3), entries +-1/4, orthonormal columns
    A = rng.standard_normal((N, 3)) * [3.0, 2.0, 1.2]   # distinct variances: identifiable directions
    return A @ B.T + noise * rng.standard_normal((N, C)), B


def names():
    return [f"c{i}" for i in range(C)]


def texts():
    return [f"t{i}" for i in range(N)]


def test_planted_rank3_is_recovered():
    chi, B = planted_rank3(np.random.default_rng(0))
    out = modes(chi, names(), texts(), n_modes=5)
    share = np.array(out["variance_share"])
    assert share[:3].sum() > 0.9
    assert np.allclose(out["cumulative_share"], np.cumsum(share)) and out["cumulative_share"][-1] == pytest.approx(1.0)
    assert np.all(np.diff(out["singular_values"]) <= 1e-9)
    L = np.array([m["loadings"] for m in out["modes"][:3]])           # (3, C)
    cos = np.abs(L @ B)                                                 # rows, columns unit length
    best = max(itertools.permutations(range(3)), key=lambda p: sum(cos[i, p[i]] for i in range(3)))
    assert all(cos[i, best[i]] > 0.95 for i in range(3))
    assert best == (0, 1, 2)                                            # ordered by planted variance


def test_pure_noise_has_a_flat_spectrum():
    out = modes(np.random.default_rng(1).standard_normal((N, C)), names(), texts())
    share = np.array(out["variance_share"])
    assert share.max() < 1.5 / C and share.min() > 0.5 / C


def test_mode_fields_signs_and_extreme_tokens():
    rng = np.random.default_rng(2)
    chi, B = planted_rank3(rng)
    chi[17] = 40.0 * B[:, 0]                            # far out along the first mode
    chi[99] = -40.0 * B[:, 0]
    out = modes(chi, names(), texts(), n_modes=2, n_top=4)
    assert out["n_tokens"] == N and out["components"] == names() and len(out["modes"]) == 2
    m0 = out["modes"][0]
    assert set(m0) == {"index", "singular_value", "share", "cumulative_share", "loadings", "top_positive",
                       "top_negative"}
    loadings = np.array(m0["loadings"])
    assert loadings[np.argmax(np.abs(loadings))] > 0                   # sign convention
    ends = {m0["top_positive"][0]["token"], m0["top_negative"][0]["token"]}
    assert ends == {17, 99}
    assert m0["top_positive"][0]["text"] in ("t17", "t99")
    pos = [t["score"] for t in m0["top_positive"]]
    neg = [t["score"] for t in m0["top_negative"]]
    assert len(pos) == 4 and pos == sorted(pos, reverse=True) and neg == sorted(neg)
    # the score is the projection of the standardized row on the loadings
    z = standardize(chi)
    assert m0["top_positive"][1]["score"] == pytest.approx(z[m0["top_positive"][1]["token"]] @ loadings)


def test_standardize_guards_constant_columns():
    chi = np.column_stack([np.arange(5.0), np.full(5, 3.0)])
    z = standardize(chi)
    assert np.allclose(z[:, 1], 0.0) and z[:, 0].mean() == pytest.approx(0) and z[:, 0].std() == pytest.approx(1)


def test_bad_input_gives_clear_errors():
    chi = np.random.default_rng(3).standard_normal((20, 4))
    bad = chi.copy()
    bad[3, 2] = np.nan
    with pytest.raises(DataError, match="1 non-finite"):
        modes(bad, list("abcd"), [""] * 20)
    with pytest.raises(DataError, match="4 components but 3"):
        modes(chi, list("abc"), [""] * 20)
    with pytest.raises(DataError, match="20 tokens but 19"):
        modes(chi, list("abcd"), [""] * 19)
    with pytest.raises(ConfigError, match="n_modes"):
        modes(chi, list("abcd"), [""] * 20, n_modes=0)


def test_write_modes_json_round_trip(tmp_path):
    chi, _ = planted_rank3(np.random.default_rng(4))
    out = modes(chi, names(), texts(), n_modes=3)
    path = write_modes(tmp_path, out)
    assert path == tmp_path / "modes.json" and json.loads(path.read_text()) == out
    with pytest.raises(DataError, match="does not exist"):
        write_modes(tmp_path / "missing", out)
