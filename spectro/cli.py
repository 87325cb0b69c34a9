"""The main job: the Hydra app behind every entry point, and the plain
function it calls.

`app` is the one Hydra app; `spectro` (the console script), `python -m spectro`
and `python jobs/run.py` (the Ray Jobs entrypoint) all run it, with the
configuration in the repository's conf/ directory. `main(cfg, run_dir)` does
the work: validate, run, report. On bad input it prints one line,
`spectro: error: ...`, exits with code 2, and removes the run directory if
this invocation created it (so a failed start leaves nothing half-written); an
existing run directory with samples is never removed. With `storage.uri` the
run's artifacts go there and the Hydra directory keeps only .hydra/ and
spectro.log.

What the terminal shows is spectro.console's: a progress bar (or plain lines without a terminal), a line per
stage, then a short summary ending with the verdict and the paths of the report, summary.json and spectro.log;
`console.summary=full` prints summary.json as JSON before it.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from spectro import console
from spectro.config import to_config
from spectro.errors import SpectroError

log = logging.getLogger("spectro")

# conf/ sits at the repository root, beside the package: found from an editable install
# (`pip install -e .`) or a checkout on sys.path (`ray job submit --working-dir .`).
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
JOB_NAME = "spectro"          # Hydra's job name: the run directory's log is spectro.log


def _fresh_dir(run_dir: Path) -> bool:
    """True if the directory holds nothing but what Hydra wrote at startup."""
    startup = (".hydra", f"{JOB_NAME}.log")
    return all(p.name in startup for p in run_dir.iterdir()) if run_dir.exists() else True


def main(cfg: DictConfig, run_dir: str | Path) -> int:
    from spectro import pipeline

    run_dir = Path(run_dir)
    created = _fresh_dir(run_dir)
    try:
        config = to_config(cfg)
        console.setup(config.console)
        if config.stage == "plan":          # the cost of the run, before it runs: samples and writes nothing else
            from spectro.plan import run_plan
            run_plan(config, run_dir)
            return 0
        if config.storage.uri:              # storage.uri: an unreachable bucket is one error before any work
            from spectro.rundir import Location
            Location(config.storage.uri).check_writable()
        prepared = pipeline.prepare(config) if config.stage in ("all", "sample") else None
        log.info("run directory %s (spectro.log there keeps the full log)", run_dir)   # after every input check
    except SpectroError as exc:
        print(f"spectro: error: {exc}", file=sys.stderr)
        if created and run_dir.exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        return 2
    try:
        summary = pipeline.run(config, run_dir, prepared)
    except SpectroError as exc:
        print(f"spectro: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        from spectro.store import disk_full
        if not disk_full(exc):
            raise
        print(f"spectro: error: no space left on the device while writing {exc.filename or run_dir} "
              f"({exc.strerror}); free space and rerun the same command to resume", file=sys.stderr)
        return 2
    _print_summary(config, run_dir, summary)
    return 0


def _print_summary(config, run_dir: Path, summary: dict) -> None:
    """The end of the output (spectro.console.summary_lines) from summary.json, which holds every stage's figures
    so far (a single stage's run shows the verdict of the earlier ones); summary.json itself first with
    console.summary=full."""
    from spectro import rundir

    path = rundir.run_location(config.storage.uri, run_dir) / rundir.SUMMARY
    try:
        merged = rundir.read_json(path)
    except (OSError, ValueError):
        merged = summary
    if config.console.summary == "full":
        print(json.dumps(summary, indent=2))
    print("\n".join(console.summary_lines(merged, summary_path=str(path), log_path=str(run_dir / f"{JOB_NAME}.log"))),
          flush=True)


def _job(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN and cfg.wandb.group is None:
        with open_dict(cfg):
            cfg.wandb.group = f"sweep-{Path(hc.sweep.dir).name}"   # one wandb run per job, one group per sweep
    code = main(cfg, hc.runtime.output_dir)
    if code:
        sys.exit(code)


# Hydra names the job after the task function's module (here it would be "cli"): present it as spectro,
# so the log is spectro.log and --help reads "spectro is powered by Hydra". The config path is absolute:
# a relative one would be taken inside the package, where there is no conf/.
_job.__module__ = "spectro"
_hydra_app = hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")(_job)


def app() -> None:
    """The command line: `spectro [overrides]`, `python -m spectro`, `python jobs/run.py`; --help lists the
    config groups."""
    if not (CONF_DIR / "config.yaml").is_file():
        print(f"spectro: error: no configuration at {CONF_DIR}; spectro runs from a checkout of its repository "
              "(pip install -e .), whose conf/ directory holds the configuration", file=sys.stderr)
        sys.exit(2)
    _hydra_app()
