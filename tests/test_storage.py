"""Runs on object storage (`storage.uri=s3://bucket/prefix`), against moto's
standalone S3 server on loopback (a subprocess speaking real HTTP S3; the
`s3` fixture in tests/conftest.py), with real Ray, real Zarr v3 and s3fs.

Covered: the run location's whole-object reads, writes, listings and deletes;
bad locations fail with one error before any sampling; samples and
checkpoints on S3 are bit-identical to local disk, damaged chunks and
checkpoints on S3 are found and recomputed to the identical result, an actor
killed with SIGKILL resumes to the identical result; the whole pipeline with
`storage.uri` writes every artifact to S3 (chi and every sample array equal
to the same run on local disk), keeps only Hydra's files local, reruns a
single stage on the S3 run, and `xr.open_zarr("s3://...")` reads chi back.
"""

import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import threading

import pytest
import xarray as xr

from spectro import cli, rundir
from spectro.config import to_config
from spectro.errors import ConfigError, StoreError
from spectro.rundir import Location
from spectro.service import checkpoint_path, sample
from spectro.store import SampleStore, read_susceptibilities
from tests.helpers import (ROOT, arrays, assert_identical, compose_cfg, kill_sampler_actor_when, make_store,
                           tiny_config, tiny_problem)


def test_location_writes_whole_objects_lists_and_deletes(s3_bucket):
    run = Location(f"{s3_bucket}/run1")
    assert not run.exists() and run.find() == set()
    rundir.write_json(run / "config.json", {"a": 1, "nan": float("nan")})
    (run / "sub" / "x.bin").write_bytes(b"\x00\x01")
    assert rundir.read_json(run / "config.json") == {"a": 1, "nan": None}
    assert run.find() == {"config.json", "sub/x.bin"} and run.is_dir() and (run / "sub" / "x.bin").exists()
    assert run.existing(["sub/x.bin", "sub/y.bin"]) == {"sub/x.bin"}
    assert [x.name for x in run.rglob("*.bin")] == ["x.bin"] and run.glob("*.bin") == []
    assert (run / "sub" / "x.bin").parent == run / "sub" and str(run / "sub") == f"{s3_bucket}/run1/sub"
    run.delete(["sub/x.bin", "never/was.bin"])
    assert run.find() == {"config.json"}
    run.rmtree()
    assert not run.exists()


def test_unreachable_endpoint_is_one_store_error(s3_bucket):
    import s3fs

    down = s3fs.S3FileSystem(endpoint_url=f"http://127.0.0.1:{_free_port()}", skip_instance_cache=True,
                             config_kwargs={"retries": {"max_attempts": 1}})
    with pytest.raises(StoreError, match=r"cannot access s3://.*/run .*EndpointConnectionError.*AWS_ENDPOINT_URL"):
        Location(f"{s3_bucket}/run", _fs=down).exists()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("uri, message", [
    ("nosuch://bucket/run", r"storage.uri 'nosuch://bucket/run' has the unknown scheme 'nosuch'"),
    ("ftp://127.0.0.1:{port}/run", r"cannot reach ftp://127.0.0.1:\d+/run \(ConnectionRefusedError"),
    ("s3://spectro-no-such-bucket/run", r"the bucket 'spectro-no-such-bucket' does not exist"),
])
def test_bad_storage_uri_is_one_error_before_any_work(uri, message, s3, tmp_path, capsys):
    import ray

    run_dir = tmp_path / "run"
    code = cli.main(compose_cfg(["experiment=smoke", f"storage.uri={uri.format(port=_free_port())}"]), run_dir)
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("spectro: error: "), err
    assert re.search(message, err[0]), err[0]
    assert not run_dir.exists() and not ray.is_initialized()      # nothing sampled, nothing left behind


def test_storage_uri_schema():
    assert to_config({}).storage.uri is None
    assert to_config({"storage": {"uri": "s3://b/run"}}).storage.uri == "s3://b/run"
    with pytest.raises(ConfigError, match="storage.uri must be a URL, a directory or null"):
        to_config({"storage": {"uri": " "}})
    with pytest.raises(ConfigError, match="names no bucket or path"):
        to_config({"storage": {"uri": "s3://"}})


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory, s3, ray_local):
    """The tiny run on local disk: 3 components x 2 chain groups, 6 draws in chunks of 3."""
    problem, config = tiny_problem(), tiny_config(burnin=2)
    run = tmp_path_factory.mktemp("local")
    sample(problem, make_store(run / "samples.zarr", problem, config), config, run / "checkpoints")
    return run, problem, config


def test_samples_and_checkpoints_on_s3_bit_identical_and_repaired(local_reference, s3_bucket, ray_local):
    ref, problem, config = local_reference
    run = Location(f"{s3_bucket}/run")
    store = make_store(run / "samples.zarr", problem, config)
    report = sample(problem, store, config, run / "checkpoints")
    assert len(report.units_run) == 6 and report.units_repaired == []
    assert_identical(arrays(ref / "samples.zarr"), arrays(run / "samples.zarr"))
    assert len((run / "checkpoints").glob("*.pt")) == 6 and not run.rglob("*.partial") and not run.rglob("*.tmp")
    assert not (run / "samples.zarr.creating").exists()
    # damage on S3, four kinds in four units (as tests/test_faults.py does on disk)
    flipped = run / "samples.zarr" / "probe_loss" / "c" / "1" / "0" / "1" / "0"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x10
    flipped.write_bytes(bytes(data))
    truncated = run / "samples.zarr" / "sampling_loss" / "c" / "2" / "1" / "0"
    truncated.write_bytes(truncated.read_bytes()[:9])
    (run / "samples.zarr" / "step_loss" / "c" / "0" / "1" / "1").unlink()
    ckpt = checkpoint_path(run / "checkpoints", "full", [0, 1])
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    (run / "samples.zarr" / "progress" / "c" / "0" / "0").unlink()
    store = SampleStore.open(run / "samples.zarr", mode="r+")
    bad = store.verify()
    assert [(u["component"], u["chains"]) for u in bad] == [("full", [2, 3]), ("l0h1", [0, 1]), ("l1.mlp", [2, 3])]
    assert "missing" in bad[0]["problem"] and "checksum" in bad[1]["problem"] and "checksum" in bad[2]["problem"]
    report = sample(problem, store, config, run / "checkpoints")
    assert len(report.units_repaired) == 3
    redone = sorted((u["component"], tuple(u["chains"]), u["resumed_at"]) for u in report.units_run)
    assert redone == [("full", (0, 1), 0), ("full", (2, 3), 0), ("l0h1", (0, 1), 0), ("l1.mlp", (2, 3), 0)]
    assert store.verify() == []
    assert_identical(arrays(ref / "samples.zarr"), arrays(run / "samples.zarr"))


@pytest.mark.parametrize("store_probe, shards", [("moments", 1), ("draws", 3), ("moments", 3)])
def test_moments_and_probe_shards_on_s3_equal_local_disk(store_probe, shards, s3_bucket, ray_local, tmp_path):
    """The two other write patterns on object storage: alternating moment slots, and shard units that each own
    their token chunks, progress chunk and checkpoint (shards also check their trajectories through the store)."""
    problem, base = tiny_problem(), tiny_config(burnin=2, probe_shards=shards)
    config = dataclasses.replace(base, store=dataclasses.replace(base.store, probe=store_probe))
    stores = {}
    for name, run in [("local", Location(str(tmp_path))), ("s3", Location(f"{s3_bucket}/run"))]:
        report = sample(problem, make_store(run / "samples.zarr", problem, config), config, run / "checkpoints")
        assert len(report.units_run) == 6 * shards
        stores[name] = run / "samples.zarr"
    assert_identical(arrays(stores["local"]), arrays(stores["s3"]))
    assert SampleStore.open(stores["s3"]).verify() == []


def test_store_left_mid_creation_on_s3_is_made_again(local_reference, s3_bucket):
    """Object storage has no rename: a store whose creation stopped (marked, no format attribute) is
    refused by readers and made again by the next run."""
    ref, problem, config = local_reference
    path = Location(f"{s3_bucket}/run/samples.zarr")
    make_store(path, problem, config)
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"] = {"spectro_creating": True}          # the group as it is before the commit
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="still being created"):
        SampleStore.open(path)
    store = make_store(path, problem, config)
    assert store.attrs["spectro_store"] == 2 and store.progress().sum() == 0


@pytest.mark.slow
def test_actor_killed_on_s3_resumes_bit_identical(s3_bucket, ray_local, tmp_path):
    """kill -9 of the only actor while a unit is part-way (a checkpoint committed, draws left): the unit resumes
    from that checkpoint on a new actor and the store equals an uninterrupted run on local disk. 12 draws in
    chunks of 3 leave at least 3 draws between seeing a part-way unit (each look at S3 is a few requests) and
    its end."""
    problem, base = tiny_problem(), tiny_config(burnin=2, num_draws=12)
    one = dataclasses.replace(base, ray=dataclasses.replace(base.ray, num_actors=1))
    local = Location(str(tmp_path))
    sample(problem, make_store(local / "samples.zarr", problem, one), one, local / "checkpoints")
    run = Location(f"{s3_bucket}/run")
    store = make_store(run / "samples.zarr", problem, one)
    killed: list = []

    def part_way():
        prog = SampleStore.open(run / "samples.zarr").progress()
        return bool(((prog > 0) & (prog < one.sampler.num_draws)).any())

    t = threading.Thread(target=kill_sampler_actor_when, args=(part_way, killed))
    t.start()
    report = sample(problem, store, one, run / "checkpoints", poll_s=0.1)
    t.join()
    assert killed, "the test never found an actor to kill"
    assert report.actor_failures == 1 and any(u["resumed_at"] > 0 for u in report.units_run)
    assert_identical(arrays(local / "samples.zarr"), arrays(run / "samples.zarr"))


# --------------------------------------------------------------------------- #
# the pipeline with storage.uri
# --------------------------------------------------------------------------- #

SMALL = ["experiment=smoke", "components=[l0h1,l2.mlp]", "sampler.num_draws=4", "sampler.checkpoint_every=2",
         "sampler.burnin=2", "data.n_probe_contexts=4", "data.n_train_contexts=32", "data.n_sampling_contexts=4",
         "report.map=pca", "ray.num_actors=2"]


@pytest.mark.slow
def test_pipeline_on_s3_matches_local_and_reads_back(s3, s3_bucket, tmp_path, ray_local):
    from spectro import pipeline

    local = tmp_path / "local"
    pipeline.run(to_config(compose_cfg(SMALL)), local)
    uri = f"{s3_bucket}/runs/one"
    hydra_dir = tmp_path / "hydra"
    # the main job from the command line, as a Ray job runs it: its own Ray instance, AWS_* from the environment
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "run.py"), *SMALL, f"storage.uri={uri}",
                           f"hydra.run.dir={hydra_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = rundir.read_json(Location(uri) / "summary.json")
    assert summary["run_dir"] == uri and summary["sample"]["complete"]
    run = Location(uri)
    names = {k.split("/")[0] for k in run.find()}
    assert names == {"config.json", "provenance.json", "samples.zarr", "checkpoints", "susceptibilities.zarr",
                     "clusters.json", "modes.json", "sae", "sae.json", "report.html", "summary.json"}
    assert (run / "sae").find() == {"sae_weights.safetensors", "cfg.json"}
    assert sorted(p.name for p in hydra_dir.iterdir()) == [".hydra", "spectro.log"]     # only Hydra's own files
    assert_identical(arrays(local / "samples.zarr"), arrays(run / "samples.zarr"))
    chi_local = read_susceptibilities(local / "susceptibilities.zarr")["chi"].values
    # the documented reader: xarray straight from the URL (credentials from the environment or storage_options)
    ds = xr.open_zarr(f"{uri}/susceptibilities.zarr", consolidated=False,
                      storage_options={"endpoint_url": s3, "key": "testing", "secret": "testing"})
    assert ds["chi"].dims == ("token", "component") and list(ds["component"].values) == ["full", "l0h1", "l2.mlp"]
    assert ds["chi"].values.tobytes() == chi_local.tobytes()
    assert json.loads((run / "clusters.json").read_text())["labels"] == \
        json.loads((local / "clusters.json").read_text())["labels"]
    assert "l2.mlp" in (run / "report.html").read_text()
    # one stage again on the existing S3 run (the readers take the URL)
    (run / "clusters.json").unlink()
    again = pipeline.run(to_config(compose_cfg([*SMALL, f"storage.uri={uri}", "stage=clusters"])), hydra_dir)
    assert (run / "clusters.json").exists() and again["clusters"]["n_tokens"] == chi_local.shape[0]
