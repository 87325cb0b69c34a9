"""The run directory's file names and its one writer for whole files.

Every JSON file of a run (config, provenance, clusters, modes, SAE results,
summary) is written by `write_json`, and the report page and the SAE's
config file by `write_text`: the whole document goes to a temporary file in
the same directory, which then replaces the target in one rename, so a reader
never sees half a file and a crash leaves the previous version. `write_text`
is the one function that touches the file system for them: a store without
rename (object storage, which writes whole objects) would replace only it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

CONFIG = "config.json"
PROVENANCE = "provenance.json"
SAMPLES = "samples.zarr"
CHECKPOINTS = "checkpoints"
SUSCEPTIBILITIES = "susceptibilities.zarr"
CLUSTERS = "clusters.json"
MODES = "modes.json"
SAE = "sae.json"
SAE_DIR = "sae"
REPORT = "report.html"
SUMMARY = "summary.json"


def clean(obj: Any) -> Any:
    """JSON-ready copy: numpy scalars and arrays to Python, non-finite floats to None (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return clean(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_text(path: Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically: a temporary file beside it, then one rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_json(path: Path, obj: Any, *, indent: int | None = 2, allow_nan: bool = False) -> Path:
    """Write `obj` as JSON to `path` atomically (`write_text`); non-finite numbers become null unless
    `allow_nan` (then they are written as NaN/Infinity, which Python's json reads back)."""
    return write_text(path, json.dumps(obj if allow_nan else clean(obj), indent=indent, allow_nan=allow_nan))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())
