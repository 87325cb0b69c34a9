"""Token clusters from susceptibilities, written to `<run_dir>/clusters.json`.

The stage's data flow, one module per step:

    params      ClusterParams: the settings (defaults from spectro.config.ClusterConfig)
    graph       unit feature rows -> cosine kNN (faiss) -> token graph, outliers, conductance
    push        approximate personalised PageRank (numba), the sweep's conductance profile
    local       the default method: local clusters by conductance (PPR sweep cuts)
    baselines   Leiden and spectral clusterings of the same graph
    clustering  `cluster`: chi -> graph -> the chosen method -> clusters numbered largest first
    files       the run directory: read susceptibilities.zarr, write clusters.json (+ modes.json)
    planted     `hard_planted`: chi with known groups, the family the defaults were chosen on

The stage itself, with the reliability, stability and known-answer figures
of the clusters, is `spectro.trust.clusters_stage`. docs/clustering.md has the
measurements behind the defaults. The public names are re-exported here, so
`from spectro.clusters import cluster, ClusterParams` keeps working.
"""

from spectro.clusters.baselines import leiden_clusters, spectral_clusters
from spectro.clusters.clustering import Clustering, adjusted_rand_index, cluster, cluster_graph
from spectro.clusters.files import ClusterInput, cluster_run, read_input, write_clusters
from spectro.clusters.graph import _graph, conductance, features, knn_graph, knn_lists, relative_density, token_graph
from spectro.clusters.local import _pick_cut, conductance_clusters
from spectro.clusters.params import METHODS, ClusterParams
from spectro.features import KINDS as FEATURES
from spectro.features import feature_matrix, standardize

__all__ = [
    "FEATURES", "METHODS", "ClusterInput", "ClusterParams", "Clustering", "_graph", "_pick_cut",
    "adjusted_rand_index", "cluster", "cluster_graph", "cluster_run", "conductance", "conductance_clusters",
    "feature_matrix", "features", "knn_graph", "knn_lists", "leiden_clusters", "read_input",
    "relative_density", "spectral_clusters", "standardize", "token_graph", "write_clusters",
]
