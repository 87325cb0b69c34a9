"""`store.probe=moments`: units keep per-chain float64 moment sums instead of every draw's probe losses.

The same config sampled in both modes draws the same chains (seeds depend only on the config), so the
moments a unit publishes must be the sums the covariance job forms from the draws store, and chi, chi_se,
chi_per_chain, chi_half and the reliability figures must agree. A unit stopped between any two of its
writes resumes to bit-identical sums, and a store is never reopened in the other mode."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from spectro.config import to_config
from spectro.errors import ConfigError, StoreError
from spectro.estimator import ChainMoments
from spectro.service import run_unit, sample
from spectro.store import MOMENT_ARRAYS, SampleStore, read_susceptibilities
from spectro.susceptibilities import compute, online_estimate, select_chains
from tests.helpers import (Stopped, arrays, assert_identical, kill_actor_mid_run, make_store, stopping_store, tiny_config,
                           tiny_problem)

N_DRAWS = 7            # checkpoint_every=3: blocks of 3, 3 and 1 draws; 4 chains in 2 groups, antithetic pairs
RESULTS = ("chi", "chi_se", "chi_per_chain", "chi_half")


def config_for(mode: str, **sampler):
    c = tiny_config(num_draws=N_DRAWS, **sampler)
    assert c.sampler.antithetic and c.sampler.num_chains // c.sampler.chain_group == 2
    return dataclasses.replace(c, store=dataclasses.replace(c.store, probe=mode))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_local):
    """The same config sampled and estimated in both modes."""
    problem = tiny_problem()
    out = {}
    for mode in ("draws", "moments"):
        run = tmp_path_factory.mktemp(mode)
        config = config_for(mode)
        store = make_store(run / "samples.zarr", problem, config)
        sample(problem, store, config, run / "checkpoints")
        summary = compute(run, nbeta=config.sampler.nbeta)
        out[mode] = {"run": run, "store": SampleStore.open(run / "samples.zarr"), "summary": summary,
                     "ds": read_susceptibilities(run / "susceptibilities.zarr")}
    return out


def draws_moments(store: SampleStore, ci: int, k: int, n: int) -> ChainMoments:
    """A chain's sums over its first n draws, formed from a draws store one draw chunk at a time (as the job does)."""
    L = store.layout
    m = ChainMoments(L.n_tokens)
    for d0 in range(0, n, L.draw_chunk):
        d1 = min(d0 + L.draw_chunk, n)
        m.add(store.read("sampling_loss")[ci, k, d0:d1], store.read("probe_loss")[ci, k, d0:d1], store.init_loss)
    return m


def committed_slot(store: SampleStore, ci: int, k: int) -> dict:
    n = int(store.progress()[ci, k])
    slot = store.layout.moment_slot(n)
    return {name.removeprefix("moment_"): store.read(name)[ci, k, slot] for name in MOMENT_ARRAYS}


def test_moments_mode_gives_the_chi_of_draws_mode(runs):
    d, m = runs["draws"], runs["moments"]
    # the same chains: every per-draw array is bit-identical; only the probe storage differs
    a, b = arrays(d["run"] / "samples.zarr"), arrays(m["run"] / "samples.zarr")
    assert "probe_loss" in a and "probe_loss" not in b and set(MOMENT_ARRAYS) <= set(b)
    assert_identical({k: v for k, v in a.items() if k != "probe_loss"},
                     {k: v for k, v in b.items() if not k.startswith("moment_")})
    # each chain's published sums are exactly what the covariance job forms from the draws store
    L = m["store"].layout
    for ci in range(len(L.components)):
        for k in range(L.n_chains):
            ref, got = draws_moments(d["store"], ci, k, N_DRAWS), committed_slot(m["store"], ci, k)
            assert got["n"] == ref.n == N_DRAWS
            assert got["phi"] == ref.s_phi and got["phi2"] == ref.s_phi2
            np.testing.assert_array_equal(got["phiD"], ref.s_phiD)
            np.testing.assert_array_equal(got["D"], ref.s_D)
    # so every estimate agrees, to far below the chi scale, per component
    for name in RESULTS:
        x, y = d["ds"][name].values, m["ds"][name].values
        assert x.shape == y.shape and np.isfinite(x).all() and np.isfinite(y).all(), name
        scale = np.abs(d["ds"]["chi"].values).max(axis=0)                       # (components,)
        assert np.all(np.abs(x - y) <= 1e-10 * scale), name
    assert d["summary"]["reliability"] is not None
    for key, value in d["summary"]["reliability"].items():
        assert m["summary"]["reliability"][key] == (pytest.approx(value, rel=1e-9) if isinstance(value, float)
                                                    else value), key
    for name in ("rhat", "ess_bulk", "llc_mean"):                                # per-draw diagnostics, both modes
        np.testing.assert_array_equal(d["ds"][name].values, m["ds"][name].values)


def test_online_estimate_in_both_modes(runs):
    d, m = online_estimate(runs["draws"]["store"]), online_estimate(runs["moments"]["store"])
    scale = np.abs(d["chi"]).max(axis=0)
    assert np.all(np.abs(d["chi"] - m["chi"]) <= 1e-10 * scale)
    assert np.all(np.abs(d["chi_se"] - m["chi_se"]) <= 1e-10 * scale)
    np.testing.assert_array_equal(d["draws"], m["draws"])


def test_moments_store_layout_and_integrity(runs, tmp_path):
    import shutil

    import xarray as xr

    store = runs["moments"]["store"]
    L = store.layout
    C, N, T = len(L.components), L.n_chains, L.n_tokens
    ds = xr.open_zarr(runs["moments"]["run"] / "samples.zarr", consolidated=False)
    assert ds["moment_phiD"].dims == ("component", "chain", "slot", "token") and ds["moment_phiD"].shape == (C, N, 2, T)
    assert ds["moment_n"].dims == ("component", "chain", "slot") and ds["moment_n"].dtype == np.int64
    assert store.group["moment_phiD"].chunks == (1, L.chain_group, 1, L.token_chunk)
    assert store.group["moment_phi"].chunks == (1, L.chain_group, 1)
    # the slot not pointed at holds the sums of the block before the last: 6 draws
    assert (ds["moment_n"].values[:, :, L.moment_slot(N_DRAWS)] == N_DRAWS).all()
    assert (ds["moment_n"].values[:, :, 1 - L.moment_slot(N_DRAWS)] == 6).all()
    with pytest.raises(StoreError, match="store.probe=moments: it keeps per-chain sums"):
        store.read("probe_loss")
    assert store.verify() == []
    # a damaged moments chunk of a committed slot is found by verify and reset_unit removes both slots
    copy = tmp_path / "samples.zarr"
    shutil.copytree(runs["moments"]["run"] / "samples.zarr", copy)
    damaged = SampleStore.open(copy, mode="r+")
    chunk = copy / damaged._chunk_key("moment_D", (1, 1, L.moment_slot(N_DRAWS), 0))
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    chunk.write_bytes(bytes(raw))
    bad = damaged.verify()
    assert [(u["component"], u["chains"]) for u in bad] == [(L.components[1], [2, 3])]
    assert "moment_D" in bad[0]["problem"]
    damaged.reset_unit(L.components[1], [2, 3])
    assert damaged.verify() == [] and (damaged.progress()[1, 2:4] == 0).all()
    for slot in (0, 1):
        assert not (copy / damaged._chunk_key("moment_phiD", (1, 1, slot, 0))).exists()
        assert not (copy / damaged._chunk_key("moment_n", (1, 1, slot))).exists()


# ---------------------------------------------------------------- a unit stopped between two of its writes


UNIT = ("full", (0, 1))


def run_one_unit(problem, store, config, checkpoints: Path):
    checkpoints.mkdir(exist_ok=True)
    return run_unit(problem, store, UNIT[0], UNIT[1], config.sampler, config.sampler.seed, checkpoints)


@pytest.fixture(scope="module")
def unit_refs(tmp_path_factory):
    """One unit sampled without interruption, in each mode (in this process: no Ray)."""
    torch.set_num_threads(1)
    problem = tiny_problem()
    out = {}
    for mode in ("draws", "moments"):
        run = tmp_path_factory.mktemp(f"unit-{mode}")
        config = config_for(mode)
        run_one_unit(problem, make_store(run / "samples.zarr", problem, config), config, run / "checkpoints")
        out[mode] = run
    return problem, out


# (where the unit stops, the how-manieth time it gets there, draws committed then): blocks of 3, 3 and 1 draws
@pytest.mark.parametrize("point, at, committed", [("moment_phiD", 2, 3), ("moment_D", 3, 6), ("write_block", 2, 3),
                                                  ("set_progress", 1, 0), ("set_progress", 3, 6)])
def test_unit_stopped_between_writes_resumes_to_identical_moments(unit_refs, tmp_path, point, at, committed):
    problem, refs = unit_refs
    config = config_for("moments")
    path = tmp_path / "samples.zarr"
    make_store(path, problem, config)
    with pytest.raises(Stopped):
        run_one_unit(problem, stopping_store(path, point, at), config, tmp_path / "checkpoints")
    # what a reader sees now is whole: the slot `progress` points at holds the sums of exactly those draws
    store = SampleStore.open(path)
    draws_store = SampleStore.open(refs["draws"] / "samples.zarr")
    assert int(store.progress()[0, 0]) == committed and store.verify() == []
    for k in (0, 1):
        if committed:
            got, ref = committed_slot(store, 0, k), draws_moments(draws_store, 0, k, committed)
            assert got["n"] == committed and got["phi"] == ref.s_phi
            np.testing.assert_array_equal(got["phiD"], ref.s_phiD)
    if committed:                                                      # a partial estimate reads that slot
        sel = select_chains(store, partial=True)
        assert sel.partial and (sel.draws[0, :2] == committed).all()
    # resuming finishes the unit with every array, the moment sums included, bit-identical
    report = run_one_unit(problem, SampleStore.open(path, mode="r+"), config, tmp_path / "checkpoints")
    assert report["resumed_at"] in (0, 3, 6, 7)
    assert_identical(arrays(refs["moments"] / "samples.zarr"), arrays(path))


def test_resumed_unit_never_overwrites_the_committed_slot(unit_refs, tmp_path):
    """Stopped after its second checkpoint but before progress (progress 3 -> slot 0, checkpoint 6), then
    stopped again inside the resumed unit's first block (draw 7 -> slot 0): the resumed unit first publishes the
    progress its checkpoint reached, so the slot it tears is not the one progress points at."""
    problem, refs = unit_refs
    config = config_for("moments")
    path = tmp_path / "samples.zarr"
    make_store(path, problem, config)
    with pytest.raises(Stopped):
        run_one_unit(problem, stopping_store(path, "set_progress", 2), config, tmp_path / "checkpoints")
    assert int(SampleStore.open(path).progress()[0, 0]) == 3
    with pytest.raises(Stopped):
        run_one_unit(problem, stopping_store(path, "moment_phiD", 1), config, tmp_path / "checkpoints")
    store = SampleStore.open(path)
    assert int(store.progress()[0, 0]) == 6
    ref = draws_moments(SampleStore.open(refs["draws"] / "samples.zarr"), 0, 1, 6)
    got = committed_slot(store, 0, 1)
    assert got["n"] == 6 and got["phi"] == ref.s_phi
    np.testing.assert_array_equal(got["D"], ref.s_D)
    run_one_unit(problem, SampleStore.open(path, mode="r+"), config, tmp_path / "checkpoints")
    assert_identical(arrays(refs["moments"] / "samples.zarr"), arrays(path))


@pytest.mark.slow
def test_actor_killed_mid_run_resumes_to_identical_moments(runs, tmp_path, ray_local):
    """kill -9 of the only sampler actor mid-run: the service re-queues its unit from the checkpoint, and the
    finished store, moment sums included, is bit-identical to the uninterrupted run's."""
    import threading

    problem, config = tiny_problem(), config_for("moments")
    one = dataclasses.replace(config, ray=dataclasses.replace(config.ray, num_actors=1))
    store = make_store(tmp_path / "samples.zarr", problem, one)
    killed = []
    t = threading.Thread(target=kill_actor_mid_run, args=(tmp_path / "samples.zarr", killed, 2 * 3))
    t.start()
    report = sample(problem, store, one, tmp_path / "checkpoints", poll_s=0.1)
    t.join()
    assert killed and report.actor_failures == 1
    assert any(u["resumed_at"] > 0 for u in report.units_run)
    assert_identical(arrays(runs["moments"]["run"] / "samples.zarr"), arrays(tmp_path / "samples.zarr"))


# ---------------------------------------------------------------- the mode belongs to the store


def test_store_is_not_reopened_in_the_other_mode(tmp_path):
    problem = tiny_problem()
    for made, asked in (("draws", "moments"), ("moments", "draws")):
        path = tmp_path / f"{made}.zarr"
        make_store(path, problem, config_for(made))
        with pytest.raises(StoreError, match=f"keeps probe losses as store.probe={made}, but this run asks for "
                                             f"store.probe={asked}; rerun with store.probe={made} to resume"):
            make_store(path, problem, config_for(asked))
        assert SampleStore.open(path).layout.probe == made              # refused, untouched
    with pytest.raises(ConfigError, match="store.probe must be one of draws, moments"):
        to_config({"store": {"probe": "sums"}})
    assert to_config({}).store.probe == "draws"
