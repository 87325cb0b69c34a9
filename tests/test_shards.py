"""`sampler.probe_shards=S`: a unit is (component, chain group, probe shard).

Every shard unit of a chain group replays the same SGLD trajectory and evaluates only its own probe contexts,
so a sharded run stores the numbers of the unsharded one: the same per-draw scalars, the same probe losses
(bit-identical where the evaluation batches of `observables.BODY_ROWS` rows coincide, and measured bit-identical
on this CPU where they do not), hence the same chi. The shards own whole token chunks, resume and repair per
shard, and a store is never reopened with another S."""

import dataclasses
import shutil

import numpy as np
import pytest
import torch

from spectro.config import to_config
from spectro.errors import ConfigError, StoreError
from spectro.observables import BODY_ROWS
from spectro.sampling import make_problem
from spectro.service import SamplingFailed, check_trajectories, run_unit, sample, unit_checkpoint
from spectro.store import Layout, SampleStore, read_susceptibilities, shard_contexts
from spectro.susceptibilities import block_estimate, compute, online_estimate, select_chains
from tests.helpers import (COMPONENTS, Stopped, arrays, assert_identical, kill_actor_mid_run, make_store, stopping_store,
                           tiny_config, tiny_model)

SEQ = 64                       # BODY_ROWS // SEQ = 64 contexts per evaluation batch
ALIGNED = 191                  # shards of 64, 64, 63 contexts: boundaries on evaluation batch boundaries
UNALIGNED = 131                # shards of 44, 44, 43 contexts: boundaries inside batches (and inside S=1's chunk)
RESULTS = ("chi", "chi_se", "chi_per_chain", "chi_half")


def problem_with(n_probe: int):
    model = tiny_model(max_pos=SEQ)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (16 + 4 + n_probe, SEQ), generator=g)
    return make_problem(model, ids[:16], ids[16:20], ids[20:])


def config_for(shards: int, n_probe: int, **sampler):
    c = tiny_config(num_draws=7, **sampler)
    return dataclasses.replace(c, sampler=dataclasses.replace(c.sampler, probe_shards=shards),
                               data=dataclasses.replace(c.data, seq_len=SEQ, n_probe_contexts=n_probe))


def in_process(problem, config, run):
    """Every unit of a run in this process, in the service's order (no Ray); the estimates come from the
    driver's `online_estimate`, the covariance job's code (`block_estimate`) over the whole token range."""
    store = make_store(run / "samples.zarr", problem, config)
    (run / "checkpoints").mkdir()
    reports = [run_unit(problem, store, c, g, config.sampler, config.sampler.seed, run / "checkpoints", s)
               for c, g, s in store.layout.shard_units()]
    est = online_estimate(store)
    return reports, {"chi": est["chi"], "chi_se": est["chi_se"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_local):
    """Each probe set sampled and estimated unsharded and with S=3: the unaligned one through the service and the
    covariance job (Ray), the aligned one in this process."""
    torch.set_num_threads(1)
    out = {}
    for n_probe in (ALIGNED, UNALIGNED):
        problem = problem_with(n_probe)
        for shards in (1, 3):
            run = tmp_path_factory.mktemp(f"p{n_probe}s{shards}")
            config = config_for(shards, n_probe)
            if n_probe == UNALIGNED:
                store = make_store(run / "samples.zarr", problem, config)
                report = sample(problem, store, config, run / "checkpoints")
                units, checked = report.units_run, report.trajectories_checked
                compute(run, nbeta=config.sampler.nbeta)
                ds = read_susceptibilities(run / "susceptibilities.zarr")
                est = {name: ds[name].values for name in RESULTS + ("rhat", "ess_bulk", "llc_mean")}
            else:
                (units, est), checked = in_process(problem, config, run), None
            out[n_probe, shards] = {"run": run, "units": units, "problem": problem, "config": config,
                                    "checked": checked,
                                    "store": SampleStore.open(run / "samples.zarr"), "est": est}
    return out


def test_token_chunks_follow_the_shards():
    for n_contexts in (3, 7, 64, 100, 101, 131, 191, 1000):
        for shards in range(1, min(n_contexts, 9) + 1):
            L = Layout.plan(["full"], 4, 40, n_contexts, SEQ, 4, 10, probe_shards=shards)
            ranges = shard_contexts(n_contexts, shards)
            sizes = [c1 - c0 for c0, c1 in ranges]
            assert ranges[0][0] == 0 and ranges[-1][1] == n_contexts and max(sizes) - min(sizes) <= 1
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            if shards > 1:                 # whole contexts per chunk, and every shard starts on a chunk boundary
                assert L.token_chunk % (SEQ - 1) == 0
                assert all(L.shard_tokens(s)[0] % L.token_chunk == 0 for s in range(shards))
                assert L.token_chunk * 4 * 4 * 10 <= 4 << 20 or L.token_chunk == SEQ - 1
    # the consequence of uneven shards: 100 contexts start at 0, 34, 67: one context per chunk
    assert Layout.plan(["full"], 4, 40, 100, SEQ, 4, 10, probe_shards=3).token_chunk == SEQ - 1
    assert Layout.plan(["full"], 4, 40, 101, SEQ, 4, 10, probe_shards=3).token_chunk == 34 * (SEQ - 1)


@pytest.mark.parametrize("n_probe", [ALIGNED, UNALIGNED])
def test_sharded_run_stores_the_unsharded_numbers(runs, n_probe):
    one, three = runs[n_probe, 1], runs[n_probe, 3]
    L1, L3 = one["store"].layout, three["store"].layout
    assert L1.token_chunk == L1.n_tokens and L3.probe_shards == 3 and L3.token_chunk < L1.n_tokens
    assert len(three["units"]) == 3 * 2 * 3 and len(one["units"]) == 3 * 2
    a, b = arrays(one["run"] / "samples.zarr"), arrays(three["run"] / "samples.zarr")
    assert b["progress"].shape == a["progress"].shape + (3,) and (b["progress"] == 7).all()
    np.testing.assert_array_equal(three["store"].progress(), a["progress"])
    starts = [c0 for c0, _ in shard_contexts(n_probe, 3)]
    aligned = all(c0 % (BODY_ROWS // SEQ) == 0 for c0 in starts)
    assert aligned == (n_probe == ALIGNED)
    # the trajectory is the same: every per-draw scalar is bit-identical
    assert_identical({k: v for k, v in a.items() if k not in ("progress", "probe_loss")},
                     {k: v for k, v in b.items() if k not in ("progress", "probe_loss")})
    scale = np.abs(one["est"]["chi"]).max(axis=0)
    if aligned:
        # the evaluation batches coincide: every probe loss is bit-identical, so chi is to float64 rounding
        assert_identical({"probe_loss": a["probe_loss"]}, {"probe_loss": b["probe_loss"]})
        tol = 1e-10
    else:
        # other batches may round a float32 loss differently (measured bit-identical on x86 CPUs too); chi then
        # moves by about the losses' relative rounding times the chi scale
        np.testing.assert_allclose(b["probe_loss"], a["probe_loss"], rtol=1e-6, atol=0)
        tol = 1e-10 if np.array_equal(a["probe_loss"], b["probe_loss"]) else 1e-4
    for name in one["est"]:
        x, y = one["est"][name], three["est"][name]
        assert x.shape == y.shape and np.isfinite(x).all(), name
        if name in ("rhat", "ess_bulk", "llc_mean"):                     # from sampling_loss alone
            np.testing.assert_array_equal(x, y)
        else:
            assert np.all(np.abs(x - y) <= tol * scale), name


def test_every_shard_of_a_chain_made_the_same_trajectory(runs):
    """Shard 0 alone writes sampling_loss; every shard's checkpoint records the sampling losses of the draws it
    made: they are bit-identical, draw for draw, to the stored ones (and to the unsharded run's)."""
    for n_probe in (ALIGNED, UNALIGNED):
        r = runs[n_probe, 3]
        store = r["store"]
        stored = store.read("sampling_loss")
        assert np.isfinite(stored).all()
        for component, chains, shard in store.layout.shard_units():
            ckpt = torch.load(unit_checkpoint(r["run"] / "checkpoints", store, component, chains, shard),
                              weights_only=True)
            assert ckpt["probe_contexts"] == list(store.layout.shard_contexts(shard))
            history = ckpt["sampling_loss"].numpy()
            ci = store.component_index(component)
            assert history.shape == (len(chains), 7)
            assert history.tobytes() == stored[ci, chains[0]:chains[-1] + 1].tobytes(), (component, chains, shard)
    # the service compares them itself at the end of sampling: every unit but the shard 0 ones
    assert runs[UNALIGNED, 3]["checked"] == 3 * 2 * 2 and runs[UNALIGNED, 1]["checked"] == 0


def test_a_shard_with_another_trajectory_fails_the_run(runs, tmp_path):
    """A shard whose chains moved differently (here: one recorded sampling loss one ulp off, as a
    nondeterministic kernel would leave it) would store probe losses of other chains: one clear error."""
    ref = runs[UNALIGNED, 3]
    run = tmp_path / "run"
    shutil.copytree(ref["run"], run)
    store = SampleStore.open(run / "samples.zarr")
    assert check_trajectories(store, run / "checkpoints") == 12
    ckpt_file = unit_checkpoint(run / "checkpoints", store, COMPONENTS[1], (2, 3), 2)
    ckpt = torch.load(ckpt_file, weights_only=True)
    ckpt["sampling_loss"][1, 4] = float(np.nextafter(ckpt["sampling_loss"][1, 4].item(), np.inf))
    torch.save(ckpt, ckpt_file)
    with pytest.raises(SamplingFailed, match=rf"unit {COMPONENTS[1]} chains \[2, 3\] probe shard 2/3 made another "
                                             r"SGLD trajectory than probe shard 0"):
        check_trajectories(store, run / "checkpoints")


def test_stopped_shard_resumes_and_damaged_shard_is_repaired(runs, tmp_path, ray_local):
    ref = runs[UNALIGNED, 3]
    problem, config = ref["problem"], ref["config"]
    path, ckpts = tmp_path / "samples.zarr", tmp_path / "checkpoints"
    make_store(path, problem, config)
    ckpts.mkdir()
    with pytest.raises(Stopped):       # shard 1 of full's first chain group: killed before its second progress
        run_unit(problem, stopping_store(path, "set_progress", 2), "full", (0, 1), config.sampler, config.sampler.seed, ckpts, 1)
    store = SampleStore.open(path, mode="r+")
    assert store.unit_progress("full", (0, 1), 1).tolist() == [3, 3]
    assert store.unit_progress("full", (0, 1), 0).tolist() == [0, 0] and store.progress()[0, 0] == 0
    report = sample(problem, store, config, ckpts)
    resumed = [u for u in report.units_run if u["resumed_at"] > 0]
    assert [(u["component"], u["shard"], u["resumed_at"]) for u in resumed] == [("full", 1, 6)]
    assert_identical(arrays(ref["run"] / "samples.zarr"), arrays(path))
    # a damaged probe chunk of shard 2 resets that shard unit only; the service samples it again, identically
    L = store.layout
    t0 = L.shard_tokens(2)[0] // L.token_chunk
    chunk = path / store._chunk_key("probe_loss", (2, 1, 1, t0))
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    chunk.write_bytes(bytes(raw))
    bad = store.verify()
    assert [(u["component"], u["chains"], u["shard"]) for u in bad] == [(COMPONENTS[2], [2, 3], 2)]
    report = sample(problem, store, config, ckpts)
    assert [(u["component"], u["chains"], u["shard"]) for u in report.units_repaired] == [(COMPONENTS[2], [2, 3], 2)]
    assert [(u["component"], u["shard"], u["resumed_at"]) for u in report.units_run] == [(COMPONENTS[2], 2, 0)]
    assert store.verify() == []
    assert_identical(arrays(ref["run"] / "samples.zarr"), arrays(path))


@pytest.mark.slow
def test_actor_killed_mid_run_resumes_sharded_store_bit_identical(runs, tmp_path, ray_local):
    ref = runs[UNALIGNED, 3]
    problem, config = ref["problem"], ref["config"]
    one = dataclasses.replace(config, ray=dataclasses.replace(config.ray, num_actors=1))
    store = make_store(tmp_path / "samples.zarr", problem, one)
    killed = []
    import threading
    t = threading.Thread(target=kill_actor_mid_run, args=(tmp_path / "samples.zarr", killed, 2 * 3))
    t.start()
    report = sample(problem, store, one, tmp_path / "checkpoints", poll_s=0.1)
    t.join()
    assert killed and report.actor_failures == 1
    assert_identical(arrays(ref["run"] / "samples.zarr"), arrays(tmp_path / "samples.zarr"))


def test_store_is_not_reopened_with_another_shard_count(runs, tmp_path):
    ref = runs[UNALIGNED, 3]
    path = tmp_path / "samples.zarr"
    shutil.copytree(ref["run"] / "samples.zarr", path)
    for shards in (1, 2):
        with pytest.raises(StoreError, match=f"sampled with sampler.probe_shards=3, but this run asks for {shards}"):
            make_store(path, ref["problem"], config_for(shards, UNALIGNED))
    assert SampleStore.open(path).layout.probe_shards == 3


@pytest.mark.parametrize("over, match", [
    ({"sampler": {"probe_shards": 0}}, "sampler.probe_shards must be between 1 and the number of probe contexts"),
    ({"sampler": {"probe_shards": 65}}, r"sampler.probe_shards must be between 1 and the number of probe contexts "
                                        r"\(64\)")])
def test_bad_shard_settings_are_one_clear_error(over, match):
    with pytest.raises(ConfigError, match=match):
        to_config(over)
    assert to_config({}).sampler.probe_shards == 1
    assert to_config({"sampler": {"probe_shards": 2}, "store": {"probe": "moments"}}).sampler.probe_shards == 2


# ---------------------------------------------------------------- store.probe=moments with probe shards


def moments_config(shards: int):
    c = config_for(shards, UNALIGNED)
    return dataclasses.replace(c, store=dataclasses.replace(c.store, probe="moments"))


@pytest.fixture(scope="module")
def moment_runs(runs, tmp_path_factory, ray_local):
    """The unaligned probe set in moments mode: S=3 through the service and the covariance job (Ray), S=1 in this
    process (its per-token sums are the reference)."""
    problem = runs[UNALIGNED, 1]["problem"]
    out = {}
    for shards in (1, 3):
        run = tmp_path_factory.mktemp(f"moments-s{shards}")
        config = moments_config(shards)
        if shards == 3:
            sample(problem, make_store(run / "samples.zarr", problem, config), config, run / "checkpoints")
            compute(run, nbeta=config.sampler.nbeta)
            ds = read_susceptibilities(run / "susceptibilities.zarr")
            est = {name: ds[name].values for name in RESULTS + ("rhat", "ess_bulk", "llc_mean")}
        else:
            est = in_process(problem, config, run)[1]
        out[shards] = {"run": run, "config": config, "est": est, "store": SampleStore.open(run / "samples.zarr")}
    return out


def losses_exact(runs) -> bool:
    """Whether the sharded draws-mode run's probe losses are bit-identical to the unsharded run's (this CPU: yes)."""
    one, three = runs[UNALIGNED, 1]["store"], runs[UNALIGNED, 3]["store"]
    return np.array_equal(one.read("probe_loss"), three.read("probe_loss"))


def test_moments_with_probe_shards_give_the_unsharded_numbers(runs, moment_runs):
    """Each shard unit keeps its tokens' sums and its own copy of the scalar sums: every copy equals the unsharded
    moments run's, and chi, chi_se, chi_per_chain, chi_half equal the unsharded draws-mode run's."""
    store = moment_runs[3]["store"]
    L, g = store.layout, store.group
    assert L.probe == "moments" and L.probe_shards == 3 and L.token_chunk == 44 * (SEQ - 1)     # shards 44, 44, 43
    assert g["moment_n"].shape == (3, 4, 2, 3) and g["moment_n"].chunks == (1, 2, 1, 1)
    assert g["moment_phi"].metadata.dimension_names == ("component", "chain", "slot", "shard")
    assert g["moment_phiD"].shape == (3, 4, 2, L.n_tokens) and g["moment_phiD"].chunks == (1, 2, 1, L.token_chunk)
    a, b = arrays(moment_runs[1]["run"] / "samples.zarr"), arrays(moment_runs[3]["run"] / "samples.zarr")
    assert (b["progress"] == 7).all() and (b["moment_n"][:, :, L.moment_slot(7)] == 7).all()
    for name in ("moment_n", "moment_phi", "moment_phi2"):          # the same trajectory: every copy bit-identical
        for s in range(3):
            assert_identical({name: a[name]}, {name: np.ascontiguousarray(b[name][..., s])})
    # per-token sums: bit-identical where the per-token losses are (the draws-mode S=3 run says whether they are)
    exact = losses_exact(runs)
    for name in ("moment_phiD", "moment_D"):
        if exact:
            assert_identical({name: a[name]}, {name: b[name]})
        else:
            np.testing.assert_allclose(b[name], a[name], rtol=1e-6)
    ref, got = runs[UNALIGNED, 1]["est"], moment_runs[3]["est"]
    scale, tol = np.abs(ref["chi"]).max(axis=0), 1e-10 if exact else 1e-4
    for name in RESULTS:
        assert got[name].shape == ref[name].shape and np.isfinite(got[name]).all(), name
        assert np.all(np.abs(got[name] - ref[name]) <= tol * scale), name
    for name in ("rhat", "ess_bulk", "llc_mean"):
        np.testing.assert_array_equal(got[name], ref[name])


def test_stopped_moment_shard_resumes_and_damaged_shard_is_repaired(runs, moment_runs, tmp_path, ray_local):
    ref, problem = moment_runs[3], runs[UNALIGNED, 1]["problem"]
    config = ref["config"]
    path, ckpts = tmp_path / "samples.zarr", tmp_path / "checkpoints"
    make_store(path, problem, config)
    ckpts.mkdir()
    with pytest.raises(Stopped):       # shard 1 of full's first group: stopped inside its second block's sums
        run_unit(problem, stopping_store(path, "moment_phiD", 2), "full", (0, 1), config.sampler, config.sampler.seed,
                 ckpts, 1)
    store = SampleStore.open(path, mode="r+")
    for shard in (0, 2):               # its sibling shards finish: the chains' shards now stand at 7, 3, 7 draws
        run_unit(problem, store, "full", (0, 1), config.sampler, config.sampler.seed, ckpts, shard)
    assert store.verify() == [] and store.progress()[0, :2].tolist() == [3, 3]
    sel = select_chains(store, partial=True)
    assert sel.shard_draws[0, :2].tolist() == [[7, 3, 7]] * 2 and not sel.use[1:].any()
    # a partial estimate takes each shard's tokens at that shard's draws: the draws store's estimate at those
    draws_store, est, tol = runs[UNALIGNED, 1]["store"], online_estimate(store), 1e-10 if losses_exact(runs) else 1e-4
    for s in range(3):
        t0, t1 = store.layout.shard_tokens(s)
        at = dataclasses.replace(sel, draws=sel.shard_draws[:, :, s], shard_draws=None)
        chi = block_estimate(draws_store, at, t0, t1, "peer")[0][:, 0]
        assert np.isfinite(chi).all() and np.all(np.abs(est["chi"][t0:t1, 0] - chi) <= tol * np.abs(chi).max())
    compute(tmp_path, nbeta=config.sampler.nbeta, partial=True)
    attrs = read_susceptibilities(tmp_path / "susceptibilities.zarr").attrs
    assert attrs["partial"] and attrs["shard_draws"][0][:2] == [[7, 3, 7]] * 2
    report = sample(problem, store, config, ckpts)
    assert [(u["component"], u["shard"], u["resumed_at"]) for u in report.units_run if u["resumed_at"]] == \
        [("full", 1, 3)]
    assert_identical(arrays(ref["run"] / "samples.zarr"), arrays(path))
    # a damaged copy of the scalar sums of shard 2 resets that shard unit only; it is sampled again, identically
    chunk = path / store._chunk_key("moment_phi", (2, 1, store.layout.moment_slot(7), 2))
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    chunk.write_bytes(bytes(raw))
    assert [(u["component"], u["chains"], u["shard"]) for u in store.verify()] == [(COMPONENTS[2], [2, 3], 2)]
    report = sample(problem, store, config, ckpts)
    assert [(u["component"], u["chains"], u["shard"]) for u in report.units_repaired] == [(COMPONENTS[2], [2, 3], 2)]
    assert [(u["component"], u["shard"], u["resumed_at"]) for u in report.units_run] == [(COMPONENTS[2], 2, 0)]
    assert store.verify() == []
    assert_identical(arrays(ref["run"] / "samples.zarr"), arrays(path))
