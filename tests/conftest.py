"""Shared fixtures and the test environment: a local Ray instance on
loopback owned by one fixture (init once, shutdown at the end); an S3 server
(moto's standalone server, a subprocess on loopback) for runs on object
storage; offline wandb and Hugging Face. Plain helpers live in tests/helpers.py."""

import os
import sys
import uuid

# Keep Ray on 127.0.0.1; must be set before Ray starts.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from tests.helpers import s3_env, start_s3_server


@pytest.fixture(scope="module")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3():
    """moto's standalone S3 server on a free loopback port, as a subprocess (a real HTTP endpoint, never an
    in-process mock); the AWS_* variables point every later process at it: this one, its subprocesses and
    Ray workers started after it (request it before `ray_local`). Yields the endpoint URL."""
    try:
        import boto3  # noqa: F401
        import moto  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"object-storage tests need moto[server], boto3 and s3fs (the test extra): {exc}")
    try:
        proc, endpoint = start_s3_server()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    mp = pytest.MonkeyPatch()
    for key, value in s3_env(endpoint).items():
        mp.setenv(key, value)
    try:
        yield endpoint
    finally:
        mp.undo()
        proc.kill()
        proc.wait(timeout=30)


@pytest.fixture
def s3_bucket(s3):
    """A new, empty bucket on the `s3` server; yields its URL (s3://name)."""
    import boto3

    name = f"spectro-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3).create_bucket(Bucket=name)
    yield f"s3://{name}"


# --------------------------------------------------------------------------- #
# which spectro modules a test run imported (pytest --spectro-modules)
# --------------------------------------------------------------------------- #


def pytest_addoption(parser):
    parser.addoption("--spectro-modules", action="store_true",
                     help="after the run, list the spectro modules it imported and those it never did "
                          "(e.g. to check that -m 'not slow' still reaches every module)")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not config.getoption("--spectro-modules"):
        return
    import pkgutil
    import sys

    import spectro

    every = sorted(m.name for m in pkgutil.walk_packages(spectro.__path__, "spectro."))
    missed = [m for m in every if m not in sys.modules]
    tr = terminalreporter
    tr.section("spectro modules")
    tr.write_line(f"imported {len(every) - len(missed)} of {len(every)} spectro modules")
    tr.write_line("never imported: " + (", ".join(missed) if missed else "none"))


# --------------------------------------------------------------------------- #
# a clean end: Ray shut down, then, where Ray ran, no interpreter finalization
# --------------------------------------------------------------------------- #

RAY_NODE_PROCESSES = ("gcs_server", "raylet")
_ray_ran = False      # whether a Ray driver ran in this test process


def _note_ray_node_processes(event: str, args: tuple) -> None:
    """Audit hook: note that this process started Ray's node processes (`ray.init(address="local")` and
    `ray.cluster_utils.Cluster` do; the driver then runs here). Seen even when the test that started Ray
    also shut it down, as an in-process pipeline run does."""
    global _ray_ran
    if event != "subprocess.Popen" or _ray_ran:
        return
    executable, argv = args[0], args[1]
    program = executable or (argv[0] if isinstance(argv, (list, tuple)) and argv else argv)
    if os.path.basename(os.fsdecode(program or "")) in RAY_NODE_PROCESSES:
        _ray_ran = True


def pytest_configure(config):
    sys.addaudithook(_note_ray_node_processes)


def pytest_sessionstart(session):
    session.config._spectro_session = session


def pytest_sessionfinish(session, exitstatus):
    """Shut down a Ray instance a test left running, noting that a driver ran here."""
    global _ray_ran
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            _ray_ran = True
            ray.shutdown()


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Where a Ray driver ran in this process, leave with pytest's exit status once every result is reported,
    without finalizing the interpreter; elsewhere, end normally.

    Such a process has hosted Ray's core worker (whose gRPC threads outlive `ray.shutdown()`) and Ray Data's
    executor threads next to the thread pools of torch, faiss (OpenMP) and numba. Tearing those down while
    the interpreter frees its modules crashed once after a complete, passing run (SIGSEGV, exit 139, no test
    affected). `os._exit` skips that teardown: every file a test writes is closed by then; only the
    interpreter's own teardown is skipped. The exit status is pytest's: 0 when every test passed, 1 when one
    failed, 5 when none was collected."""
    import logging

    session = getattr(config, "_spectro_session", None)
    if not _ray_ran or session is None or not hasattr(session, "exitstatus"):
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed or replaced stream: nothing left to flush
            pass
    os._exit(int(session.exitstatus))
