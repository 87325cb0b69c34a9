"""The sampling service end to end on a real local Ray instance and a real
Zarr v3 store: shapes, names, dtypes, plausibility, bit-identical results
across actor counts and faults, divergence handling."""

import threading

import numpy as np
import pytest
import xarray as xr

from spectro.config import as_dict
from spectro.device import release_host_memory
from spectro.service import sample
from spectro.store import SampleStore
from tests.helpers import (COMPONENTS, arrays, assert_identical, kill_actor_mid_run, make_store, tiny_config,
                           tiny_problem)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ray_local):
    """An uninterrupted run with 2 actors."""
    problem, config = tiny_problem(), tiny_config()
    run = tmp_path_factory.mktemp("ref")
    store = make_store(run / "samples.zarr", problem, config)
    report = sample(problem, store, config, run / "checkpoints")
    return run, problem, config, report


def test_store_shapes_names_dtypes_and_values(reference):
    run, problem, config, report = reference
    assert len(report.units_run) == 3 * 2 and report.actor_failures == 0
    # actors spent most of the stage inside units (the rest: their start-up and the last unit's tail), and
    # every unit ended with one heap trim (the draws of these tiny units never grow the heap by 128 MB)
    unit_seconds = sum(u["seconds"] for u in report.units_run)
    assert report.actor_seconds == pytest.approx(unit_seconds) and 0 < unit_seconds <= 2 * report.seconds
    assert report.actor_utilisation == pytest.approx(unit_seconds / (2 * report.seconds))
    assert [u["heap_trims"] for u in report.units_run] == [1 if release_host_memory() else 0] * 6
    ds = xr.open_zarr(run / "samples.zarr", consolidated=False)
    assert ds["probe_loss"].dims == ("component", "chain", "draw", "token")
    assert ds["sampling_loss"].dims == ("component", "chain", "draw")
    assert ds["probe_loss"].shape == (3, 4, 6, 3 * 11)
    assert ds["probe_loss"].dtype == np.float32 and ds["sampling_loss"].dtype == np.float64
    assert list(ds["component"].values) == COMPONENTS
    s = ds["sampling_loss"].values
    assert np.isfinite(s).all() and np.isfinite(ds["probe_loss"].values).all()
    init = problem.init_loss
    # plausible: near the loss at w* (random tiny model, ln 96 ≈ 4.56), moving but not far
    assert abs(init - np.log(96)) < 0.5
    assert np.all(np.abs(s - init) < 0.5) and np.abs(s - init).max() > 1e-6
    assert (ds["progress"].values == 6).all() and (ds["diverged_at"].values == -1).all()
    assert np.all(ds["distance"].values[:, :, -1] > 0)
    # restricted components move less than the full run
    assert ds["distance"].values[0].mean() > ds["distance"].values[1].mean()


def test_one_actor_bit_identical_to_two(reference, tmp_path, ray_local):
    run, problem, config, _ = reference
    import dataclasses
    one = dataclasses.replace(config, ray=dataclasses.replace(config.ray, num_actors=1))
    store = make_store(tmp_path / "samples.zarr", problem, one)
    sample(problem, store, one, tmp_path / "checkpoints")
    assert_identical(arrays(run / "samples.zarr"), arrays(tmp_path / "samples.zarr"))


@pytest.mark.slow
def test_actor_killed_mid_unit_resumes_bit_identical(reference, tmp_path, ray_local):
    run, problem, config, _ = reference
    import dataclasses
    slow = dataclasses.replace(config, ray=dataclasses.replace(config.ray, num_actors=1))
    store = make_store(tmp_path / "samples.zarr", problem, slow)
    killed = []
    # kill -9 the actor once some unit has committed a checkpoint but the run is not done
    t = threading.Thread(target=kill_actor_mid_run, args=(tmp_path / "samples.zarr", killed, 2 * 3))
    t.start()
    report = sample(problem, store, slow, tmp_path / "checkpoints", poll_s=0.1)
    t.join()
    assert killed, "the test never found an actor to kill"
    assert report.actor_failures == 1
    assert any(u["resumed_at"] > 0 for u in report.units_run)   # resumed from a checkpoint, not from scratch
    assert_identical(arrays(run / "samples.zarr"), arrays(tmp_path / "samples.zarr"))


def test_resume_skips_complete_units(reference, ray_local):
    run, problem, config, _ = reference
    store = SampleStore.open(run / "samples.zarr", mode="r+")
    report = sample(problem, store, config, run / "checkpoints")
    assert report.units_run == [] and report.units_skipped == 6


def test_diverging_chains_are_recorded_not_averaged(tmp_path, ray_local):
    problem = tiny_problem()
    config = tiny_config(step_size=5.0, gamma=0.0, nbeta=1000.0, divergence_bound=2.0)
    store = make_store(tmp_path / "samples.zarr", problem, config)
    sample(problem, store, config, tmp_path / "checkpoints")
    a = arrays(tmp_path / "samples.zarr")
    div = a["diverged_at"]
    assert (div >= 0).sum() >= 4, div                  # the huge step size diverges chains
    for c, k in zip(*np.nonzero(div >= 0)):
        assert np.isnan(a["sampling_loss"][c, k, div[c, k]:]).all()
        assert np.isnan(a["probe_loss"][c, k, div[c, k]:]).all()
    ok = div < 0
    healthy = a["sampling_loss"][ok]
    assert np.isfinite(healthy).all()


def test_store_refuses_other_config_and_foreign_dirs(reference, tmp_path):
    from spectro.errors import StoreError

    run, problem, config, _ = reference
    other = tiny_config(step_size=2e-3)
    with pytest.raises(StoreError, match="keys that differ: sampler.step_size"):
        make_store(run / "samples.zarr", problem, other)
    (tmp_path / "foreign.zarr").mkdir()
    (tmp_path / "foreign.zarr" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    with pytest.raises(StoreError, match="not a spectro sample store"):
        SampleStore.open(tmp_path / "foreign.zarr")
    with pytest.raises(StoreError, match="no sample store"):
        SampleStore.open(tmp_path / "nothing.zarr")


def test_wandb_offline_logs_every_chain_trace(tmp_path, ray_local):
    import glob

    from spectro.config import WandbConfig
    from spectro.monitor import Monitor
    from tests.wandb_reader import history, summary, wait_complete

    problem, config = tiny_problem(), tiny_config(num_draws=3, checkpoint_every=3)
    store = make_store(tmp_path / "samples.zarr", problem, config)
    mon = Monitor(WandbConfig(mode="offline", project="spectro-test"), tmp_path, as_dict(config), nbeta=8.0)
    sample(problem, store, config, tmp_path / "checkpoints", on_poll=mon.poll, poll_s=0.2)
    per_comp = mon.finish(store)
    files = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    wait_complete(files[0])
    rows = history(files[0])
    s = store.read("sampling_loss")
    for ci, comp in enumerate(COMPONENTS):
        for k in range(4):
            key = f"{comp}/chain{k}/phi"
            logged = sorted((r["draw"], r[key]) for r in rows if key in r)
            assert [d for d, _ in logged] == [0, 1, 2]
            np.testing.assert_allclose([v for _, v in logged], s[ci, k] - store.init_loss, rtol=1e-12)
            llc = [r[f"{comp}/chain{k}/llc"] for r in sorted(rows, key=lambda r: r["draw"]) if f"{comp}/chain{k}/llc" in r]
            np.testing.assert_allclose(llc[-1], 8.0 * (s[ci, k].mean() - store.init_loss), rtol=1e-10)
            assert any(f"{comp}/chain{k}/grad_norm" in r for r in rows)
    summ = summary(files[0])
    for comp in COMPONENTS:
        assert summ[f"{comp}/llc_mean"] == pytest.approx(per_comp[comp]["llc_mean"])
        assert summ[f"{comp}/diverged_chains"] == 0
