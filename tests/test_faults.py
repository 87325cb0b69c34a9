"""Fault injection, quick variant (the full one, with counts, is
benchmarks/fault_injection.py): real processes, real Ray, real Zarr.

Covered here: damaged chunks and checkpoints are detected and recomputed; a
writer SIGKILLed in the middle of chunk writes leaves every chunk old or new,
never torn; a full disk (a real size-limited tmpfs) stops the run with one
clear error and a rerun after freeing space finishes bit-identically; the
covariance job killed mid-run reruns to the identical chi. Killing an actor
(tests/test_service.py), the driver (tests/test_cli.py) and removing a node
(tests/test_multinode.py) are tested where they were built.
"""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from spectro.errors import DiskFullError, StoreError
from spectro.service import checkpoint_path, sample
from spectro.store import SampleStore
from tests.helpers import arrays, assert_identical, make_store, tiny_config, tiny_problem

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow          # fault injection: killed processes, a full tmpfs


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ray_local):
    """An uninterrupted run: 3 components x 2 chain groups, 6 draws in chunks of 3."""
    problem, config = tiny_problem(), tiny_config(burnin=2)
    run = tmp_path_factory.mktemp("ref")
    store = make_store(run / "samples.zarr", problem, config)
    sample(problem, store, config, run / "checkpoints")
    return run, problem, config


def chunk(run, name, key):
    return run / "samples.zarr" / name / "c" / key


def test_damaged_chunks_and_checkpoints_are_recomputed_bit_identical(reference, tmp_path, ray_local):
    ref, problem, config = reference
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    # four kinds of damage, in four different units
    flipped = chunk(run, "probe_loss", "1/0/1/0")             # l0h1 chains 0-1, draws 3-5: one bit flipped
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x10
    flipped.write_bytes(bytes(data))
    truncated = chunk(run, "sampling_loss", "2/1/0")            # l1.mlp chains 2-3: cut short
    truncated.write_bytes(truncated.read_bytes()[:9])
    chunk(run, "step_loss", "0/1/1").unlink()                  # full chains 2-3: a committed chunk vanished
    ckpt = checkpoint_path(run / "checkpoints", "full", [0, 1])
    ckpt.write_bytes(ckpt.read_bytes()[:100])                  # full chains 0-1: checkpoint truncated ...
    chunk(run, "progress", "0/0").unlink()                     # ... and its progress lost (committed -> 0)
    (chunk(run, "probe_loss", "2/0/0/0").parent / "0.1234abcd.partial").write_bytes(b"half a chunk")

    store = SampleStore.open(run / "samples.zarr", mode="r+")
    bad = store.verify()
    assert [(u["component"], u["chains"]) for u in bad] == [("full", [2, 3]), ("l0h1", [0, 1]), ("l1.mlp", [2, 3])]
    assert "step_loss chunk (0, 1, 1) is missing" in bad[0]["problem"]
    assert "checksum" in bad[1]["problem"] and "checksum" in bad[2]["problem"]
    # never read as data: the covariance stage refuses the damaged store
    from spectro.pipeline import run_susceptibilities
    with pytest.raises(StoreError, match=r"3 unit\(s\) of .* have damaged chunks .* rerun the sample stage"):
        run_susceptibilities(config, run)

    report = sample(problem, store, config, run / "checkpoints")
    assert len(report.units_repaired) == 3
    redone = sorted((u["component"], tuple(u["chains"]), u["resumed_at"]) for u in report.units_run)
    assert redone == [("full", (0, 1), 0), ("full", (2, 3), 0), ("l0h1", (0, 1), 0), ("l1.mlp", (2, 3), 0)]
    assert store.verify() == [] and not list((run / "samples.zarr").rglob("*.partial"))
    assert_identical(arrays(ref / "samples.zarr"), arrays(run / "samples.zarr"))


WRITER = textwrap.dedent("""
    import sys, numpy as np
    from spectro.store import SampleStore, TRACE_ARRAYS
    store = SampleStore.open(sys.argv[1], mode="r+")
    L = store.layout
    print("ready", flush=True)
    for rnd in range(1, 10**6):      # rewrite every chunk, round after round: values in [rnd, rnd + 0.5)
        noise = np.random.default_rng(rnd)
        for comp, chains in L.units():
            for d0 in range(0, L.n_draws, L.draw_chunk):
                g, n = len(chains), min(L.draw_chunk, L.n_draws - d0)
                store.write_block(comp, chains, d0, sampling_loss=np.full((g, n), rnd, float),
                                  probe_loss=(rnd + 0.5 * noise.random((g, n, L.n_tokens))).astype(np.float32),
                                  traces={t: np.full((g, n), rnd, float) for t in TRACE_ARRAYS},
                                  diverged_at=np.full(g, -1))
        print(rnd, flush=True)
""")


def kill_mid_write(proc, store_path: Path, rng, tries: int = 2000) -> bool:
    """Freeze the writer at random moments until it is caught with a chunk half-written
    (zarr's `<chunk>.<uuid>.partial` temp file exists), then SIGKILL it there."""
    import psutil

    ps = psutil.Process(proc.pid)
    for _ in range(tries):
        time.sleep(rng.uniform(0.0, 0.01))
        proc.send_signal(signal.SIGSTOP)
        while ps.status() != psutil.STATUS_STOPPED:             # the signal is asynchronous
            time.sleep(0.0005)
        if list(store_path.rglob("*.partial")):
            proc.send_signal(signal.SIGKILL)
            return True
        proc.send_signal(signal.SIGCONT)
    proc.send_signal(signal.SIGKILL)
    return False


def test_writer_killed_mid_chunk_write_leaves_whole_chunks(tmp_path):
    """A process writing 4 MB probe chunks is SIGKILLed while a chunk is half on disk:
    every chunk still decodes (crc32c) to the values of one whole write, and the
    killed writer's temp files are removed by verify."""
    from types import SimpleNamespace

    problem = tiny_problem()
    big = SimpleNamespace(probe_ids=problem.probe_ids.repeat(400, 1), init_loss=problem.init_loss)  # 13,200 tokens
    store = make_store(tmp_path / "samples.zarr", big, tiny_config(num_draws=4, checkpoint_every=4))
    rng = np.random.default_rng(0)
    for attempt in range(2):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(store.path)], cwd=ROOT, stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline().strip() == "ready"
        proc.stdout.readline()                                   # one whole round on disk
        assert kill_mid_write(proc, store.path, rng), "never caught the writer inside a chunk write"
        proc.wait(timeout=30)
        assert list(store.path.rglob("*.partial"))               # the torn write is there ...
        for name in ("sampling_loss", "probe_loss"):
            values = store.read(name)                            # ... but never read: every chunk decodes
            for ci in range(values.shape[0]):
                for c0 in (0, 2):
                    rounds = np.unique(np.floor(values[ci, c0:c0 + 2]))
                    assert rounds.size == 1 and rounds[0] >= 1, f"{name} chunk ({ci}, {c0}) mixes writes"
        assert store.verify(remove_partial=True) == []
        assert not list(store.path.rglob("*.partial"))


def mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_disk_full_stops_with_one_error_and_resumes_identically(reference, tmp_path, ray_local):
    ref, problem, config = reference
    import dataclasses

    one = dataclasses.replace(config, ray=dataclasses.replace(config.ray, num_actors=1))   # a deterministic order
    disk = tmp_path / "disk"
    # 560 KB: the store (92 KB on tmpfs), a unit's first chunk and checkpoint (~320 KB), not its second checkpoint
    if not mount_tmpfs(disk, "560k"):
        pytest.skip("needs root and `mount -t tmpfs` to make a size-limited directory")
    try:
        run = disk / "run"
        store = make_store(run / "samples.zarr", problem, one)
        with pytest.raises(DiskFullError, match="no space left on the device .* rerun the same command to resume"):
            sample(problem, store, one, run / "checkpoints")
        assert store.progress().sum() == 2 * 3                  # the first chunk of the first unit, committed, kept
        assert not list(run.rglob("*.partial")) and not list(run.rglob("*.tmp"))
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)     # free space
        report = sample(problem, store, config, run / "checkpoints")
        assert report.units_skipped + len(report.units_run) == 6
        assert_identical(arrays(ref / "samples.zarr"), arrays(run / "samples.zarr"))
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


COVARIANCE = textwrap.dedent("""
    import sys, ray
    from spectro import susceptibilities
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    susceptibilities.compute(sys.argv[1], nbeta=8.0)
""")


def test_covariance_job_killed_mid_run_reruns_to_identical_chi(reference, tmp_path, ray_local):
    import psutil
    import xarray as xr

    from spectro import susceptibilities

    ref, _, _ = reference
    clean = tmp_path / "clean"
    shutil.copytree(ref / "samples.zarr", clean / "samples.zarr")
    susceptibilities.compute(clean, nbeta=8.0)
    run = tmp_path / "run"
    shutil.copytree(ref / "samples.zarr", run / "samples.zarr")
    proc = subprocess.Popen([sys.executable, "-c", COVARIANCE, str(run)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (run / "susceptibilities.zarr.partial" / "chi").exists():
        time.sleep(0.02)
    assert proc.poll() is None, "the covariance job ended before it could be interrupted"
    family = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)                                # the driver, mid-job
    proc.wait(timeout=30)
    for p in family:                                                # and its private Ray instance
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    assert not (run / "susceptibilities.zarr").exists()             # nothing half-written in place
    susceptibilities.compute(run, nbeta=8.0)
    assert not (run / "susceptibilities.zarr.partial").exists()
    a = xr.open_zarr(clean / "susceptibilities.zarr", consolidated=False)
    b = xr.open_zarr(run / "susceptibilities.zarr", consolidated=False)
    for name in ("chi", "chi_se", "chi_per_chain", "llc_mean", "rhat"):
        assert a[name].values.tobytes() == b[name].values.tobytes(), name
    assert np.isfinite(b["chi"].values).all()
