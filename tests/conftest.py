"""Shared fixtures and the test environment: a local Ray instance on
loopback owned by one fixture (init once, shutdown at the end); offline
wandb and Hugging Face. Plain helpers live in tests/helpers.py."""

import os

# Keep Ray on 127.0.0.1; must be set before Ray starts.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

# benchmarks/ imports these from here; tests import them from tests.helpers
from tests.helpers import tiny_config, tiny_model, tiny_problem  # noqa: F401


@pytest.fixture(scope="module")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


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
