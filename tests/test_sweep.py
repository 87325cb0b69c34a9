"""A Hydra multirun over sampler hyperparameters (4 settings, basic sweeper)
completes, each job in its own directory and its own wandb run in one group,
and the sweep summary tabulates them and names a recommended setting with
reasons."""

import glob
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spectro.sweep import Thresholds, control_failure, recommend
from tests.wandb_reader import records, wait_complete

ROOT = Path(__file__).resolve().parents[1]
TINY = ["experiment=smoke", "components=[l0h1,l3h0]", "sampler.num_draws=4", "sampler.checkpoint_every=2",
        "sampler.burnin=2", "data.n_probe_contexts=4", "wandb.mode=offline"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    sweep_dir = tmp_path_factory.mktemp("sweep") / "multirun"
    cmd = [sys.executable, str(ROOT / "jobs" / "run.py"), "-m", *TINY,
           "sampler.step_size=1e-4,3e-4", "sampler.gamma=1000,3000", f"hydra.sweep.dir={sweep_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return sweep_dir


@pytest.mark.slow
def test_each_job_has_its_own_run_dir_and_wandb_run_in_one_group(sweep):
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "config.json").exists())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    settings = {(json.loads((j / "config.json").read_text())["sampler"]["step_size"],
                 json.loads((j / "config.json").read_text())["sampler"]["gamma"]) for j in jobs}
    assert settings == {(1e-4, 1000.0), (1e-4, 3000.0), (3e-4, 1000.0), (3e-4, 3000.0)}
    groups = set()
    for j in jobs:
        assert (j / "samples.zarr").exists() and (j / "susceptibilities.zarr").exists()
        files = glob.glob(str(j / "wandb" / "offline-run-*" / "run-*.wandb"))
        assert len(files) == 1
        wait_complete(files[0])
        run = next(r.run for r in records(files[0]) if r.WhichOneof("record_type") == "run")
        groups.add(run.run_group)
    assert groups == {f"sweep-{sweep.name}"}


@pytest.mark.slow
def test_sweep_summary_names_a_recommended_setting_with_reasons(sweep):
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "sweep_summary.py"), str(sweep), "--ess-min", "2",
                           "--rhat-max", "2.0", "--llc-spread-max", "1.0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert len([l for l in out.splitlines() if l.startswith("| ")]) == 5   # header + 4 settings
    result = json.loads((sweep / "sweep_summary.json").read_text())
    assert len(result["jobs"]) == 4 and all(r["status"] == "ok" for r in result["jobs"])
    rec = result["recommendation"]
    assert rec["job"] in {"0", "1", "2", "3"} and rec["reasons"]
    assert (f"Recommended: job {rec['job']} (" if rec["passed"] else f"No setting passed; closest: job {rec['job']} (") \
        in out
    for r in result["jobs"]:
        assert math.isfinite(r["llc_full"]) and r["ess_min"] > 0       # real numbers, not NaN
        assert set(r["phi"]) == set(r["displacement"]) == {"full", "l0h1", "l3h0"}   # locality per component
        assert r["phi"]["full"] == r["phi_full"] and max(r["displacement"].values()) == r["displacement_max"]
    assert "| F1 - control |" in next(line for line in out.splitlines() if line.startswith("| job"))
    for r in result["jobs"]:                  # every job has reliability figures and its time to the target
        assert r["reliability"] is not None and r["sampling_seconds"] > 0
        if 0 < r["reliability"] < 1:
            snr = r["reliability"] / (1 - r["reliability"])
            assert r["seconds_to_target"] == pytest.approx(r["sampling_seconds"] * 4.0 / snr)
        else:                                 # no finite time to the target to predict
            assert r["seconds_to_target"] is None
    # jobs of the same posterior (same gamma) are compared with the smaller step size of the two
    for gamma in (1000.0, 3000.0):
        pair = {r["setting"]["step_size"]: r for r in result["jobs"] if r["setting"]["gamma"] == gamma}
        assert pair[1e-4]["signal_agreement"] == 1.0 and pair[3e-4]["signal_reference"] == pair[1e-4]["job"]
    passing = [r for r in result["jobs"] if r["passed"]]
    timed = [r for r in passing if r["seconds_to_target"] is not None]
    if timed:                                 # the passing setting predicted to reach the target soonest
        best = min(timed, key=lambda r: (r["seconds_to_target"], r["setting"]["step_size"]))
        assert rec["passed"] and rec["job"] == best["job"]
    elif passing:                             # none timed: the passing setting with the most effective samples
        best = max(passing, key=lambda r: (r["ess_min"], -r["setting"]["step_size"]))
        assert rec["passed"] and rec["job"] == best["job"]
    else:                                     # none passed: the one that fails the fewest checks
        fewest = min(len(r["failures"]) for r in result["jobs"])
        assert not rec["passed"] and len(next(r for r in result["jobs"] if r["job"] == rec["job"])["failures"]) \
            == fewest


def row(job, step, ess, failures=(), llc=1.0):
    return {"job": job, "status": "ok", "setting": {"step_size": step}, "passed": not failures,
            "failures": list(failures), "ess_min": ess, "llc_full": llc, "llc_full_std": 0.1, "rhat_max": 1.01}


def test_recommendation_ranks_by_time_to_the_target_reliability():
    fast = {**row("0", 1e-3, 40), "seconds_to_target": 300.0, "reliability": 0.7, "sampling_seconds": 200.0}
    slow = {**row("1", 3e-3, 90), "seconds_to_target": 900.0, "reliability": 0.5, "sampling_seconds": 225.0}
    moved = {**row("2", 1e-2, 99, ["signal moved: features agree with job 0 at 0.80"]), "seconds_to_target": 50.0,
             "reliability": 0.9, "sampling_seconds": 200.0}
    rec = recommend([fast, slow, moved])
    assert rec["passed"] and rec["job"] == "0"                    # fastest to the target; not the one that moved
    assert "300 s" in rec["reasons"][1]


def test_recommendation_rules():
    rec = recommend([row("0", 1e-4, 50), row("1", 1e-3, 80), row("2", 1e-2, 200, ["2 diverged chain(s)"])])
    assert rec["passed"] and rec["job"] == "1"                          # best ESS among passing, not the diverging one
    assert any("highest minimum bulk ESS" in r for r in rec["reasons"])
    rec = recommend([row("0", 1e-4, 50, ["a", "b"]), row("1", 1e-3, 80, ["R-hat > 1.1 for 3/5 components"])])
    assert not rec["passed"] and rec["job"] == "1" and "R-hat > 1.1 for 3/5 components" in rec["reasons"]
    rec = recommend([row("0", 1e-3, 80), row("1", 1e-4, 80)])
    assert rec["job"] == "1"                                              # tie: the smaller step


def test_a_job_the_loss_does_not_shape_fails_against_its_control():
    t = Thresholds()                                       # max_control_agreement 0.9
    assert control_failure(0.84, -0.03, "1", t) is None    # a different signal passes, F1 gain or not
    assert control_failure(0.97, 0.25, "1", t) is None     # the same signal, but the known answer found better
    for gain in (0.1, None):                               # the same signal and no better answer: fails
        assert "agree with the nβ = 0 control (job 1) at 0.97" in control_failure(0.97, gain, "1", t)


def test_a_control_is_never_the_recommendation():
    real = {**row("0", 1e-4, 40), "seconds_to_target": 900.0, "reliability": 0.5, "sampling_seconds": 300.0}
    control = {**row("1", 1e-4, 90), "seconds_to_target": 100.0, "reliability": 0.9, "sampling_seconds": 300.0}
    control["setting"] = {"step_size": 1e-4, "control": True}
    rec = recommend([real, control])
    assert rec["passed"] and rec["job"] == "0"              # the faster control is the reference, not a setting
