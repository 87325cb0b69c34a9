"""The sample stage on local disk and on object storage (`storage.uri`), side by side.

Runs the tiny problem (benchmarks/common.py: 3 components x 2 chain groups, 6 draws in chunks of 3, 2 actors)
into a local directory and into an S3 prefix served by moto's standalone server on loopback (a subprocess
speaking HTTP S3; a real bucket adds network latency per request), `--repeats` times each, and prints per
location the median seconds of the sample stage, of `SampleStore.verify()` (the resume check) and of a full
read of `probe_loss`, the objects written, and the S3/local ratios. Every S3 run is checked bit-identical to
the local one.

    python benchmarks/bench_storage.py                 # 4 repeats, alternating which location goes first
    python benchmarks/bench_storage.py --repeats 5 --draws 12
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import (arrays, assert_identical, make_store, s3_env, start_s3_server, tiny_config,  # noqa: E402
                    tiny_problem)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--draws", type=int, default=6)
    args = ap.parse_args()

    proc, endpoint = start_s3_server()
    os.environ.update(s3_env(endpoint))              # before Ray starts: its workers inherit it
    try:
        run(args)
    finally:
        proc.kill()


def run(args) -> None:
    import boto3
    import ray

    from spectro.rundir import Location
    from spectro.service import sample
    from spectro.store import SampleStore

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    problem, config = tiny_problem(), tiny_config(burnin=2, num_draws=args.draws)
    times: dict[str, dict[str, list[float]]] = {"local": {}, "s3": {}}
    objects = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for kind in (("local", "s3") if r % 2 == 0 else ("s3", "local")):   # alternate: Ray warms up
                run_dir = Location(Path(tmp) / f"r{r}") if kind == "local" else Location(f"s3://{bucket}/r{r}")
                t = times[kind]
                t0 = time.perf_counter()
                store = make_store(run_dir / "samples.zarr", problem, config)
                sample(problem, store, config, run_dir / "checkpoints")
                t.setdefault("sample", []).append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                assert SampleStore.open(run_dir / "samples.zarr").verify() == []
                t.setdefault("verify", []).append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                SampleStore.open(run_dir / "samples.zarr").read("probe_loss")
                t.setdefault("read probe_loss", []).append(time.perf_counter() - t0)
                objects[kind] = len(run_dir.find())
            assert_identical(arrays(Location(Path(tmp) / f"r{r}") / "samples.zarr"),
                             arrays(Location(f"s3://{bucket}/r{r}") / "samples.zarr"))
    ray.shutdown()
    print(f"tiny run, {args.draws} draws, {args.repeats} repeats; medians in seconds (S3 = moto on loopback)")
    print(f"{'':18s}{'local':>10s}{'s3':>10s}{'s3/local':>10s}")
    for step in times["local"]:
        lo, s3 = statistics.median(times["local"][step]), statistics.median(times["s3"][step])
        print(f"{step:18s}{lo:10.3f}{s3:10.3f}{s3 / lo:10.2f}")
    print(f"{'objects written':18s}{objects['local']:10d}{objects['s3']:10d}")
    print("every S3 run bit-identical to the local run: yes")


if __name__ == "__main__":
    main()
