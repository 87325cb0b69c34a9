"""Does this checkout compute bit for bit what another revision computes?

    python benchmarks/check_identical.py --against fb8e14f          # run both, compare
    python benchmarks/check_identical.py --reference runs/ref       # compare with a finished run
    python benchmarks/check_identical.py --against HEAD~1 --keep /tmp/ident -- sampler.probe_shards=2

Runs a small real pipeline (`jobs/run.py experiment=smoke wandb.mode=disabled`, plus any Hydra overrides after
`--`) from this checkout, and compares with the reference run:
- every array of `samples.zarr` and `susceptibilities.zarr`: same names, shapes and dtypes, and the same values
  bit for bit (NaN where the other has NaN, every other value byte-identical; strings equal);
- every file of both stores other than the group's own `zarr.json` (whose attributes hold run provenance such as
  the model's path): each array's metadata and every chunk, byte for byte;
- the cluster labels of `clusters.json`.

The reference is either a finished run directory (`--reference DIR`) or made here by running revision REV
(`--against REV`) with the same Python and overrides in a temporary git worktree, removed at the end. Both runs
start with the run's tree as the working directory and first on PYTHONPATH: Ray workers put the driver's working
directory first on sys.path, so each run's actors import that run's `spectro`.

Prints one row per compared item, "identical" or "DIFFERS" (with what differs), and exits 1 if anything differs.
A smoke run takes one to several minutes, depending on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import zarr

ROOT = Path(__file__).resolve().parents[1]
STORES = ("samples.zarr", "susceptibilities.zarr")
BASE_OVERRIDES = ("experiment=smoke", "wandb.mode=disabled")


def run_pipeline(tree: Path, run_dir: Path, overrides: list[str]) -> None:
    """`jobs/run.py` of `tree` into `run_dir`, with `tree` as working directory and first on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, str(tree / "jobs" / "run.py"), *BASE_OVERRIDES, *overrides, f"hydra.run.dir={run_dir}"]
    print(f"running {' '.join(cmd[1:])}\n  in {tree}", flush=True)
    done = subprocess.run(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        sys.exit(f"the run in {tree} failed (exit {done.returncode}):\n{done.stdout[-4000:]}")


def arrays(store: Path) -> dict[str, np.ndarray]:
    """Every array of a Zarr group, by its path inside the group."""
    group = zarr.open_group(zarr.storage.LocalStore(store, read_only=True), mode="r")
    return {name: np.asarray(arr[...]) for name, arr in sorted(group.arrays())}


def compare(a: np.ndarray, b: np.ndarray) -> str | None:
    """None if bit-identical (NaN where the other has NaN), else what differs."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"shape/dtype {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
    if a.dtype.kind not in "fc":
        equal = np.array_equal(a, b)
        return None if equal else f"{int((a != b).sum())} of {a.size} values differ"
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    if not np.array_equal(nan_a, nan_b):
        return f"NaN at {int((nan_a != nan_b).sum())} other positions"
    x, y = np.ascontiguousarray(a[~nan_a]), np.ascontiguousarray(b[~nan_b])
    if x.tobytes() == y.tobytes():
        return None
    diff = np.abs(x.astype(np.float64) - y.astype(np.float64))
    return f"{int((x != y).sum())} of {x.size} values differ (max |diff| {diff.max():.3g})"


def compare_files(store: Path, other: Path) -> str | None:
    """None if every file under the two stores but the group's `zarr.json` is byte-identical, else what differs."""
    files = [{str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} - {"zarr.json"}
             for root in (store, other)]
    if files[0] != files[1]:
        return f"{len(files[0] ^ files[1])} files are in one store only, e.g. {sorted(files[0] ^ files[1])[0]}"
    differ = sorted(f for f in files[0] if (store / f).read_bytes() != (other / f).read_bytes())
    return f"{len(differ)} of {len(files[0])} files differ, e.g. {differ[0]}" if differ else None


def compare_runs(run: Path, reference: Path) -> list[tuple[str, str | None]]:
    rows = []
    for store in STORES:
        rows.append((f"{store} (every chunk and array metadata file)", compare_files(run / store, reference / store)))
        mine, theirs = arrays(run / store), arrays(reference / store)
        for name in sorted(set(mine) | set(theirs)):
            if name not in mine or name not in theirs:
                rows.append((f"{store}/{name}", f"only in {'the reference' if name in theirs else 'this run'}"))
                continue
            rows.append((f"{store}/{name}", compare(mine[name], theirs[name])))
    labels = [np.asarray(json.loads((r / "clusters.json").read_text())["labels"]) for r in (run, reference)]
    rows.append(("clusters.json labels", compare(*labels)))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--reference", type=Path, help="a finished run directory to compare with")
    which.add_argument("--against", metavar="REV", help="a git revision to run as the reference")
    ap.add_argument("--keep", type=Path, help="write both runs under this directory and keep them")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for both runs (after --)")
    args = ap.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="check_identical_"))
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / "this"
    shutil.rmtree(run_dir, ignore_errors=True)
    reference = args.reference
    if args.against:
        tree = work / "reference-tree"
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.against], cwd=ROOT, check=True)
        try:
            reference = work / "reference"
            shutil.rmtree(reference, ignore_errors=True)
            run_pipeline(tree, reference, args.overrides)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=True)
    run_pipeline(ROOT, run_dir, args.overrides)
    rows = compare_runs(run_dir, reference)
    width = max(len(name) for name, _ in rows)
    for name, problem in rows:
        print(f"{name:<{width}}  {'identical' if problem is None else 'DIFFERS: ' + problem}")
    differ = sum(problem is not None for _, problem in rows)
    print(f"\n{len(rows) - differ} of {len(rows)} identical" + (f"; {differ} DIFFER" if differ else ""))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
