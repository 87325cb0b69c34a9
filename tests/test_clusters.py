"""Clustering (DESIGN 1.6): ARI and conductance against hand-computed values,
the kNN graph, planted partitions recovered by all three methods with the
noise tokens labelled -1, determinism, clear errors for bad input, and the
clusters.json / cluster_run outputs."""

import json

import numpy as np
import pytest
import scipy.sparse as sp

from spectro.clusters import (ClusterParams, Clustering, _pick_cut, adjusted_rand_index, cluster, cluster_run,
                              conductance, conductance_clusters, features, knn_graph, knn_lists, planted_partition,
                              relative_density, write_clusters)
from spectro.errors import ConfigError, DataError, StoreError


def two_triangles() -> sp.csr_matrix:
    """Triangles {0,1,2} and {3,4,5} (unit weights) joined by the edge 2-3 of weight 0.5."""
    edges = [(0, 1, 1.0), (0, 2, 1.0), (1, 2, 1.0), (3, 4, 1.0), (3, 5, 1.0), (4, 5, 1.0), (2, 3, 0.5)]
    r, c, w = zip(*edges)
    A = sp.csr_matrix((w, (r, c)), shape=(6, 6))
    return (A + A.T).tocsr()


# ----------------------------------------------------------------- by hand

def test_adjusted_rand_index_hand_examples():
    # contingency [[2,1,0],[0,1,2]]: sum C(n_ij,2) = 2, rows 3+3 = 6, cols 1+1+1 = 3, C(6,2) = 15:
    # (2 - 6*3/15) / ((6+3)/2 - 6*3/15) = 0.8 / 3.3
    assert adjusted_rand_index([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]) == pytest.approx(0.8 / 3.3)
    # (1 - 2/6) / (1.5 - 2/6) = 4/7
    assert adjusted_rand_index([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(4 / 7)
    assert adjusted_rand_index([0, 0, 1, 1, 2], [5, 5, -1, -1, 7]) == pytest.approx(1.0)
    assert adjusted_rand_index([0, 1, 0, 1], [0, 0, 1, 1]) == pytest.approx(-0.5)


def test_conductance_hand_computed():
    W = two_triangles()
    # vol{0,1,2} = 2 + 2 + 2.5 = 6.5 = vol of the rest; cut = 0.5
    assert conductance(W, [0, 1, 2]) == pytest.approx(0.5 / 6.5)
    assert conductance(W, [3, 4, 5]) == pytest.approx(0.5 / 6.5)
    # {2}: vol 2.5, cut 2.5 -> 1;  {0,1}: vol 4, cut 2 (edges to 2) -> 0.5
    assert conductance(W, [2]) == pytest.approx(1.0)
    assert conductance(W, [0, 1]) == pytest.approx(0.5)
    # {0,1,2,3}: vol 6.5 + 2.5 = 9, rest {4,5} vol 4, cut = 2 (3-4, 3-5) -> 2 / 4
    assert conductance(W, [0, 1, 2, 3]) == pytest.approx(2 / 4)
    with pytest.raises(DataError, match="members"):
        conductance(W, [])
    with pytest.raises(DataError, match="members"):
        conductance(W, [7])


def test_conductance_method_splits_two_triangles():
    labels, info = conductance_clusters(two_triangles(), ClusterParams(min_size=3, max_conductance=0.2))
    assert sorted(map(sorted, [np.flatnonzero(labels == c) for c in range(2)])) == [[0, 1, 2], [3, 4, 5]]
    assert [round(i["conductance"], 6) for i in info] == [round(0.5 / 6.5, 6)] * 2


def test_pick_cut_takes_the_first_valley_not_the_later_union():
    # valley at prefix size 10 (0.10), a rise to 0.40, then a deeper union at size 16 (0.05)
    phi = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.15, 0.10, 0.2, 0.3, 0.4, 0.2, 0.1, 0.05, 0.1, 0.2])
    assert _pick_cut(phi, 1, 0.3) == 9
    # a descending slope with wiggles: its global minimum, not a wiggle
    slope = np.array([0.9, 0.7, 0.5, 0.29, 0.3, 0.2, 0.21, 0.12, 0.13, 0.08, 0.09, 0.1])
    assert _pick_cut(slope, 1, 0.3) == 9
    # nothing under the threshold: the global minimum (to be rejected by the caller)
    assert _pick_cut(np.array([0.9, 0.6, 0.5, 0.7]), 1, 0.3) == 2


# --------------------------------------------------------- features, graph

def test_features_zscore_then_unit_rows():
    rng = np.random.default_rng(0)
    chi = rng.normal(size=(50, 4)) * [1.0, 10.0, 100.0, 0.0] + [0, 5, -3, 7]   # last column constant
    X = features(chi)
    assert np.allclose(X[:, 3], 0.0)
    assert np.allclose(np.linalg.norm(X, axis=1), 1.0)
    z = (chi[:, :3] - chi[:, :3].mean(0)) / chi[:, :3].std(0)
    assert np.allclose(X[:, :3], z / np.linalg.norm(z, axis=1, keepdims=True))


def test_features_nonfinite_is_a_data_error_naming_the_count():
    chi = np.ones((10, 3)) + np.arange(30).reshape(10, 3) ** 2
    chi[2, 1] = np.nan
    chi[5, 0] = np.inf
    with pytest.raises(DataError, match="2 non-finite"):
        features(chi)


def test_knn_graph_exact_and_approximate():
    rng = np.random.default_rng(1)
    chi, _ = planted_partition(3000, rng, n_components=12, n_groups=6)
    X = features(chi)
    k = 10
    W = knn_graph(X, k, seed=0, exact_below=10 ** 9)
    assert (W != W.T).nnz == 0 and W.diagonal().sum() == 0
    assert W.data.min() > 0 and W.data.max() <= 1 + 1e-12
    # every token keeps its k exact nearest (positive) neighbours, with cosine weights
    S = X @ X.T
    np.fill_diagonal(S, -np.inf)
    for i in rng.choice(3000, 50, replace=False):
        nn = np.argsort(-S[i])[:k]
        assert np.allclose(W[i, nn].toarray().ravel(), S[i, nn])
    # the approximate (IVF) path agrees with the exact one on most neighbours
    nbr_exact, _ = knn_lists(X, k, seed=0, exact_below=10 ** 9)
    nbr_ivf, sim_ivf = knn_lists(X, k, seed=0, exact_below=0)
    recall = np.mean([np.intersect1d(a, b).size / k for a, b in zip(nbr_exact, nbr_ivf)])
    assert recall > 0.9
    assert np.all(np.diff(sim_ivf, axis=1) <= 1e-12)
    assert np.array_equal(nbr_ivf, knn_lists(X, k, seed=0, exact_below=0)[0])     # seeded


def test_relative_density_hand_example():
    # token 0's neighbours are 1 and 2 (mean similarity 0.5); 1 and 2 are close to each other (0.9)
    nbr = np.array([[1, 2], [2, 0], [1, 0]])
    sim = np.array([[0.5, 0.5], [0.9, 0.5], [0.9, 0.5]])
    # densities 0.5, 0.7, 0.7: token 0 is 0.5 / 0.7 of its densest neighbour, 1 and 2 are 0.7 / 0.7
    assert np.allclose(relative_density(nbr, sim), [0.5 / 0.7, 1.0, 1.0])


# ------------------------------------------------------- planted partitions

@pytest.fixture(scope="module")
def planted():
    chi, groups = planted_partition(3000, np.random.default_rng(2026), noise=0.3)
    return chi, groups


@pytest.mark.parametrize("method, min_ari, min_noise", [("conductance", 0.9, 0.7), ("leiden", 0.8, 0.0),
                                                        ("spectral", 0.8, 0.0)])
def test_planted_partition_recovered(planted, method, min_ari, min_noise):
    chi, groups = planted
    result = cluster(chi, ClusterParams(method=method))
    grouped = groups >= 0
    ari = adjusted_rand_index(groups[grouped], result.labels[grouped])
    noise_rate = float((result.labels[~grouped] < 0).mean())
    print(f"{method}: {len(result.clusters)} clusters, ARI {ari:.3f}, noise tokens labelled -1 {noise_rate:.3f}")
    assert ari >= min_ari
    assert noise_rate >= min_noise
    assert 6 <= len(result.clusters) <= 12
    sizes = [c["size"] for c in result.clusters]
    assert sizes == sorted(sizes, reverse=True) and [c["id"] for c in result.clusters] == list(range(len(sizes)))
    W = knn_graph(features(chi), 15)
    for c in result.clusters:
        assert np.array_equal(c["members"], np.flatnonzero(result.labels == c["id"]))
        assert c["conductance"] == pytest.approx(conductance(W, c["members"]), abs=1e-9)


def test_without_the_outlier_step_groups_are_still_recovered(planted):
    chi, groups = planted
    result = cluster(chi, ClusterParams(outlier_ratio=0.0))
    grouped = groups >= 0
    assert result.graph_stats["n_outliers"] == 0
    assert adjusted_rand_index(groups[grouped], result.labels[grouped]) >= 0.9


def test_max_size_and_min_size_are_respected(planted):
    chi, _ = planted
    result = cluster(chi[:1500], ClusterParams(max_size=60, min_size=20, max_conductance=0.6))
    assert result.clusters and all(20 <= c["size"] <= 60 for c in result.clusters)


@pytest.mark.parametrize("method", ["conductance", "leiden", "spectral"])
def test_deterministic_for_a_seed(planted, method):
    chi, _ = planted
    a = cluster(chi[:1200], ClusterParams(method=method, seed=3))
    b = cluster(chi[:1200], ClusterParams(method=method, seed=3))
    assert np.array_equal(a.labels, b.labels)


def test_approximate_knn_path_clusters_the_same(planted):
    chi, groups = planted
    exact = cluster(chi, ClusterParams())
    approx = cluster(chi, ClusterParams(exact_knn_below=0))
    assert approx.graph_stats["knn"] == "ivf"
    assert adjusted_rand_index(exact.labels, approx.labels) > 0.9


# ---------------------------------------------------------------- errors

def test_bad_inputs_give_clear_errors():
    chi, _ = planted_partition(200, np.random.default_rng(0), n_groups=3)
    bad = chi.copy()
    bad[0, 0] = np.nan
    with pytest.raises(DataError, match="1 non-finite"):
        cluster(bad, ClusterParams())
    with pytest.raises(ConfigError, match="k=200"):
        cluster(chi, ClusterParams(k=200))
    with pytest.raises(ConfigError, match="method must be one of conductance, leiden, spectral"):
        ClusterParams(method="kmeans")
    with pytest.raises(ConfigError, match="alpha"):
        ClusterParams(alpha=0.0)
    with pytest.raises(ConfigError, match="max_size"):
        ClusterParams(min_size=10, max_size=5)
    with pytest.raises(ConfigError, match="k must be an integer"):
        ClusterParams(k=2.5)
    with pytest.raises(DataError, match="matrix"):
        cluster(chi[:, 0], ClusterParams())
    with pytest.raises(ConfigError, match="n_clusters"):
        cluster(chi, ClusterParams(method="spectral", n_clusters=500))
    with pytest.raises(ConfigError, match="ClusterParams"):
        cluster(chi, {"method": "conductance"})


# ---------------------------------------------------------------- outputs

SCHEMA = {"method", "params", "components", "n_tokens", "n_clusters", "n_noise", "labels", "clusters", "role_agreement"}
CLUSTER_KEYS = {"id", "size", "conductance", "profile", "profile_raw", "top_tokens", "sources", "roles", "members"}


def test_write_clusters_json_round_trip(tmp_path, planted):
    chi, groups = planted
    chi = chi[:800]
    n, C = chi.shape
    components = [f"l{i // 4}h{i % 4}" for i in range(C)]
    text = np.array([f"tok{g % 5}" for g in groups[:800]])
    source = np.where(np.arange(n) % 3 == 0, "code", "prose")
    result = cluster(chi, ClusterParams())
    path = write_clusters(tmp_path, result, chi, components, text, source, top_n=3)
    doc = json.loads(path.read_text())
    assert path == tmp_path / "clusters.json"
    assert set(doc) == SCHEMA
    assert doc["method"] == "conductance" and doc["params"]["k"] == 15 and doc["components"] == components
    assert doc["n_tokens"] == n and len(doc["labels"]) == n
    assert doc["n_clusters"] == len(doc["clusters"]) == len(result.clusters) > 0
    assert doc["n_noise"] == sum(label == -1 for label in doc["labels"])
    z = (chi - chi.mean(0)) / chi.std(0)
    for i, c in enumerate(doc["clusters"]):
        assert set(c) == CLUSTER_KEYS and c["id"] == i
        assert c["members"] == sorted(c["members"]) and c["size"] == len(c["members"])
        assert all(doc["labels"][m] == i for m in c["members"])
        assert np.allclose(c["profile"], z[c["members"]].mean(0))
        assert np.allclose(c["profile_raw"], chi[c["members"]].mean(0))
        assert len(c["top_tokens"]) <= 3 and all(isinstance(t, str) and isinstance(k, int) for t, k in c["top_tokens"])
        counts = [k for _, k in c["top_tokens"]]
        assert counts == sorted(counts, reverse=True)
        assert sum(c["sources"].values()) == c["size"] and set(c["sources"]) <= {"code", "prose"}
    assert [c["size"] for c in doc["clusters"]] == sorted((c["size"] for c in doc["clusters"]), reverse=True)
    with pytest.raises(DataError, match="chi has shape"):
        write_clusters(tmp_path, result, chi[:, :3], components, text, source)


def test_cluster_run_reads_the_store_drops_full_and_empty_components(tmp_path, planted):
    import xarray as xr

    chi, groups = planted
    chi = chi[:900]
    n, C = chi.shape
    names = [f"l{i // 4}h{i % 4}" for i in range(C)]
    full = chi.sum(axis=1, keepdims=True)
    dead = np.full((n, 1), np.nan)                 # a component with no usable chain
    values = np.concatenate([chi, full, dead], axis=1)
    comps = np.array(names + ["full", "l9h9"], dtype=object)
    ds = xr.Dataset(
        {"chi": (("token", "component"), values), "chi_se": (("token", "component"), np.abs(values) * 0.1)},
        coords={"component": comps, "token": np.arange(n),
                "token_text": ("token", np.array([f"t{g}" for g in groups[:900]], dtype=object)),
                "token_source": ("token", np.array(["code" if g % 2 else "prose" for g in groups[:900]], dtype=object)),
                "token_context": ("token", np.arange(n) // 10), "token_position": ("token", np.arange(n) % 10),
                "token_id": ("token", np.arange(n) % 50)})
    ds.to_zarr(tmp_path / "susceptibilities.zarr", consolidated=False)
    summary = cluster_run(tmp_path, ClusterParams())
    assert summary["dropped_components"] == ["l9h9"] and summary["components"] == names
    doc = json.loads((tmp_path / "clusters.json").read_text())
    assert doc["components"] == names and doc["n_tokens"] == n
    assert summary["n_clusters"] == doc["n_clusters"] >= 3
    modes = json.loads((tmp_path / "modes.json").read_text())
    assert modes["components"] == names and len(modes["modes"]) == 8
    with pytest.raises(StoreError, match="no susceptibilities"):
        cluster_run(tmp_path / "nowhere", ClusterParams())


def test_clustering_is_a_frozen_record(planted):
    chi, _ = planted
    result = cluster(chi[:400], ClusterParams())
    assert isinstance(result, Clustering)
    with pytest.raises(Exception):
        result.labels = None
    assert {"n_edges", "knn_seconds", "cluster_seconds", "knn"} <= set(result.graph_stats)
