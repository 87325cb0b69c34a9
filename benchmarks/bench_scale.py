"""The post-sampling chain at scale, end to end, through the product's own stage code.

It draws a hard planted chi (`spectro.clusters.planted.hard_planted`, as benchmarks/bench_clusters.py:
60 * sqrt(N / 20,000) Zipf groups, 15% background tokens, a dominant uniform mode) of N tokens
x C components, and writes it as a real run directory the later stages accept:

- samples.zarr through `SampleStore.create_or_open`: the layout (`full` + C components, 4
  chains, 4 draws, N / 100 probe contexts of 101 tokens), the probe table (token ids, texts,
  sources, contexts) and no draws (the stages after the susceptibilities read none);
- susceptibilities.zarr through `SusceptibilityStore`: chi (the mean of 4 per-chain estimates,
  each the planted chi plus independent noise of 0.05 of its column's standard deviation),
  chi_se, chi_per_chain, chi_half (the means of chains 0-1 and 2-3), the split-half
  reliability (`spectro.susceptibilities.run_reliability`), per-component diagnostics, commit;
- config.json (the schema defaults), provenance.json, summary.json.

Then it runs `spectro.pipeline.run_clusters` (features, kNN graph, conductance clustering with
the schema's defaults, clusters.json, modes.json, split-half reliability, stability: both halves
clustered again) and `spectro.pipeline.run_report` (its map a seeded subsample of
`spectro.report.MAP_MAX_POINTS` tokens). The product's functions are wrapped, not changed, to
time each step: wall and CPU seconds and the peak resident memory of the process while the step
ran (sampled every 20 ms; the process's baseline included; the planted chi is freed before the
stages, which read the run directory only), and
ru_maxrss at the end. It prints one table row per step, the size of report.html and of
clusters.json, the number of clusters, and whether the chain after writing the run directory
fits 30 minutes and 8 GB.

    OMP_NUM_THREADS=1 python benchmarks/bench_scale.py                 # 1,000,000 tokens x 32
    python benchmarks/bench_scale.py --tokens 20000 --keep /tmp/run20k  # keep the run directory

`--tokens` is rounded up to a multiple of 100 (tokens per probe context).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spectro.clusters.planted import hard_planted  # noqa: E402

from common import PeakRSS, planted_groups  # noqa: E402  (peak RSS sampled every 20 ms)

PER_CONTEXT = 100            # probe tokens per context (seq_len 101: position 0 is no probe token)
N_CHAINS = 4
NOISE = 0.05                 # per-chain noise, in units of the column's standard deviation
BLOCK = 100_000              # tokens per write to susceptibilities.zarr
BUDGET_S, BUDGET_GB = 30 * 60, 8.0


ROWS: list[dict] = []
_DEPTH = [0]


@contextlib.contextmanager
def step(name: str):
    """Time one step; nested steps are indented under their parent in the table."""
    row = {"step": "  " * _DEPTH[0] + name}
    ROWS.append(row)
    _DEPTH[0] += 1
    t, c = time.perf_counter(), time.process_time()
    try:
        with PeakRSS() as m:
            yield row
    finally:
        _DEPTH[0] -= 1
        row.update(wall=time.perf_counter() - t, cpu=time.process_time() - c, peak=m.peak)


def timed(module, attr: str, name: str) -> None:
    """Wrap `module.attr` so that every call is a step."""
    fn = getattr(module, attr)

    def wrapper(*a, **kw):
        with step(name):
            return fn(*a, **kw)

    if isinstance(module, type):                   # a classmethod: getattr gave the bound method
        setattr(module, attr, classmethod(lambda cls, *a, **kw: wrapper(*a, **kw)))
    else:
        setattr(module, attr, wrapper)


def instrument() -> None:
    from spectro import stability
    from spectro.clusters import clustering, files
    from spectro.report import analysis, loading, page

    timed(files, "read_input", "read susceptibilities.zarr")
    timed(clustering, "features", "features")
    timed(clustering, "token_graph", "kNN + graph")
    timed(clustering, "cluster_graph", "conductance clustering")
    timed(files, "write_clusters", "write clusters.json")
    timed(files, "compute_modes", "modes (SVD)")
    timed(files, "write_modes", "write modes.json")
    timed(stability, "stability", "stability (both halves clustered)")
    timed(loading._Run, "load", "read the run directory")
    timed(page, "_features", "features")
    timed(page, "_map_data", "map (subsample)")
    timed(analysis, "_umap_xy", "UMAP")
    timed(page, "_gallery_data", "gallery data")
    timed(page, "_render", "render the page")


def probe_table(n: int, groups: np.ndarray, rng: np.random.Generator):
    """Token ids tied to the groups (so clusters have telling top tokens), texts, sources, contexts."""
    from spectro.store import ProbeTable

    vocab = 5000
    ids = np.where(groups >= 0, (groups * 37 + rng.integers(0, 5, n)) % vocab, rng.integers(0, vocab, n))
    text_of = np.array([f" w{i}" for i in range(vocab)], dtype=object)
    n_ctx = n // PER_CONTEXT
    input_ids = np.empty((n_ctx, PER_CONTEXT + 1), dtype=np.int64)
    input_ids[:, 0] = rng.integers(0, vocab, n_ctx)
    input_ids[:, 1:] = ids.reshape(n_ctx, PER_CONTEXT)
    source = np.where(np.arange(n_ctx) % 2 == 0, "prose", "code").repeat(PER_CONTEXT)
    return ProbeTable(input_ids=input_ids, context=np.arange(n) // PER_CONTEXT, position=np.arange(n) % PER_CONTEXT + 1,
                      token_id=ids, text=text_of[ids].tolist(), source=source.astype(object).tolist())


def write_run(run_dir: Path, chi: np.ndarray, groups: np.ndarray, seed: int, config) -> None:
    """A run directory with the files the clusters and report stages read (module doc)."""
    from spectro import rundir
    from spectro.config import as_dict
    from spectro.store import Layout, SampleStore
    from spectro.store.susceptibilities import DIAGNOSTICS, SusceptibilityStore
    from spectro.susceptibilities import run_reliability

    rng = np.random.default_rng(seed + 1)
    n, C = chi.shape
    comps = ["full"] + [f"l{j // 8}h{j % 8}" for j in range(C)]
    layout = Layout.plan(comps, N_CHAINS, 4, n // PER_CONTEXT, PER_CONTEXT + 1, N_CHAINS, 4)
    run_dir.mkdir(parents=True)
    cfg = as_dict(config)
    samples = SampleStore.create_or_open(
        run_dir / rundir.SAMPLES, layout, fingerprint={"synthetic": "bench_scale", "seed": seed}, config=cfg,
        model={"source": "synthetic (benchmarks/bench_scale.py)"}, data={"synthetic": True}, init_loss=3.0,
        probe=probe_table(n, groups, rng))
    out = SusceptibilityStore.create(run_dir / rundir.SUSCEPTIBILITIES, samples, layout.token_chunk, N_CHAINS)
    scale = NOISE * chi.std(axis=0)
    for t0 in range(0, n, BLOCK):
        t1 = min(n, t0 + BLOCK)
        base = chi[t0:t1]
        per = base[None] + rng.standard_normal((N_CHAINS,) + base.shape) * scale
        per = np.concatenate([per.sum(axis=2, keepdims=True), per], axis=2)        # `full` first
        half = np.stack([per[:2].mean(axis=0), per[2:].mean(axis=0)])
        out.write_block(t0, t1, per.mean(axis=0), per.std(axis=0, ddof=1) / np.sqrt(N_CHAINS), per, half)
    rel = run_reliability(out, comps)
    diag = {"llc_mean": np.full(C + 1, 40.0), "llc_std": np.full(C + 1, 2.0), "mean_phi": np.full(C + 1, 0.1),
            "rhat": np.full(C + 1, 1.01), "rhat_p": np.full(C + 1, np.nan),
            "ess_bulk": np.full(C + 1, 200.0), "n_chains_used": np.full(C + 1, N_CHAINS),
            "n_diverged": np.zeros(C + 1), "not_mixed": np.zeros(C + 1, dtype=bool),
            "displacement": np.full(C + 1, 0.1), "not_local": np.zeros(C + 1, dtype=bool)}
    if set(diag) != set(DIAGNOSTICS):
        raise SystemExit(f"bench_scale writes {sorted(diag)} but the store expects {sorted(DIAGNOSTICS)}")
    out.write_diagnostics(diag, {"form": "synthetic", "partial": False, "excluded_chains": [], "nbeta": 1.0,
                                 "reliability": rel, "init_loss": 3.0, "components_without_chains": []})
    out.commit(run_dir / rundir.SUSCEPTIBILITIES)
    rundir.write_json(run_dir / rundir.CONFIG, cfg)
    from spectro import __version__
    rundir.write_json(run_dir / rundir.PROVENANCE, {
        "model": {"source": "synthetic", "id": f"planted chi (benchmarks/bench_scale.py, seed {seed})"},
        "data": {"description": "synthetic probe tokens", "sources": ["code", "prose"]},
        "n_probe_tokens": n, "init_loss": 3.0, "spectro": __version__})
    rundir.write_json(run_dir / rundir.SUMMARY, {"synthetic": True})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--components", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, default=None, help="write the run directory here and keep it")
    args = ap.parse_args()
    from spectro import pipeline
    from spectro.config import to_config
    from spectro.report import MAP_MAX_POINTS

    n = -(-args.tokens // PER_CONTEXT) * PER_CONTEXT
    config = to_config({})
    tmp = None
    if args.keep is None:
        tmp = tempfile.mkdtemp(prefix="bench_scale_")
        run_dir = Path(tmp) / "run"
    else:
        run_dir = args.keep
        shutil.rmtree(run_dir, ignore_errors=True)
    print(f"{n:,} tokens x {args.components} components, seed {args.seed}, run directory {run_dir}, "
          f"clustering {config.clustering}, report map {config.report.map} of at most {MAP_MAX_POINTS:,} tokens",
          flush=True)
    try:
        with step("planted chi (spectro.clusters.planted)"):
            groups_n = planted_groups(n)
            chi, groups = hard_planted(n, args.seed, n_components=args.components, n_groups=groups_n)
        with step("write run directory"):
            write_run(run_dir, chi, groups, args.seed, config)
        del chi, groups                  # the stages read the run directory only
        instrument()
        chain = []
        with step("clusters stage (pipeline.run_clusters)") as row:
            out = pipeline.run_clusters(config, run_dir)
        chain.append(row)
        with step("report stage (pipeline.run_report)") as row:
            pipeline.run_report(config, run_dir)
        chain.append(row)
        report(run_dir, out, chain, groups_n)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def report(run_dir: Path, out: dict, chain: list[dict], groups_n: int) -> None:
    print("\n| step | wall s | CPU s | peak RSS GB |\n|---|---|---|---|")
    for r in ROWS:
        print(f"| {r['step']} | {r['wall']:.1f} | {r['cpu']:.1f} | {r['peak'] / 2 ** 30:.2f} |")
    html = (run_dir / "report.html").stat().st_size / 2 ** 20
    cj = (run_dir / "clusters.json").stat().st_size / 2 ** 20
    stab = out.get("stability") or {}
    print(f"\nreport.html {html:.1f} MB; clusters.json {cj:.1f} MB; modes.json "
          f"{(run_dir / 'modes.json').stat().st_size / 2 ** 20:.2f} MB")
    print(f"clusters {out['n_clusters']} (planted groups {groups_n}), noise {out['n_noise']:,} of "
          f"{out['n_tokens']:,}; stability ARI {stab.get('ari')}, clusters of the halves "
          f"{stab.get('n_clusters_halves')}; verdict: {out['verdict']['text']}")
    browser(run_dir)
    wall = sum(r["wall"] for r in chain)
    peak = max(r["peak"] for r in chain) / 2 ** 30
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    fits = wall <= BUDGET_S and peak <= BUDGET_GB
    print(f"chain (clusters + report stages): {wall / 60:.1f} min, peak RSS {peak:.2f} GB (ru_maxrss of the whole "
          f"process {maxrss:.2f} GB): {'fits' if fits else 'does NOT fit'} {BUDGET_S // 60} min and {BUDGET_GB:.0f} GB")


def browser(run_dir: Path) -> None:
    """Time a headless Chromium load of report.html (scripts run, DOM dumped), when Chromium is installed."""
    exe = shutil.which("chromium")
    if exe is None:
        print("chromium not installed: no browser load timed")
        return
    with tempfile.TemporaryDirectory() as profile:
        t = time.perf_counter()
        done = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                               "--disable-background-networking", f"--user-data-dir={profile}", "--dump-dom",
                               (run_dir / "report.html").resolve().as_uri()], capture_output=True, text=True,
                              timeout=300)
        secs = time.perf_counter() - t
    dom = done.stdout
    cards = dom.count('class="card')
    errors_hidden = bool(re.search(r'id="js-errors"[^>]*hidden', dom))
    print(f"headless Chromium load (--dump-dom, process start to exit): {secs:.1f} s, exit {done.returncode}, "
          f"{cards} cluster cards rendered on the first page, "
          f"{'no script error' if errors_hidden else 'SCRIPT ERRORS shown'}")


if __name__ == "__main__":
    main()
