"""The main job from the command line on the embedded default: the three
entry points (`spectro`, `python -m spectro`, `python jobs/run.py`) are one
Hydra app; bad input fails before any work with one clear message and no run
directory left; a small run writes samples and susceptibilities; a driver
killed mid-run resumes to bit-identical results."""

import json
import os
import runpy
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import psutil
import pytest
import xarray as xr
from spectro import cli
from spectro.config import SamplerConfig
from spectro.store import SampleStore
from tests.helpers import compose_cfg

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["components=[l0h1,l2.mlp]", "sampler.num_chains=4", "sampler.chain_group=4", "sampler.num_draws=8",
         "sampler.checkpoint_every=2", "data.n_probe_contexts=8", "data.n_train_contexts=64",
         "data.n_sampling_contexts=8", "data.probe.suite_contexts=2", "ray.num_actors=2"]
N_TOKENS = (8 + 4 * 2) * 63          # 8 natural probe contexts and 2 of each of data=embedded's 4 labelled suites


@pytest.mark.parametrize("overrides, message", [
    (["model.source=/nonexistent/model/dir"], r"does not exist"),
    (["components=[l0h1,l9h9]"], r"l9h9"),
    (["sampler.step_size=0"], r"sampler.step_size must be a positive finite number"),
    (["sampler.nbeta=-1"], r"sampler.nbeta must be positive"),
    (["data.seq_len=4096"], r"4096.*exceeds.*256"),
    (["data=files", "data.corpus.paths=[EMPTY]"], r"corpus has only 0"),
])
def test_bad_input_fails_before_any_work(tmp_path, capsys, overrides, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    overrides = [o.replace("EMPTY", str(empty)) for o in overrides]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".hydra").mkdir()                 # what Hydra writes before calling us
    code = cli.main(compose_cfg(overrides), run_dir)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("spectro: error: ") and len(err.strip().splitlines()) == 1, err
    import re
    assert re.search(message, err), err
    assert not run_dir.exists(), "a failed start must not leave a run directory behind"


# --------------------------------------------------------------------------- #
# entry points
# --------------------------------------------------------------------------- #

ENTRY_POINTS = {"module": [sys.executable, "-m", "spectro"], "jobs/run.py": [sys.executable, str(ROOT / "jobs" / "run.py")]}


def run_entry(entry, *args, timeout=120):
    return subprocess.run([*ENTRY_POINTS[entry], *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})


def config_groups(help_text):
    """{group: options} from the "== Configuration groups ==" section of Hydra's --help."""
    section = help_text.split("== Configuration groups ==", 1)[1].split("== Config ==", 1)[0]
    groups = {}
    for line in section.splitlines():
        name, sep, options = line.partition(": ")
        if sep and " " not in name:
            groups[name] = options.split(", ")
    return groups


def test_the_entry_points_are_one_hydra_app():
    """`spectro` (the console script) is spectro.cli:app; `python -m spectro` and `python jobs/run.py` run the
    same app: the same --help, listing every config group in conf/ with its options."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"spectro": "spectro.cli:app"}
    import spectro.__main__

    jobs_run = runpy.run_path(str(ROOT / "jobs" / "run.py"))           # not as __main__: defines, runs nothing
    assert spectro.__main__.app is cli.app and jobs_run["app"] is cli.app
    helps = {entry: run_entry(entry, "--help") for entry in ENTRY_POINTS}
    for entry, proc in helps.items():
        assert proc.returncode == 0, (entry, proc.stderr)
        assert proc.stdout.startswith("spectro is powered by Hydra."), (entry, proc.stdout[:200])
    assert helps["module"].stdout == helps["jobs/run.py"].stdout
    expected = {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in (ROOT / "conf").iterdir() if d.is_dir()}
    assert config_groups(helps["module"].stdout) == expected
    assert {"experiment", "model", "data", "sampler", "clustering", "sae"} <= set(expected)


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_bad_input_from_the_command_line_is_one_line_and_exit_code_2(entry, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_entry(entry, "experiment=smoke", "sampler.step_size=0", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == [
        "spectro: error: sampler.step_size must be a positive finite number (got 0.0); e.g. sampler.step_size=1e-4"]
    assert proc.stdout == ""
    assert not run_dir.exists(), "a failed start must not leave a run directory behind"


def test_every_schema_key_is_accepted_on_the_command_line(tmp_path):
    """Keys that have a default only in the schema are settable as a user types them (Hydra checks the command
    line against the composed config; the schema's defaults are part of it)."""
    run_dir = tmp_path / "plan"
    proc = run_entry("jobs/run.py", "experiment=smoke", "sampler.probe_shards=4", "sampler.control=true",
                     "stage=plan", "plan.calibration_draws=0", f"hydra.run.dir={run_dir}", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    plan = json.loads((run_dir / "plan.json").read_text())
    assert len(plan["units"]) == 5 * 4                                 # 5 components x 4 probe shards
    assert sorted({u["shard"] for u in plan["units"]}) == [0, 1, 2, 3]


# --------------------------------------------------------------------------- #
# a small run from the command line
# --------------------------------------------------------------------------- #


def run_job(run_dir, extra=(), **popen):
    cmd = [sys.executable, str(ROOT / "jobs" / "run.py"), f"hydra.run.dir={run_dir}", *SMALL, *extra]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    proc = run_job(run_dir)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return run_dir


@pytest.mark.slow
def test_main_job_writes_samples_and_susceptibilities(finished_run):
    run_dir = finished_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["sample"]["complete"] and summary["sample"]["diverged_chains"] == 0
    store = SampleStore.open(run_dir / "samples.zarr")
    assert store.layout.components == ("full", "l0h1", "l2.mlp")
    assert store.read("probe_loss").shape == (3, 4, 8, N_TOKENS)
    prov = json.loads((run_dir / "provenance.json").read_text())
    assert prov["model"]["source"] == "embedded" and set(prov["model"]["files"]) >= {"model.safetensors", "config.json"}
    assert len(prov["data"]["content_hash"]) == 64
    # the trained model predicts far better than chance (ln 4096 = 8.3 nats)
    assert 1.0 < store.init_loss < 4.5
    ds = xr.open_zarr(run_dir / "susceptibilities.zarr", consolidated=False)
    assert ds["chi"].shape == (N_TOKENS, 3) and np.isfinite(ds["chi"].values).all()
    assert np.isfinite(ds["chi_se"].values).all() and (ds["chi_se"].values > 0).all()
    assert set(ds["token_source"].values) == {"code", "prose"}
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["sampler"]["nbeta"] == SamplerConfig().nbeta          # the schema's default, as resolved and stored
    # clusters and report (stage=all)
    clusters = json.loads((run_dir / "clusters.json").read_text())
    assert len(clusters["labels"]) == N_TOKENS and clusters["components"] == ["l0h1", "l2.mlp"]
    assert sum(c["size"] for c in clusters["clusters"]) + clusters["n_noise"] == N_TOKENS
    assert (run_dir / "modes.json").exists()
    html = (run_dir / "report.html").read_text()
    assert "l2.mlp" in html and "https://" not in html


def _kill_tree(proc):
    parent = psutil.Process(proc.pid)
    family = [parent] + parent.children(recursive=True)
    for p in family:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)


@pytest.mark.slow
def test_driver_killed_mid_run_resumes_bit_identical(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_job(run_dir)
    total = 3 * 2 * 8
    deadline = time.time() + 300
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        try:
            done = int(SampleStore.open(run_dir / "samples.zarr").progress().sum())
        except Exception:
            done = 0
        if 0 < done < total:
            _kill_tree(proc)
            killed_at = done
            break
        time.sleep(0.05)
    assert killed_at is not None, "the run finished before it could be killed"
    again = run_job(run_dir)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out
    a, b = SampleStore.open(finished_run / "samples.zarr"), SampleStore.open(run_dir / "samples.zarr")
    for name in ("sampling_loss", "probe_loss", "diverged_at", "step_loss", "distance"):
        assert a.read(name).tobytes() == b.read(name).tobytes(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["sample"]["units_skipped"] + summary["sample"]["units_run"] == 3


@pytest.mark.slow
def test_changed_config_on_existing_run_dir_is_refused(finished_run, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "run.py"), f"hydra.run.dir={finished_run}", *SMALL,
                           "sampler.gamma=123", "stage=sample"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    assert proc.returncode == 2
    assert "keys that differ: sampler.gamma" in proc.stderr
    assert (finished_run / "samples.zarr").exists()      # never removed
