"""Sampling until reliable (spectro.rounds): the judge, the Spearman-Brown prediction, the round sizes and the
config's rules (quick); end to end from the command line (slow): a target met at a later round stops there, a
target out of reach stops at the draw budget, and a run stopped after round 1 resumes into the same rounds,
bit-identical to an uninterrupted run."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from spectro import rounds
from spectro.config import UntilConfig, to_config
from spectro.errors import ConfigError
from spectro.reliability import spearman_brown
from tests.helpers import compose_cfg

ROOT = Path(__file__).resolve().parents[1]


def _record(rel_min=None, rhat_max=None, draws=10, rel_median=None):
    return {"round": 1, "draws": draws, "seconds": 1.0, "components": {}, "reliability_min": rel_min,
            "reliability_median": rel_min if rel_median is None else rel_median, "rhat_max": rhat_max}


def test_judge_needs_every_target_set():
    both = UntilConfig(reliability=0.8, rhat=1.1, round_draws=10)
    assert rounds.judge(_record(0.85, 1.05), both)
    assert not rounds.judge(_record(0.75, 1.05), both)
    assert not rounds.judge(_record(0.85, 1.2), both)
    assert not rounds.judge(_record(None, 1.05), both)             # unknown reliability meets no target
    assert rounds.judge(_record(0.5, 1.05), UntilConfig(rhat=1.1, round_draws=10))
    assert not rounds.judge(_record(0.9, None), UntilConfig(rhat=1.1, round_draws=10))
    assert rounds.judge(_record(0.8, None), UntilConfig(reliability=0.8, round_draws=10))


def test_the_reliability_target_is_on_the_median_unless_every_component_is_asked():
    """Default: the median over components (the verdict's figure); until.over=min: every component. The predicted
    draws follow the judged figure."""
    spread = _record(0.4, 1.05, rel_median=0.85)                    # one noisy component, the rest reliable
    median, every = UntilConfig(reliability=0.8, round_draws=10), UntilConfig(reliability=0.8, over="min",
                                                                               round_draws=10)
    assert median.over == "median" and rounds.judge(spread, median) and not rounds.judge(spread, every)
    assert rounds._judged(spread, median)["predicted_draws"] == 10
    assert rounds._judged(spread, every)["predicted_draws"] == rounds.predicted_draws(0.4, 10, 0.8) == 60
    with pytest.raises(ConfigError, match="sampler.until.over must be 'median' or 'min'"):
        to_config(compose_cfg(["sampler.until.reliability=0.8", "sampler.until.round_draws=10",
                               "sampler.until.over=mean"]))


def test_predicted_draws_inverts_spearman_brown():
    d = rounds.predicted_draws(0.5, 100, 0.8)
    assert d == 400                                                 # (0.8/0.2) / (0.5/0.5) = 4
    assert spearman_brown(0.5, d / 100) == pytest.approx(0.8)
    assert rounds.predicted_draws(0.9, 100, 0.8) == 100             # already there
    assert rounds.predicted_draws(0.0, 100, 0.8) is None
    assert rounds.predicted_draws(None, 100, 0.8) is None
    assert rounds.predicted_draws(float("nan"), 100, 0.8) is None


def test_round_draws_fit_the_budget():
    assert rounds.round_draws(UntilConfig(reliability=0.8, round_draws=10), 35) == [10, 20, 30]
    assert rounds.round_draws(UntilConfig(reliability=0.8, round_draws=10), 30) == [10, 20, 30]
    assert rounds.round_draws(UntilConfig(), 30) == []
    assert not rounds.enabled(UntilConfig(round_draws=10)) and rounds.enabled(UntilConfig(rhat=1.1))


def test_figures_from_the_estimate_summary():
    out = {"reliability": {"components": ["a", "b"], "features_reliability": [0.7, float("nan")],
                           "features_min": 0.7, "features_median": 0.7},
           "rhat": {"full": 1.01, "a": 1.02, "b": None}, "rhat_max": 1.02}
    f = rounds.figures(out)
    assert f["components"] == {"full": {"reliability": None, "rhat": 1.01}, "a": {"reliability": 0.7, "rhat": 1.02},
                               "b": {"reliability": None, "rhat": None}}
    assert (f["reliability_min"], f["rhat_max"]) == (0.7, 1.02)
    assert rounds.figures({"reliability": None, "rhat": {}, "rhat_max": None})["reliability_min"] is None


def test_stop_reasons():
    until = UntilConfig(reliability=0.8, round_draws=10, max_minutes=1.0)
    met, not_met = {**_record(0.9), "met": True}, {**_record(0.5), "met": False}
    assert rounds._stop([], until, [10, 20], 0.0) is None
    assert rounds._stop([met], until, [10, 20], 0.0) == rounds.TARGET_MET
    assert rounds._stop([not_met, not_met], until, [10, 20], 0.0) == rounds.DRAW_BUDGET
    assert rounds._stop([not_met], until, [10, 20], 59.5) == rounds.TIME_BUDGET   # the next round would end late
    assert rounds._stop([not_met], until, [10, 20], 30.0) is None


def _fake_stage(reliability_at: dict):
    """sample_to / estimate stand-ins for run_rounds: record the calls, give reliability_at[draws]."""
    calls = []

    def sample_to(draws):
        calls.append(("sample", draws))
        return {}

    def estimate(draws):
        calls.append(("estimate", draws))
        r = reliability_at[draws]
        return {"reliability": {"components": ["a", "b"], "features_reliability": [r, r + 0.05],
                                "features_min": r, "features_median": r + 0.025},
                "rhat": {"full": 1.01, "a": 1.02, "b": 1.03}, "rhat_max": 1.03}
    return calls, sample_to, estimate


def test_the_rounds_loop_stops_at_the_first_round_that_meets_the_target(tmp_path):
    config = to_config(compose_cfg(["sampler.until.reliability=0.7", "sampler.until.round_draws=10"]))
    calls, sample_to, estimate = _fake_stage({10: 0.5, 20: 0.72, 30: 0.9, 40: 0.95})
    seen = []
    doc = rounds.run_rounds(config, tmp_path, sample_to, estimate, on_round=seen.append)
    assert calls == [("sample", 10), ("estimate", 10), ("sample", 20), ("estimate", 20)]
    assert doc["stopped_because"] == "target met" and doc["draws"] == 20 and [r["met"] for r in seen] == [False, True]
    assert doc["rounds"][0]["predicted_draws"] == rounds.predicted_draws(0.525, 10, 0.7) == 22   # the median
    assert doc["rounds"][1]["components"]["b"] == {"reliability": 0.77, "rhat": 1.03}
    assert json.loads((tmp_path / "rounds.json").read_text()) == doc


def test_the_rounds_loop_stops_at_the_budgets(tmp_path):
    config = to_config(compose_cfg(["sampler.until.reliability=0.99", "sampler.until.rhat=1.1",
                                    "sampler.until.round_draws=20", "sampler.num_draws=50"]))
    calls, sample_to, estimate = _fake_stage({20: 0.5, 40: 0.6})
    doc = rounds.run_rounds(config, tmp_path / "draws", sample_to, estimate)
    assert doc["stopped_because"] == "draw budget" and [r["draws"] for r in doc["rounds"]] == [20, 40]
    timed = to_config(compose_cfg(["sampler.until.reliability=0.99", "sampler.until.round_draws=20",
                                   "sampler.num_draws=50", "sampler.until.max_minutes=1e-6"]))
    doc = rounds.run_rounds(timed, tmp_path / "time", *_fake_stage({20: 0.5})[1:])
    assert doc["stopped_because"] == "time budget" and len(doc["rounds"]) == 1


def test_default_config_has_no_rounds():
    c = to_config(compose_cfg())
    assert c.sampler.until == UntilConfig() and not rounds.enabled(c.sampler.until)


@pytest.mark.parametrize("overrides, message", [
    (["sampler.until.reliability=0.8"], r"sampler.until.round_draws must be a positive multiple of "
                                        r"sampler.checkpoint_every \(10\) up to sampler.num_draws \(40, the draw "
                                        r"budget\) with a target set \(got 0\)"),
    (["sampler.until.reliability=0.8", "sampler.until.round_draws=15"], r"multiple of sampler.checkpoint_every"),
    (["sampler.until.rhat=1.1", "sampler.until.round_draws=50"], r"up to sampler.num_draws \(40"),
    (["sampler.until.reliability=1.5", "sampler.until.round_draws=10"], r"sampler.until.reliability must be in"),
    (["sampler.until.rhat=0.9", "sampler.until.round_draws=10"], r"sampler.until.rhat must be > 1"),
    (["sampler.until.max_minutes=0"], r"sampler.until.max_minutes must be > 0"),
    (["sampler.until.round_draws=-10"], r"sampler.until.round_draws must be a positive multiple"),
    (["plan.pilot=true"], r"plan.pilot needs a sampler.until target"),
])
def test_bad_until_values_raise_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        to_config(compose_cfg(overrides))


def test_the_short_summary_says_why_the_rounds_stopped():
    from spectro.console import summary_lines
    lines = summary_lines({"rounds": {"n_rounds": 3, "draws": 9, "stopped_because": "draw budget"}})
    assert "rounds: 3 (9 draws), stopped: draw budget" in lines
    assert not any(line.startswith("rounds:") for line in summary_lines({"rounds": None}))


def test_until_is_resume_neutral():
    from spectro.pipeline import fingerprint
    a = to_config(compose_cfg())
    b = to_config(compose_cfg(["sampler.until.reliability=0.8", "sampler.until.round_draws=10",
                               "sampler.until.max_minutes=5"]))
    assert fingerprint(a) == fingerprint(b)


# --------------------------------------------------------------------------- #
# the service and the estimate in rounds: a tiny model, real Ray, real Zarr
# --------------------------------------------------------------------------- #


def _chi(run_dir, **kw):
    from spectro.store import read_susceptibilities
    from spectro.susceptibilities import compute

    compute(run_dir, nbeta=8.0, **kw)
    ds = read_susceptibilities(Path(run_dir) / "susceptibilities.zarr")
    return {k: np.asarray(ds[k].values) for k in ("chi", "chi_se", "chi_half", "rhat")}, dict(ds.attrs)


def test_rounds_of_the_service_are_the_draws_of_one_run(tmp_path, ray_local):
    from spectro.errors import SamplingFailed, StoreError
    from spectro.service import sample
    from spectro.store import SampleStore
    from tests.helpers import arrays, assert_identical, make_store, tiny_config, tiny_problem

    problem = tiny_problem()
    once, short = tmp_path / "once", tmp_path / "short"        # 6 draws in one go; a run of 3 draws
    sample(problem, make_store(once / "samples.zarr", problem, tiny_config()), tiny_config(), once / "checkpoints")
    sample(problem, make_store(short / "samples.zarr", problem, tiny_config(num_draws=3)), tiny_config(num_draws=3),
           short / "checkpoints")
    rounds_dir = tmp_path / "rounds"
    store = make_store(rounds_dir / "samples.zarr", problem, tiny_config())
    with pytest.raises(SamplingFailed, match="multiple of the draw chunk"):
        sample(problem, store, tiny_config(), rounds_dir / "checkpoints", stop_at=4)
    first = sample(problem, store, tiny_config(), rounds_dir / "checkpoints", stop_at=3)      # round 1
    assert (store.progress() == 3).all() and all(u["resumed_at"] == 0 for u in first.units_run)
    with pytest.raises(StoreError, match="only 3 committed"):
        _chi(rounds_dir, draws=6)
    chi_round, attrs = _chi(rounds_dir, draws=3)                  # round 1's estimate: the 3-draw run's, exactly
    chi_short, _ = _chi(short)
    assert attrs["draws"] == 3 and not attrs["partial"]
    assert all(chi_round[k].tobytes() == chi_short[k].tobytes() for k in chi_round)
    second = sample(problem, store, tiny_config(), rounds_dir / "checkpoints", stop_at=6)     # round 2
    assert all(u["resumed_at"] == 3 for u in second.units_run)
    assert_identical(arrays(once / "samples.zarr"), arrays(rounds_dir / "samples.zarr"))
    assert SampleStore.open(rounds_dir / "samples.zarr").complete()


# --------------------------------------------------------------------------- #
# end to end (slow): smoke-sized runs from the command line
# --------------------------------------------------------------------------- #

SMALL = ["experiment=smoke", "components=[l0h1,l3h0]", "data.n_probe_contexts=4", "sae.enabled=false",
         "sampler.num_draws=9", "sampler.until.round_draws=3"]
OUT_OF_REACH = ["sampler.until.reliability=0.9999"]


def run_job(run_dir, *extra, timeout=900):
    cmd = [sys.executable, str(ROOT / "jobs" / "run.py"), f"hydra.run.dir={run_dir}", *SMALL, *extra]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((Path(run_dir) / "rounds.json").read_text()), proc.stdout + proc.stderr


def chi(run_dir):
    ds = xr.open_zarr(Path(run_dir) / "susceptibilities.zarr", consolidated=False)
    return np.asarray(ds["chi"].values), ds.attrs


@pytest.fixture(scope="module")
def out_of_reach(tmp_path_factory):
    """Every round of the budget, the target never met: the uninterrupted run the others compare with."""
    run_dir = tmp_path_factory.mktemp("rounds") / "all"
    doc, out = run_job(run_dir, *OUT_OF_REACH)
    return run_dir, doc, out


@pytest.mark.slow
def test_a_target_out_of_reach_stops_at_the_draw_budget(out_of_reach):
    run_dir, doc, out = out_of_reach
    assert doc["stopped_because"] == "draw budget" and [r["draws"] for r in doc["rounds"]] == [3, 6, 9]
    assert not any(r["met"] for r in doc["rounds"])
    assert all(set(r["components"]) == {"full", "l0h1", "l3h0"} for r in doc["rounds"])
    assert "round 3: 9 draws" in out and "rounds: 3 (9 draws), stopped: draw budget" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"]["stopped_because"] == "draw budget" and summary["rounds"]["n_rounds"] == 3
    assert summary["susceptibilities"]["reliability"]["features_min"] == pytest.approx(
        doc["rounds"][-1]["reliability_min"], abs=1e-5)
    html = (run_dir / "report.html").read_text()
    assert "Sampling rounds" in html and "draw budget" in html


@pytest.mark.slow
def test_a_target_met_at_a_later_round_stops_there(out_of_reach, tmp_path):
    _, doc, _ = out_of_reach
    rel = [r["reliability_median"] for r in doc["rounds"]]               # the figure the default target is on
    # the first round whose reliability passes every earlier one: a target between them is met there first
    later = [k for k in range(1, len(rel)) if rel[k] is not None and all(x is not None for x in rel[:k])
             and rel[k] > max(rel[:k])]
    if not later:
        pytest.skip(f"the measured reliability did not rise over the rounds ({rel}): no target is met later")
    k = later[0]
    target = round((max(rel[:k]) + rel[k]) / 2, 6)
    met, _ = run_job(tmp_path / "met", f"sampler.until.reliability={target}")
    assert met["stopped_because"] == "target met" and len(met["rounds"]) == k + 1, (rel, target)
    assert met["rounds"][-1]["met"] and not any(r["met"] for r in met["rounds"][:-1])
    _, attrs = chi(tmp_path / "met")
    assert attrs["draws"] == 3 * (k + 1) and not attrs["partial"]


@pytest.mark.slow
def test_a_run_stopped_after_round_one_resumes_bit_identical(out_of_reach, tmp_path):
    full_dir, full, _ = out_of_reach
    run_dir = tmp_path / "resumed"
    first, _ = run_job(run_dir, *OUT_OF_REACH, "sampler.until.max_minutes=1e-6")    # round 1, then out of time
    assert first["stopped_because"] == "time budget" and len(first["rounds"]) == 1
    assert chi(run_dir)[1]["draws"] == 3
    again, out = run_job(run_dir, *OUT_OF_REACH)
    assert "round 1 (from rounds.json)" in out
    assert again["stopped_because"] == "draw budget" and len(again["rounds"]) == 3
    strip = ("seconds", "taken_over")
    assert [{k: v for k, v in r.items() if k not in strip} for r in again["rounds"]] == \
        [{k: v for k, v in r.items() if k not in strip} for r in full["rounds"]]
    a, b = chi(full_dir)[0], chi(run_dir)[0]
    assert a.tobytes() == b.tobytes()
    shutil.rmtree(run_dir / "wandb", ignore_errors=True)


@pytest.mark.slow
def test_the_plans_pilot_is_the_runs_round_one(out_of_reach, tmp_path):
    """stage=plan with plan.pilot=true samples and estimates round 1 in a scratch directory: its figures are the
    real run's round 1 (same seed, same draws), its prediction the rounds' own rule, and it writes only plan.json."""
    _, doc, _ = out_of_reach
    plan_dir = tmp_path / "plan"
    cmd = [sys.executable, str(ROOT / "jobs" / "run.py"), f"hydra.run.dir={plan_dir}", *SMALL, *OUT_OF_REACH,
           "stage=plan", "plan.pilot=true", "plan.calibration_draws=0"]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in plan_dir.iterdir() if not p.name.startswith(".")) == ["plan.json", "spectro.log"]
    pilot = json.loads((plan_dir / "plan.json").read_text())["rounds"]["pilot"]
    first = doc["rounds"][0]
    assert pilot["draws"] == first["draws"] == 3
    assert pilot["reliability_min"] == pytest.approx(first["reliability_min"], abs=1e-5)
    assert pilot["rhat_max"] == pytest.approx(first["rhat_max"], abs=1e-5) if first["rhat_max"] is not None \
        else pilot["rhat_max"] is None
    assert not pilot["met"]
    assert pilot["reliability_median"] == pytest.approx(first["reliability_median"], abs=1e-5)
    assert pilot["predicted_draws"] == rounds.predicted_draws(first["reliability_median"], 3, 0.9999)
    assert "pilot: round 1 sampled and estimated" in proc.stdout
