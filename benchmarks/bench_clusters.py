"""Clustering benchmark on the hard planted family (`spectro.clusters.planted.hard_planted`).

For each size and seed it draws a family (32 components; 60 Zipf groups at 20,000
tokens, 60 * sqrt(N / 20,000) groups at N tokens; 15% background tokens; a uniform
mode with most of the variance), builds the features and the kNN graph once per
feature kind and k, and runs each method on the same graph. Per run it prints:

- ARI: adjusted Rand index on the grouped tokens (noise, -1, counts as one cluster);
- ARI all: the same over all tokens, background and noise as one class;
- bg noise: share of background tokens labelled noise; grp noise: share of grouped ones;
- clusters (truth: the number of groups) and recovered: groups matched by a cluster
  with Jaccard >= 0.5 (ARI is dominated by the largest groups; this counts small ones);
- seconds per stage (features, kNN + graph, clustering) and the peak resident memory
  of each stage (sampled every 20 ms; the process's baseline included).

The summary gives medians over the tune seeds and, separately, over the held-out
seeds (the defaults were chosen on the tune seeds only). `--grid` reruns a parameter
grid on the tune seeds, as the defaults were chosen.

    python benchmarks/bench_clusters.py                          # 20k: tune 0-3, held-out 10-14
    python benchmarks/bench_clusters.py --sizes 100000 --tune-seeds --held-out 100 --methods conductance leiden
    python benchmarks/bench_clusters.py --grid k=8,10,12,15 max_conductance=0.3,0.4,0.5 --held-out
    python benchmarks/bench_clusters.py --knn-recall --sizes 100000 --tune-seeds --held-out 100
    python benchmarks/bench_clusters.py --real                   # the committed chi of the embedded default
    python benchmarks/bench_clusters.py --knn-compare --sizes 100000 --tune-seeds --held-out 0
    python benchmarks/bench_clusters.py --noise 0.9 --methods conductance leiden   # a noisier family
    python benchmarks/bench_clusters.py --noise-rules --methods conductance        # labelling background noise
    python benchmarks/bench_clusters.py --ceiling --methods conductance leiden    # vs a supervised readout

`--ceiling` adds supervised, cross-validated readouts of the true groups on the same features
(`ceiling`: logistic regression and an MLP): not clusterings, what features this noisy allow.
`--real` clusters tests/reference/embedded_chi.npz (every component but `full`) with each
config and prints the number of clusters, the noise share, the cluster sizes, and role
purity and NMI against the same clusters with shuffled roles (`spectro.roles`, 20 shuffles).
`--knn-compare` times the kNN libraries on the centred features (k from the defaults) and
prints each one's recall against exact neighbours on 1,000 tokens: faiss exact, faiss IVF
(the library's approximate path, and with 16 and 64 cells searched), faiss HNSW, pynndescent.

Set OMP_NUM_THREADS=1 for one-thread figures (faiss and BLAS).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spectro.clusters import (ClusterParams, _graph, adjusted_rand_index, cluster_graph, features,  # noqa: E402
                              knn_lists, relative_density)
from spectro.clusters.planted import hard_planted  # noqa: E402

from common import PeakRSS, planted_groups  # noqa: E402

# The defaults before they were chosen on this family.
OLD = dict(features="zscore", k=15, alpha=0.15, epsilon=1e-4, max_conductance=0.4, min_size=5, max_size=400,
           resolution=1.0, exact_knn_below=20000, outlier_ratio=0.8)
# Settings published for this kind of analysis (column standardisation, row centring, k 45, PPR alpha
# 0.001 with push tolerance 1e-7, minimum cluster size 20).
PUBLISHED = dict(features="centred", k=45, alpha=0.001, epsilon=1e-7, min_size=20, max_size=0, outlier_ratio=0.0)
CONFIGS = {
    "conductance": dict(method="conductance"),
    "leiden": dict(method="leiden"),
    "spectral": dict(method="spectral"),
    "conductance-zscore": dict(method="conductance", features="zscore"),
    "old-conductance": dict(OLD, method="conductance"),
    "old-leiden": dict(OLD, method="leiden"),
    "published": dict(PUBLISHED, method="conductance"),
}
GRAPH_KEYS = ("features", "k", "exact_knn_below", "seed", "outlier_ratio")


def recovered(groups: np.ndarray, labels: np.ndarray) -> int:
    """Groups whose best-overlapping cluster has Jaccard >= 0.5 with them."""
    out = 0
    sizes = np.bincount(labels[labels >= 0]) if (labels >= 0).any() else np.zeros(0)
    for g in range(int(groups.max()) + 1):
        lab = labels[groups == g]
        lab = lab[lab >= 0]
        if lab.size == 0:
            continue
        c = np.bincount(lab).argmax()
        inter = int((lab == c).sum())
        out += inter / ((groups == g).sum() + sizes[c] - inter) >= 0.5
    return out


def score(groups: np.ndarray, labels: np.ndarray) -> dict:
    grouped = groups >= 0
    return {"ARI": adjusted_rand_index(groups[grouped], labels[grouped]),
            "ARI all": adjusted_rand_index(groups, labels),
            "bg noise": float((labels[~grouped] < 0).mean()),
            "grp noise": float((labels[grouped] < 0).mean()),
            "clusters": int(labels.max()) + 1 if (labels >= 0).any() else 0,
            "recovered": recovered(groups, labels)}


def build_graph(chi: np.ndarray, p: ClusterParams) -> dict:
    with PeakRSS() as m1:
        t = time.perf_counter()
        X = features(chi, p.features)
        t_feat = time.perf_counter() - t
    with PeakRSS() as m2:
        t = time.perf_counter()
        nbr, sim = knn_lists(X, p.k, p.seed, p.exact_knn_below)
        W = _graph(nbr, sim)
        outlier = relative_density(nbr, sim) < p.outlier_ratio
        t_graph = time.perf_counter() - t
    return {"X": X, "nbr": nbr, "W": W, "outlier": outlier, "features s": t_feat, "features MB": m1.mb,
            "graph s": t_graph, "graph MB": m2.mb}


def knn_recall(X: np.ndarray, nbr: np.ndarray, rng: np.random.Generator, n_query: int = 1000) -> float:
    """Share of the exact k nearest (by brute force) that `nbr` holds, over a sample of tokens."""
    k = nbr.shape[1]
    q = rng.choice(X.shape[0], size=min(n_query, X.shape[0]), replace=False)
    hits = []
    for s in range(0, q.size, 100):
        qq = q[s:s + 100]
        S = X[qq] @ X.T
        S[np.arange(qq.size), qq] = -np.inf
        exact = np.argpartition(-S, k, axis=1)[:, :k]
        hits += [np.intersect1d(e, nbr[i]).size / k for e, i in zip(exact, qq)]
    return float(np.mean(hits))


NOISE_RULES = {"edge share": (0.4, 0.5, 0.6, 0.7), "kNN share": (0.5, 0.6, 0.7), "centroid cosine": (0.3, 0.4, 0.5)}


def noise_rules(g: dict, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Labels with a post-hoc rule's weak members turned to noise, per rule and threshold: the share of a
    member's edge weight inside its cluster ("edge share"), the share of its k nearest neighbours in its
    cluster ("kNN share"), the cosine of its feature row with its cluster's mean direction ("centroid cosine")."""
    W, X, nbr = g["W"], g["X"], g["nbr"]
    n = labels.size
    rows = np.repeat(np.arange(n), np.diff(W.indptr))
    inside = (labels[rows] == labels[W.indices]) & (labels[rows] >= 0)
    deg = np.maximum(np.bincount(rows, weights=W.data, minlength=n), 1e-12)
    score = {"edge share": np.bincount(rows, weights=W.data * inside, minlength=n) / deg,
             "kNN share": ((labels[nbr] == labels[:, None]) & (labels[:, None] >= 0)).mean(axis=1),
             "centroid cosine": np.zeros(n)}
    for c in range(int(labels.max()) + 1):
        m = labels == c
        mean = X[m].mean(axis=0)
        score["centroid cosine"][m] = X[m] @ (mean / max(np.linalg.norm(mean), 1e-12))
    out = {}
    for rule, thresholds in NOISE_RULES.items():
        for t in thresholds:
            lab = labels.copy()
            lab[score[rule] < t] = -1
            out[f"+ {rule} < {t}"] = lab
    return out


def ceiling(X: np.ndarray, groups: np.ndarray, seed: int, bg_noise: float = 0.8) -> dict[str, np.ndarray]:
    """What *supervised* readouts of the features reach on the planted groups: a multinomial logistic
    regression and a one-hidden-layer MLP (256 units), both scikit-learn, with the background as one more
    class, trained on the true groups and predicted out of fold (3 stratified folds). Each gives labels three
    ways: its most probable class ("argmax": background -> noise), the most probable group for every token
    ("no noise"), and the most probable group with the tokens whose background probability is highest
    labelled noise until a share `bg_noise` of the background is ("bg noise 0.8"). No clustering sees labels;
    these say what features this noisy allow."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.neural_network import MLPClassifier

    out = {}
    models = {"logistic": LogisticRegression(C=10.0, max_iter=2000),
              "MLP": MLPClassifier((256,), max_iter=300, random_state=seed)}
    for name, model in models.items():
        folds = StratifiedKFold(3, shuffle=True, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            proba = cross_val_predict(model, X, groups + 1, cv=folds, method="predict_proba")  # (tokens, 1+groups)
        best, p_bg = proba[:, 1:].argmax(axis=1), proba[:, 0]
        cut = np.quantile(p_bg[groups < 0], 1.0 - bg_noise)
        out |= {f"ceiling {name}: argmax": proba.argmax(axis=1) - 1, f"ceiling {name}: no noise": best,
                f"ceiling {name}: bg noise {bg_noise}": np.where(p_bg >= cut, -1, best)}
    return out


def run_seed(n: int, seed: int, configs: dict, recall: bool, noise: float | None = None,
             rules: bool = False, with_ceiling: bool = False) -> list[dict]:
    chi, groups = hard_planted(n, seed, n_groups=planted_groups(n), **({} if noise is None else {"noise": noise}))
    graphs, rows = {}, []
    for name, cfg in configs.items():
        p = ClusterParams(**cfg)
        key = tuple(getattr(p, f) for f in GRAPH_KEYS)
        if key not in graphs:
            graphs[key] = build_graph(chi, p)
            if recall:
                r = knn_recall(graphs[key]["X"], graphs[key]["nbr"], np.random.default_rng(seed))
                print(f"  kNN ({'exact' if n < p.exact_knn_below else 'faiss IVF'}, k={p.k}, {p.features}): "
                      f"recall {r:.4f} on 1,000 tokens, {graphs[key]['graph s']:.1f} s", flush=True)
        g = graphs[key]
        with PeakRSS() as m:
            t = time.perf_counter()
            labels = cluster_graph(g["W"], g["outlier"], p, g["X"])
            secs = time.perf_counter() - t
        row = {"config": name, "n": n, "seed": seed, **score(groups, labels), "features s": g["features s"],
               "graph s": g["graph s"], "cluster s": secs,
               "peak MB": max(g["features MB"], g["graph MB"], m.mb)}
        rows.append(row)
        print(f"  {name:>16} seed {seed:3d}: " + "  ".join(_fmt(k, row[k]) for k in COLUMNS), flush=True)
        if rules and p.method == "conductance":
            for rule, lab in noise_rules(g, labels).items():
                rows.append({**row, "config": f"{name} {rule}", **score(groups, lab)})
    if with_ceiling:
        X = next(iter(graphs.values()))["X"] if graphs else features(chi, ClusterParams().features)
        for name, lab in ceiling(X, groups, seed).items():
            row = {"config": name, "n": n, "seed": seed, **score(groups, lab), "features s": 0.0, "graph s": 0.0,
                   "cluster s": 0.0, "peak MB": 0.0}
            rows.append(row)
            print(f"  {name:>16} seed {seed:3d}: " + "  ".join(_fmt(k, row[k]) for k in COLUMNS[:6]), flush=True)
    return rows


COLUMNS = ("ARI", "ARI all", "bg noise", "grp noise", "clusters", "recovered", "features s", "graph s",
           "cluster s", "peak MB")


def _fmt(key: str, v) -> str:
    if key in ("clusters", "recovered"):
        return f"{key} {int(v):4d}"
    if key.endswith(" s"):
        return f"{key} {v:6.2f}"
    if key == "peak MB":
        return f"{key} {v:6.0f}"
    return f"{key} {v:.3f}"


def summary(rows: list[dict], title: str) -> None:
    if not rows:
        return
    print(f"\n{title} (medians)")
    print("| config | N | seeds | groups | " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * (4 + len(COLUMNS)))
    for (name, n), rs in itertools.groupby(sorted(rows, key=lambda r: (r["n"], list(CONFIGS).index(r["config"])
                                                                       if r["config"] in CONFIGS else 99, r["config"])),
                                           key=lambda r: (r["config"], r["n"])):
        rs = list(rs)
        med = {k: float(np.median([r[k] for r in rs])) for k in COLUMNS}
        cells = []
        for k in COLUMNS:
            if k in ("clusters", "recovered"):
                cells.append(f"{med[k]:.0f}")
            elif k.endswith(" s"):
                cells.append(f"{med[k]:.2f}")
            elif k == "peak MB":
                cells.append(f"{med[k]:.0f}")
            else:
                cells.append(f"{med[k]:.3f}")
        seeds = ",".join(str(r["seed"]) for r in rs)
        print(f"| {name} | {n:,} | {seeds} | {planted_groups(n)} | " + " | ".join(cells) + " |")


def real(configs: dict) -> None:
    from collections import Counter

    from spectro.clusters import cluster
    from spectro.roles import role_agreement, token_roles

    ref = np.load(Path(__file__).resolve().parents[1] / "tests" / "reference" / "embedded_chi.npz")
    names = [str(c) for c in ref["components"]]
    chi = ref["chi"].astype(np.float64)[:, [i for i, c in enumerate(names) if c != "full"]]
    roles = token_roles(ref["token_text"], ref["token_source"])
    share = {r: float(np.mean(roles == r)) for r in set(roles)}
    print(f"embedded default: {chi.shape[0]} tokens x {chi.shape[1]} components")
    for name, cfg in configs.items():
        t = time.perf_counter()
        result = cluster(chi, ClusterParams(**cfg))
        secs = time.perf_counter() - t
        a = role_agreement(result.labels, roles, seed=0, shuffles=20)
        enriched = {}
        for c in result.clusters:
            for r, k in Counter(roles[c["members"]].tolist()).items():
                if k >= 10:
                    enriched[r] = max(enriched.get(r, 0.0), k / c["size"] / share[r])
        sizes = [c["size"] for c in result.clusters]
        print(f"{name}: {len(sizes)} clusters, noise {float((result.labels < 0).mean()):.3f}, sizes {sizes}, "
              f"{secs:.1f} s\n  purity {a['purity']:.3f} vs shuffled {a['purity_shuffled']:.3f} "
              f"(max {a['purity_shuffled_max']:.3f}); NMI {a['nmi']:.3f} vs shuffled {a['nmi_shuffled']:.3f} "
              f"(max {a['nmi_shuffled_max']:.3f}); largest enrichment per role: "
              + ", ".join(f"{r} {e:.1f}x" for r, e in sorted(enriched.items(), key=lambda x: -x[1])), flush=True)


def knn_compare(n: int, seed: int) -> None:
    import faiss

    from spectro.clusters import graph as C          # the kNN settings live there

    chi, _ = hard_planted(n, seed, n_groups=planted_groups(n))
    X = features(chi)
    Xf = np.ascontiguousarray(X, dtype=np.float32)
    k = ClusterParams().k
    print(f"== kNN on {n} tokens (seed {seed}), k={k}, {faiss.omp_get_max_threads()} faiss thread(s)", flush=True)

    def lib(exact_below, probe=None):
        old = C._IVF_PROBE
        C._IVF_PROBE = probe or old
        try:
            return knn_lists(X, k, seed, exact_below)[0]
        finally:
            C._IVF_PROBE = old

    def hnsw(ef):
        index = faiss.IndexHNSWFlat(Xf.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 64
        index.add(Xf)
        index.hnsw.efSearch = ef
        return _drop_self(index.search(Xf, k + 1)[1], k)

    def nndescent():
        from pynndescent import NNDescent

        index = NNDescent(Xf, metric="cosine", n_neighbors=k + 1, random_state=seed, n_jobs=1, low_memory=True)
        return _drop_self(index.neighbor_graph[0], k)

    runs = [("faiss exact (IndexFlatIP)", lambda: lib(10 ** 12)),
            (f"faiss IVF, {C._IVF_PROBE} cells searched (default)", lambda: lib(0)),
            ("faiss IVF, 16 cells searched", lambda: lib(0, 16)),
            ("faiss IVF, 64 cells searched", lambda: lib(0, 64)),
            ("faiss HNSW (M 32, efSearch 64)", lambda: hnsw(64)),
            ("pynndescent (defaults, one job)", nndescent)]
    for name, fn in runs:
        t = time.perf_counter()
        try:
            nbr = fn()
        except ImportError as e:
            print(f"  {name}: not installed ({e})")
            continue
        secs = time.perf_counter() - t
        print(f"  {name}: {secs:.1f} s, recall {knn_recall(X, nbr, np.random.default_rng(seed)):.4f}", flush=True)


def _drop_self(found: np.ndarray, k: int) -> np.ndarray:
    own = found == np.arange(found.shape[0])[:, None]
    drop = np.where(own.any(axis=1), own.argmax(axis=1), k)
    keep = np.ones(found.shape, dtype=bool)
    keep[np.arange(found.shape[0]), drop] = False
    return found[keep].reshape(-1, k)


def parse_grid(items: list[str]) -> list[dict]:
    fields = {f.name: f.type for f in dataclasses.fields(ClusterParams)}
    axes = []
    for item in items:
        key, _, values = item.partition("=")
        if key not in fields or not values:
            raise SystemExit(f"--grid takes key=v1,v2 with a ClusterParams field as key; got {item!r}")
        default = getattr(ClusterParams(), key)
        cast = float if default is None else type(default) if not isinstance(default, bool) else bool
        axes.append([(key, cast(v)) for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[20000])
    ap.add_argument("--tune-seeds", type=int, nargs="*", default=[0, 1, 2, 3])
    ap.add_argument("--held-out", type=int, nargs="*", default=[10, 11, 12, 13, 14])
    ap.add_argument("--methods", nargs="+", default=["conductance", "leiden", "spectral", "old-conductance",
                                                     "old-leiden"], choices=list(CONFIGS))
    ap.add_argument("--grid", nargs="+", default=None, metavar="KEY=V1,V2",
                    help="conductance over this grid of ClusterParams values (on --tune-seeds)")
    ap.add_argument("--knn-recall", action="store_true", help="also print the kNN's recall against exact")
    ap.add_argument("--real", action="store_true", help="cluster the committed chi of the embedded default")
    ap.add_argument("--knn-compare", action="store_true", help="time the kNN libraries and their recall")
    ap.add_argument("--noise", type=float, default=None, help="the planted family's noise level (default: its own)")
    ap.add_argument("--noise-rules", action="store_true",
                    help="also turn weak members of the conductance clusters to noise by post-hoc rules")
    ap.add_argument("--ceiling", action="store_true",
                    help="also print a supervised readout of the true groups (what the features allow at best)")
    args = ap.parse_args()
    if args.knn_compare:
        for n in args.sizes:
            for seed in args.tune_seeds + args.held_out:
                knn_compare(n, seed)
        return
    configs = {m: CONFIGS[m] for m in args.methods}
    if args.real:
        real(configs)
        return
    if args.grid:
        configs = {}
        for combo in parse_grid(args.grid):
            name = " ".join(f"{k}={v}" for k, v in combo.items())
            configs[name] = dict(combo)
            CONFIGS.setdefault(name, configs[name])
    tune, held = [], []
    for n in args.sizes:
        for seed in args.tune_seeds:
            print(f"== {n} tokens, seed {seed} (tune)", flush=True)
            tune += run_seed(n, seed, configs, args.knn_recall, args.noise, args.noise_rules, args.ceiling)
        for seed in args.held_out:
            print(f"== {n} tokens, seed {seed} (held out)", flush=True)
            held += run_seed(n, seed, configs, args.knn_recall, args.noise, args.noise_rules, args.ceiling)
    summary(tune, "Tune seeds")
    summary(held, "Held-out seeds")


if __name__ == "__main__":
    main()
