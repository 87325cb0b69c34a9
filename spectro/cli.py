"""The plain function behind the Hydra entrypoint: validate, run, report.

On bad input it prints one clear error and removes the run directory if this
invocation created it (so a failed start leaves nothing half-written); an
existing run directory with samples is never removed.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

from omegaconf import DictConfig

from spectro.config import to_config
from spectro.errors import SpectroError

log = logging.getLogger("spectro")


def _fresh_dir(run_dir: Path) -> bool:
    """True if the directory holds nothing but what Hydra wrote at startup."""
    return all(p.name in (".hydra", "run.log") for p in run_dir.iterdir()) if run_dir.exists() else True


def main(cfg: DictConfig, run_dir: str | Path) -> int:
    from spectro import pipeline

    run_dir = Path(run_dir)
    created = _fresh_dir(run_dir)
    try:
        config = to_config(cfg)
        if config.stage == "plan":          # the cost of the run, before it runs: samples and writes nothing else
            from spectro.plan import run_plan
            run_plan(config, run_dir)
            return 0
        prepared = pipeline.prepare(config) if config.stage in ("all", "sample") else None
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
    print(json.dumps(summary, indent=2))
    return 0
