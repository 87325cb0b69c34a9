"""`report.html`: one self-contained page a researcher can browse.

`write_report(run_dir)` reads a run directory (config.json, provenance.json,
summary.json, samples.zarr, susceptibilities.zarr, clusters.json, modes.json,
sae.json) and writes `<run_dir>/report.html` with, in order:

0. under the title, the verdict: how far to trust the run (clusters.json's
   `verdict`, its reasons, the split-half reliability of the clustering
   features and of raw chi, the ARI between the clusterings of two halves of
   the chains) and how to read those figures;
1. run configuration and provenance (model, file hashes, corpus, versions);
2. sampling diagnostics per component (LLC, R-hat, ESS, divergences, and the
   split-half reliability of raw chi and of the features), flagged where the
   chains have not mixed or a reliability is below its target;
3. per-chain traces of phi = sampling_loss - init_loss (inline SVG);
4. the mode spectrum and each mode's component loadings and extreme tokens;
5. a 2-D map of tokens (UMAP, or PCA with `report.map=pca`, of the clustering
   features) coloured by cluster, drawn on a canvas with a hover tooltip;
6. the cluster gallery: cards rendered by a small script from data embedded
   as JSON, with paging, token-text search and a minimum-size filter;
7. the SAE validation (sae.json);
8. against the nβ = 0 control (`report.control`): the ARI between this run's
   clusters and the control's beside this run's own split-half ARI, role
   purity, SAE matches and cluster counts of both runs.

Static parts (header, tables, SVG charts) are rendered here; the map and the
gallery are rendered in the browser from `<script type="application/json">`.
CSS and JS live in `spectro/assets/report/` and are inlined: the page loads
nothing from the network.

The report reads, computes and renders in separate steps, one module each:

    loading            the run directory's files (`_Run`), the clustering's features and labels
    analysis           the token map (UMAP/PCA), the cluster cards' data, control checks
    html               escaping, formatting, embedded JSON, SVG charts, inlined assets
    sections_run       verdict, configuration, diagnostics, traces, modes
    sections_clusters  map, gallery, SAE validation, the nβ = 0 control
    page               `write_report`: the sections assembled and written

`spectro.pipeline.run_report` runs it as the report stage.
"""

from spectro.report.analysis import MAP_MAX_POINTS, MAP_MIN_PER_CLUSTER
from spectro.report.html import ASSETS, SECTIONS, _fmt
from spectro.report.loading import _feature_kind, _features, _Run
from spectro.report.page import MAP_METHODS, write_report

__all__ = ["ASSETS", "MAP_MAX_POINTS", "MAP_METHODS", "MAP_MIN_PER_CLUSTER", "SECTIONS", "_Run", "_feature_kind",
           "_features", "_fmt", "write_report"]
