"""The covariance job (Ray Data over samples.zarr) and its diagnostics:
closed form through the whole pipeline, agreement with devinterp's
estimator on identical arrays, diagnostics against arviz-stats, partial and
bad stores."""


import numpy as np
import pytest
import xarray as xr

from spectro.config import as_dict, to_config
from spectro.errors import StoreError
from spectro.pipeline import fingerprint
from spectro.service import sample
from spectro.store import TRACE_ARRAYS, Layout, ProbeTable, SampleStore
from spectro.susceptibilities import compute, online_estimate
from tests import regression
from tests.helpers import make_store as make_lm_store
from tests.helpers import tiny_config, tiny_problem

NBETA, GAMMA, EPS = 4.0, 2.0, 0.05


def regression_config(**kw):
    s = dict(step_size=EPS, nbeta=NBETA, gamma=GAMMA, batch_size=2, num_chains=12, num_draws=300, burnin=200,
             steps_between_draws=4, chain_group=4, checkpoint_every=100, divergence_bound=1e6, seed=0)
    s.update(kw)
    return to_config({"sampler": s, "data": {"n_train_contexts": 2}, "components": ["w0"],
                      "ray": {"num_actors": 2}})


def regression_store(path, problem, config, components=("full", "w0")):
    s = config.sampler
    T = problem.n_probe_tokens
    layout = Layout.plan(list(components), s.num_chains, s.num_draws, T, 2, s.chain_group, s.checkpoint_every)
    probe = ProbeTable(input_ids=np.zeros((T, 2), dtype=np.int64), context=np.arange(T), position=np.ones(T),
                       token_id=np.zeros(T), text=[f"x{i}" for i in range(T)], source=["probe"] * T)
    return SampleStore.create_or_open(path, layout, fingerprint=fingerprint(config), config=as_dict(config),
                                      model={"source": "regression"}, data={}, init_loss=problem.init_loss, probe=probe)


@pytest.fixture(scope="module")
def regression_run(tmp_path_factory, ray_local):
    problem, info = regression.setup()
    config = regression_config()
    run = tmp_path_factory.mktemp("reg")
    store = regression_store(run / "samples.zarr", problem, config)
    sample(problem, store, config, run / "checkpoints")
    return run, problem, info, config


@pytest.mark.parametrize("form", ["covariance", "peer"])
def test_pipeline_recovers_closed_form_covariances(regression_run, form):
    run, problem, info, config = regression_run
    out = compute(run, form=form, nbeta=NBETA)
    assert out["excluded_chains"] == 0 and not out["partial"]
    ds = xr.open_zarr(run / "susceptibilities.zarr", consolidated=False)
    assert ds["chi"].dims == ("token", "component") and list(ds["component"].values) == ["full", "w0"]
    for comp in ["full", "w0"]:
        exact = np.array(regression.exact_chi(info, comp, NBETA, GAMMA, EPS, form))
        chi = ds["chi"].sel(component=comp).values
        se = ds["chi_se"].sel(component=comp).values
        z = (chi - exact) / se
        assert np.all(np.abs(z) < 6), f"{form} {comp}: chi {chi} exact {exact} z {z}"
        # the test has power: the exact values are far from 0 in units of the SE
        assert np.max(np.abs(exact) / se) > 5
    # w0 alone responds differently from the full posterior: columns differ by many SEs
    diff = ds["chi"].sel(component="full").values - ds["chi"].sel(component="w0").values
    assert np.max(np.abs(diff) / ds["chi_se"].sel(component="w0").values) > 5
    # each token's loss under the full posterior: the mean of full's probe losses over every draw
    store = SampleStore.open(run / "samples.zarr")
    probe = store.read("probe_loss")[0].astype(np.float64)                   # (chains, draws, tokens)
    np.testing.assert_allclose(ds["token_loss"].values, probe.mean(axis=(0, 1)), rtol=1e-10, atol=1e-12)


def test_diagnostics_match_arviz_and_llc_definition(regression_run):
    from arviz_stats.base import array_stats

    run, problem, info, config = regression_run
    compute(run, nbeta=NBETA)
    ds = xr.open_zarr(run / "susceptibilities.zarr", consolidated=False)
    store = SampleStore.open(run / "samples.zarr")
    s = store.read("sampling_loss")
    assert config.sampler.antithetic            # the default: diagnostics are over pair means
    for ci, comp in enumerate(["full", "w0"]):
        phi = s[ci] - store.init_loss                                       # (chains, draws)
        phi = phi.reshape(phi.shape[0] // 2, 2, -1).mean(1)                 # (pairs, draws)
        assert ds["rhat"].values[ci] == pytest.approx(array_stats.rhat(phi, chain_axis=0, draw_axis=1, method="rank"))
        assert ds["ess_bulk"].values[ci] == pytest.approx(array_stats.ess(phi, chain_axis=0, draw_axis=1, method="bulk"))
        llc = NBETA * phi.mean(1)
        assert ds["llc_mean"].values[ci] == pytest.approx(llc.mean())
        assert ds["llc_std"].values[ci] == pytest.approx(llc.std(ddof=1))
        # well-mixed Gaussian chains: R-hat near 1, hundreds of effective draws
        assert ds["rhat"].values[ci] < 1.05 and ds["ess_bulk"].values[ci] > 300
    assert not ds["not_mixed"].values.any()
    # the LLC estimate: nβ E[L(w) - L(w*)] has a closed form too (w0 is one-dimensional)
    mu, sig = regression.posterior(info, "w0", NBETA, GAMMA, EPS)
    qs = regression.quad(info["sampling"])
    exact_phi = float(regression.mean_q(qs, mu, sig)) - store.init_loss
    assert ds["mean_phi"].values[1] == pytest.approx(exact_phi, rel=0.1)


def test_not_mixed_needs_r_hat_beyond_its_null(regression_run, tmp_path):
    """A copy of the regression run with w0's first two antithetic pairs shifted (a mode the other pairs never
    visit): w0 is above the threshold with rhat_p at its floor, so not mixed. At a threshold below every R-hat,
    the well-mixed full is above it too, but within what its own null gives: not flagged."""
    from spectro.reliability import RHAT_NULL_REPS
    from spectro.susceptibilities import diagnostics, select_chains

    run, problem, info, config = regression_run
    src = SampleStore.open(run / "samples.zarr")
    store = regression_store(tmp_path / "samples.zarr", problem, config)
    L = store.layout
    for comp, chains in L.units():
        ci = L.components.index(comp)
        for d0 in range(0, L.n_draws, L.draw_chunk):
            sl = (ci, slice(chains[0], chains[-1] + 1), slice(d0, d0 + L.draw_chunk))
            loss = src.read("sampling_loss", sl)
            if comp == "w0":
                loss = loss + 2.0 * (np.asarray(chains) < 4)[:, None] * src.read("sampling_loss")[ci].std()
            store.write_block(comp, chains, d0, sampling_loss=loss, probe_loss=src.read("probe_loss", sl + (slice(None),)),
                              traces={n: src.read(n, sl) for n in TRACE_ARRAYS}, diverged_at=np.full(len(chains), -1))
            store.set_progress(comp, chains, d0 + L.draw_chunk)
    sel = select_chains(store)
    diag = diagnostics(store, sel, NBETA, rhat_threshold=1.1)
    assert diag["rhat"][1] > 1.2 and diag["rhat_p"][1] == pytest.approx(1 / (RHAT_NULL_REPS + 1))
    assert list(diag["not_mixed"]) == [False, True]
    assert np.isnan(diag["rhat_p"][0])                        # below the threshold: no null drawn
    low = diagnostics(store, sel, NBETA, rhat_threshold=0.5)
    assert low["rhat_p"][0] > 0.05 / 2 and list(low["not_mixed"]) == [False, True]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, ray_local):
    problem, config = tiny_problem(), tiny_config()
    run = tmp_path_factory.mktemp("lm")
    store = make_lm_store(run / "samples.zarr", problem, config)
    sample(problem, store, config, run / "checkpoints")
    return run, problem, config


def devinterp_tree(store, ci, n_ctx, seq):
    """One weight restriction's arrays in devinterp 2.0.1's `sample()` output layout."""
    s = store.read("sampling_loss")[ci]                                   # (chains, draws)
    l = store.read("probe_loss")[ci]                                      # (chains, draws, tokens)
    C, D = s.shape
    ds = xr.Dataset({
        # devinterp averages the sampling task over (batch, token_pos): a constant row has our mean
        "loss_pretrain": (("chain", "draw", "batch_pretrain", "token_pos"),
                          np.broadcast_to(s[:, :, None, None], (C, D, 1, seq - 1)).copy()),
        "loss_probe": (("chain", "draw", "batch_probe", "token_pos"), l.reshape(C, D, n_ctx, seq - 1).astype(np.float64)),
        "init_loss": (("chain",), np.full(C, store.init_loss)),
        "input_ids_probe": (("batch_probe", "position"), store.read("probe_input_ids")),
    })
    return xr.DataTree(ds)


def test_agrees_with_devinterp_compute_susceptibilities(lm_run):
    from devinterp.slt.susceptibilities import compute_susceptibilities

    run, problem, config = lm_run
    compute(run, form="peer", nbeta=config.sampler.nbeta)
    store = SampleStore.open(run / "samples.zarr")
    n_ctx, seq = problem.probe_ids.shape
    comps = list(store.layout.components)
    wr_map = {c: devinterp_tree(store, ci, n_ctx, seq) for ci, c in enumerate(comps)}
    ref = compute_susceptibilities(wr_map, sampling_task="pretrain")
    sus = ref["susceptibilities"]["sus"]
    ours = xr.open_zarr(run / "susceptibilities.zarr", consolidated=False)
    for c in comps[1:]:
        theirs = sus.sel(wr=c).values                                      # (ctx * (seq-1),) context-major
        mine = ours["chi"].sel(component=c).values
        np.testing.assert_allclose(mine, theirs, rtol=1e-6, atol=1e-9)
        assert np.abs(theirs).max() > 1e-5                                # a real signal, not zeros


def test_partial_store_refused_then_explicit(lm_run, tmp_path, ray_local):
    run, problem, config = lm_run
    store = make_lm_store(tmp_path / "samples.zarr", problem, config)
    src = SampleStore.open(run / "samples.zarr")
    # copy only the first draw chunk of every unit: a run "still in progress"
    L = store.layout
    for comp, chains in L.units():
        ci = L.components.index(comp)
        sl = (ci, slice(chains[0], chains[-1] + 1), slice(0, L.draw_chunk))
        store.write_block(comp, chains, 0, sampling_loss=src.read("sampling_loss", sl),
                          probe_loss=src.read("probe_loss", sl + (slice(None),)),
                          traces={n: src.read(n, sl) for n in TRACE_ARRAYS},
                          diverged_at=np.full(len(chains), -1))
        store.set_progress(comp, chains, L.draw_chunk)
    with pytest.raises(StoreError, match=r"still in progress \(36/72 chain-draws committed\).*partial=true"):
        compute(tmp_path, nbeta=config.sampler.nbeta)
    out = compute(tmp_path, nbeta=config.sampler.nbeta, partial=True)
    assert out["partial"]
    ds = xr.open_zarr(tmp_path / "susceptibilities.zarr", consolidated=False)
    assert ds.attrs["partial"] is True and np.isfinite(ds["chi"].values).all()
    online = online_estimate(store)
    np.testing.assert_allclose(online["chi"], ds["chi"].values, rtol=1e-12)


def test_diverged_chains_excluded_and_listed(tmp_path, ray_local):
    problem = tiny_problem()
    config = tiny_config(step_size=0.3, gamma=0.0, nbeta=200.0, divergence_bound=1.0)
    store = make_lm_store(tmp_path / "samples.zarr", problem, config)
    sample(problem, store, config, tmp_path / "checkpoints")
    div = store.diverged_at()
    assert (div >= 0).any(), "this configuration was meant to diverge some chains"
    out = compute(tmp_path, nbeta=200.0)
    ds = xr.open_zarr(tmp_path / "susceptibilities.zarr", consolidated=False)
    assert out["excluded_chains"] == int((div >= 0).sum()) == len(ds.attrs["excluded_chains"])
    used = ds["n_chains_used"].values
    np.testing.assert_array_equal(used, (div < 0).sum(1))
    for ci in range(len(used)):
        col = ds["chi"].values[:, ci]
        if used[ci] > 0 and used[0] > 0:
            assert np.isfinite(col).all()          # no NaN leaks from excluded chains
        else:
            assert np.isnan(col).all()             # explicitly empty, and flagged by n_chains_used == 0


def test_foreign_and_missing_stores(tmp_path):
    with pytest.raises(StoreError, match="no sample store"):
        compute(tmp_path, nbeta=1.0)
