"""`stage=plan` (spectro.plan): its counts and store sizes are what a real run then writes, it writes nothing
but plan.json, and bad plan settings fail at once with one clear error."""

import json
import math

import numpy as np
import pytest
import zarr
from omegaconf import OmegaConf

from spectro.config import to_config
from spectro.errors import ConfigError

SMALL = {
    "components": ["l1h2", "unembed"],
    "data": {"seq_len": 16, "n_train_contexts": 32, "n_sampling_contexts": 4, "n_probe_contexts": 4},
    "sampler": {"num_chains": 4, "chain_group": 2, "num_draws": 4, "burnin": 2, "steps_between_draws": 2,
                "checkpoint_every": 2},
    "ray": {"num_actors": 2, "num_cpus_per_actor": 1},
}


def small_config(**over):
    cfg = json.loads(json.dumps(SMALL))
    for key, value in over.items():
        cfg.setdefault(key, {}).update(value) if isinstance(value, dict) else cfg.__setitem__(key, value)
    return to_config(cfg)


def _logical_bytes(a: zarr.Array) -> int:
    if a.dtype.kind in "OUT" or str(a.dtype).startswith("<U") or "str" in str(a.dtype).lower():
        return int(sum(len(str(v).encode("utf-8")) for v in np.asarray(a[...]).reshape(-1)))
    return int(math.prod(a.shape) * a.dtype.itemsize)


def _plan_and_run(config, run_dir, calibrate_draws: int):
    """The plan of `config`, then the run itself: (plan, summary, the written samples.zarr group, logical bytes per
    array). Asserts the plan's per-array bytes and shapes equal what the run wrote."""
    from spectro import pipeline
    from spectro.plan import make_plan

    prepared = pipeline.prepare(config)
    plan = make_plan(config, prepared, calibrate_draws=calibrate_draws)
    summary = pipeline.run(config, run_dir, prepared)
    g = zarr.open_group(str(run_dir / "samples.zarr"), mode="r")
    written = {name: _logical_bytes(g[name]) for name in g.array_keys()}
    assert {name: a["bytes"] for name, a in plan["store"]["arrays"].items()} == written
    for name, a in plan["store"]["arrays"].items():
        assert tuple(a["shape"]) == g[name].shape, name
    return plan, summary, g, written


def test_plan_matches_what_a_run_writes(tmp_path, ray_local):
    plan, summary, g, written = _plan_and_run(small_config(stage="sample"), tmp_path / "run", calibrate_draws=1)
    assert plan["totals"]["units"] == summary["sample"]["units_run"] == 3 * 2       # (full + 2) x 2 chain groups
    assert plan["totals"]["chain_draws"] == int(np.asarray(g["progress"][...]).sum())
    # steps: burn-in + draws x steps between draws, per unit
    assert plan["totals"]["sgld_steps"] == 6 * (2 + 4 * 2)
    # the calibrated units are predicted as measured, every unit gets a positive time
    assert plan["cpu"]["predicted_wall_s"] > 0 and all(u["predicted_s"] > 0 for u in plan["units"])
    assert plan["store"]["mode"] == "draws" and plan["stores"]["draws"]["bytes"] == sum(written.values())


def test_plan_matches_what_a_moments_run_writes(tmp_path, ray_local):
    """store.probe=moments: no probe_loss; per chain, in two slots, two float64 sums per token and three scalars."""
    config = small_config(stage="sample", store={"probe": "moments"})
    plan, _, g, written = _plan_and_run(config, tmp_path / "run", calibrate_draws=0)
    assert plan["store"]["mode"] == "moments" and "probe_loss" not in written
    C, N, T = 3, 4, 4 * 15
    assert written["moment_phiD"] == written["moment_D"] == C * N * 2 * T * 8
    assert plan["stores"]["moments"]["bytes"] == sum(written.values())
    # 32 bytes per chain and token whatever the draws, against 4 per draw: larger here (4 draws), smaller above 8
    assert written["moment_phiD"] + written["moment_D"] == 2 * C * N * 4 * T * 4
    # the checkpoints hold the running sums too: plan them as written
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("*.pt"))
    assert len(ckpts) == plan["totals"]["units"]
    assert plan["stores"]["moments"]["checkpoint_bytes"] > plan["stores"]["draws"]["checkpoint_bytes"]


def test_stage_plan_writes_only_plan_json(tmp_path, capsys):
    from spectro.cli import main

    cfg = OmegaConf.create({**SMALL, "stage": "plan", "plan": {"calibration_draws": 0, "gpu": "h100"}})
    assert main(cfg, tmp_path) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]
    plan = json.loads((tmp_path / "plan.json").read_text())
    out = capsys.readouterr().out
    assert "units (component x chain group x probe shard)" in out and "store probe_loss" in out and "h100" in out
    assert "store, store.probe=draws (this run)" in out and "store, store.probe=moments (logical" in out
    assert plan["gpu"]["predicted_wall_s"] > 0 and "cpu" not in plan
    # FLOPs of `full`'s step: 6 x params x tokens, less the token embedding (a lookup and a scatter-add)
    full = next(u for u in plan["units"] if u["component"] == "full")
    tokens, m = full["chains"] * 16 * 16, plan["model"]
    assert 0.95 < full["flops_per_step"] / (6 * (m["n_parameters"] - m["vocab"] * m["hidden"]) * tokens) < 1.1


@pytest.mark.parametrize("over, key", [({"gpu": "v100"}, "plan.gpu"), ({"calibration_draws": -1},
                                                                          "plan.calibration_draws")])
def test_bad_plan_settings_fail_early(tmp_path, capsys, over, key):
    from spectro.cli import main

    with pytest.raises(ConfigError, match=key):
        to_config({"plan": over})
    cfg = OmegaConf.create({**SMALL, "stage": "plan", "plan": over})
    assert main(cfg, tmp_path / "run") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0]
    assert not (tmp_path / "run").exists()


def test_unknown_calibration_component_is_one_clear_error(tmp_path, capsys):
    from spectro.cli import main

    cfg = OmegaConf.create({**SMALL, "stage": "plan", "plan": {"calibrate_on": "l9h9"}})
    assert main(cfg, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "plan.calibrate_on" in err and "l9h9" in err


def test_plan_matches_what_a_sharded_run_writes(tmp_path, ray_local):
    """sampler.probe_shards=3 over 4 probe contexts (shards of 2, 1, 1): units and bytes as the run writes them."""
    from spectro import pipeline
    from spectro.plan import make_plan
    from spectro.store import SampleStore

    config = small_config(stage="sample", sampler={"probe_shards": 3})
    plan, summary, g, _ = _plan_and_run(config, tmp_path / "run", calibrate_draws=1)
    assert plan["totals"]["units"] == summary["sample"]["units_run"] == 3 * 2 * 3
    assert g["progress"].shape == (3, 4, 3) and g["probe_loss"].chunks[-1] == 15     # one context per chunk
    assert plan["totals"]["chain_draws"] == int(SampleStore.open(tmp_path / "run" / "samples.zarr").progress().sum())
    # every shard repeats its chain group's SGLD steps; the probe evaluations are split, not repeated
    assert plan["totals"]["sgld_steps"] == 18 * (2 + 4 * 2)
    one = make_plan(small_config(), pipeline.prepare(small_config()), calibrate_draws=0)
    assert plan["totals"]["flops_steps"] == 3 * one["totals"]["flops_steps"]
    assert plan["totals"]["flops_probe_evals"] == pytest.approx(one["totals"]["flops_probe_evals"], rel=1e-12)
    assert len(list((tmp_path / "run" / "checkpoints").glob("*__s[0-2].pt"))) == 18
    assert all(u["predicted_s"] > 0 for u in plan["units"])


def test_plan_matches_what_a_sharded_moments_run_writes(tmp_path, ray_local):
    """store.probe=moments with sampler.probe_shards=3: the scalar sums get a shard axis (one copy per shard unit),
    the per-token sums do not; bytes as the run writes them, checkpoints with each shard's tokens' sums."""
    config = small_config(stage="sample", store={"probe": "moments"}, sampler={"probe_shards": 3})
    plan, summary, g, written = _plan_and_run(config, tmp_path / "run", calibrate_draws=0)
    assert plan["totals"]["units"] == summary["sample"]["units_run"] == 3 * 2 * 3
    assert plan["store"]["mode"] == "moments" and "probe_loss" not in written
    C, N, T = 3, 4, 4 * 15
    assert g["moment_n"].shape == (C, N, 2, 3) and written["moment_phi"] == C * N * 2 * 3 * 8
    assert written["moment_phiD"] == C * N * 2 * T * 8
    # each shard unit's checkpoint holds its chains' sums over its own tokens (2, 1 or 1 contexts): planned as saved
    import torch
    saved = [torch.load(p, weights_only=True)["moments"] for p in (tmp_path / "run" / "checkpoints").glob("*.pt")]
    assert len(saved) == 18 and {m["D"].shape[1] for m in saved} == {30, 15}
    moments = plan["stores"]["moments"]["checkpoint_bytes"] - plan["stores"]["draws"]["checkpoint_bytes"]
    assert moments == sum(v.numel() * v.element_size() for m in saved for v in m.values())
