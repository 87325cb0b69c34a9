"""The main job submitted through the Ray Jobs API to a real Ray head started
with `ray start --head` on loopback (token authentication on, as on a shared
cluster), the way users run it:

    ray job submit --working-dir . -- python jobs/run.py experiment=smoke
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")

pytestmark = pytest.mark.slow          # a Ray head and a whole job through the Jobs API


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    if not (Path.home() / ".ray" / "auth_token").exists():
        subprocess.run([str(RAY), "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    gcs, dash = free_port(), free_port()
    log = open(tmp_path_factory.mktemp("head") / "head.log", "w")
    head = subprocess.Popen([str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                             "--dashboard-host=127.0.0.1", f"--port={gcs}", f"--dashboard-port={dash}",
                             "--num-cpus=2", "--disable-usage-stats"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    from ray.job_submission import JobSubmissionClient

    # the Jobs API with Ray's token authentication: the token goes in the Authorization header
    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    headers = {"Authorization": f"Bearer {token}"}
    client, deadline, last = None, time.time() + 120, None
    while client is None and time.time() < deadline:
        try:
            client = JobSubmissionClient(f"http://127.0.0.1:{dash}", headers=headers)
        except Exception as exc:  # the job server is still starting
            last = exc
            time.sleep(1)
    try:
        assert client is not None, f"the Ray head's job server never came up: {last!r}"
        yield client
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        log.close()


def submit(client, deadline_s: float = 300, **kwargs) -> str:
    """client.submit_job, retried while the head's job agent is still starting: the job server answers before
    the agent has registered (HTTP 500 "No available agent to submit job"), more often on a loaded machine
    (with two sampling jobs sharing the 2 cores the agent took over 120 s to register)."""
    deadline = time.time() + deadline_s
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.time() > deadline:
                raise
            time.sleep(2)


def test_smoke_job_submitted_through_the_jobs_api(ray_head, tmp_path):
    from ray.job_submission import JobStatus

    run_dir = tmp_path / "run"
    entry = (f"{sys.executable} jobs/run.py experiment=smoke components=[l0h1,l3h3] sampler.num_draws=3 "
             f"sampler.checkpoint_every=3 data.n_probe_contexts=4 hydra.run.dir={run_dir}")
    job = submit(ray_head, entrypoint=entry, runtime_env={
        "working_dir": str(ROOT), "excludes": [".venv", "runs", "multirun", "outputs", "wandb", "*.zarr"]})
    deadline = time.time() + 600
    status = ray_head.get_job_status(job)
    while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) and time.time() < deadline:
        time.sleep(2)
        status = ray_head.get_job_status(job)
    logs = ray_head.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["sample"]["complete"] and summary["sample"]["units_run"] == 3
    for name in ("samples.zarr", "susceptibilities.zarr", "clusters.json", "modes.json", "report.html"):
        assert (run_dir / name).exists(), name
    # the job ran as a driver on the submitted cluster, not on a private local instance
    assert "joined the Ray cluster at" in (run_dir / "spectro.log").read_text(), logs[-2000:]
