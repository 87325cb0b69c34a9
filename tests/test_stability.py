"""Cluster stability (spectro.stability): the agreement of two labellings by
hand, and the two halves of a planted matrix cluster alike while halves with
unrelated noise do not."""

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from spectro.clusters import ClusterParams
from spectro.stability import agreement, stability
from tests.synthetic import planted_partition


def test_agreement_hand_example():
    a = np.array([0, 0, 1, 1, -1, 2])
    b = np.array([1, 1, 0, 0, 0, -1])          # the same clusters on the tokens both cluster, renamed
    out = agreement(a, b)
    assert out["ari"] == 1.0 and out["tokens_in_both"] == 4
    assert out["ari_all_tokens"] == pytest.approx(adjusted_rand_score(a, b)) and out["ari_all_tokens"] < 1.0
    assert agreement(np.array([0, -1, -1]), np.array([-1, 0, 0]))["ari"] is None   # fewer than 2 in both


def test_halves_of_one_planted_matrix_agree_and_unrelated_halves_do_not():
    chi, _ = planted_partition(600, np.random.default_rng(3), noise=0.2)
    rng = np.random.default_rng(4)
    scale = np.abs(chi).mean()
    halves = np.stack([chi + 0.05 * scale * rng.standard_normal(chi.shape) for _ in range(2)])
    out = stability(halves, ClusterParams())
    assert out["ari"] > 0.9, out
    assert len(out["n_clusters_halves"]) == 2 and min(out["n_clusters_halves"]) >= 2
    assert all(0 < s <= 1 for s in out["clustered_share_halves"])

    unrelated = np.stack([chi, chi[rng.permutation(chi.shape[0])]])   # the same rows, paired with other tokens
    assert stability(unrelated, ClusterParams())["ari_all_tokens"] < 0.2


def test_no_halves_or_nonfinite_halves_give_none():
    chi = np.ones((2, 10, 3))
    assert stability(chi[:1], ClusterParams()) is None
    chi[1, 0, 0] = np.nan
    assert stability(chi, ClusterParams()) is None


def test_the_resolution_path_picks_the_finest_scale_whose_halves_agree():
    """Halves of one planted matrix: coarse scales agree across halves, far finer ones split the groups by noise
    or leave most tokens in communities below min_size; the chosen scale is the finest that agrees and clusters
    at least half the tokens. Unrelated halves: no scale is stable and the path says so."""
    from spectro.clusters.scales import MIN_CLUSTERED, resolution_path

    chi, groups = planted_partition(1200, np.random.default_rng(5), n_groups=8, noise=0.2)
    rng = np.random.default_rng(6)
    scale = np.abs(chi).mean()
    halves = np.stack([chi + 0.3 * scale * rng.standard_normal(chi.shape) for _ in range(2)])
    params = ClusterParams(min_size=5)
    path = resolution_path(chi, halves, params, resolutions=(0.5, 1.0, 16.0, 64.0))
    sc = path["scales"]
    assert path["stable"] is True and sc[0]["halves_ari"] > 0.5 and sc[2]["halves_ari"] < 0.5, sc
    assert sc[3]["clustered_share"] < MIN_CLUSTERED                    # the finest: most tokens in tiny communities
    ok = [i for i, s in enumerate(sc) if s["halves_ari"] >= 0.5 and s["clustered_share"] >= MIN_CLUSTERED]
    assert path["chosen"] == max(ok, key=lambda i: sc[i]["n_clusters"]) == 1
    grouped = groups >= 0
    assert adjusted_rand_score(groups[grouped], sc[1]["labels"][grouped]) > 0.8      # the planted groups
    assert sc[2]["n_clusters"] > 3 * sc[1]["n_clusters"]

    unrelated = np.stack([halves[0], halves[1][rng.permutation(chi.shape[0])]])
    lost = resolution_path(chi, unrelated, params, resolutions=(0.5, 1.0, 16.0))
    assert lost["stable"] is False and all(s["halves_ari"] < 0.5 for s in lost["scales"])
    assert lost["chosen"] == int(np.argmax([s["halves_ari"] for s in lost["scales"]]))
    assert resolution_path(chi, None, params, resolutions=(0.5, 16.0))["stable"] is None


def test_the_scales_table_of_a_run_and_its_size_limit():
    """The clusters stage's scales table (spectro.trust._scales) from a run's arrays: every scale with its labels
    and each probe label's best cluster; skipped above clustering.scales_max_tokens."""
    import xarray as xr

    from spectro.trust import _scales

    chi, groups = planted_partition(600, np.random.default_rng(7), n_groups=6, noise=0.2)
    rng = np.random.default_rng(8)
    halves = np.stack([chi + 0.05 * np.abs(chi).mean() * rng.standard_normal(chi.shape) for _ in range(2)])
    names = [f"c{j}" for j in range(chi.shape[1])]
    ds = xr.Dataset({"chi": (("token", "component"), chi), "chi_half": (("half", "token", "component"), halves),
                     "token_labels": (("token", "label"), (groups == 0)[:, None])},
                    coords={"component": names, "label": ["group0"]})
    path = _scales(ds, chi, halves, ClusterParams(scales=(0.5, 1.0)))
    assert [s["resolution"] for s in path["scales"]] == [0.5, 1.0] and path["stable"] is True
    for s in path["scales"]:
        assert len(s["labels"]) == 600 and s["known_answers"]["group0"]["f1"] > 0.9
    assert _scales(ds, chi, halves, ClusterParams(scales=(0.5,), scales_max_tokens=599)) is None
    assert _scales(ds, chi, halves, ClusterParams(scales=())) is None
