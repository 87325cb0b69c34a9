"""Regenerate tests/reference/embedded_chi.npz: chi of the embedded default run.

The acceptance test for token roles (tests/test_roles.py) clusters this
matrix. It comes from the main job on its embedded default (every component,
2 antithetic pairs x 40 draws), so the test does not rerun
sampling. Regenerate it whenever the embedded model, the corpus or the
sampler defaults change (the test checks the model and corpus hashes):

    python tests/reference/make_embedded_chi.py                 # runs the default main job first
    python tests/reference/make_embedded_chi.py --run-dir runs/2026-11-24/08-14-33   # an existing default run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "embedded_chi.npz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path, help="a finished default run (default: run one now)")
    args = ap.parse_args()
    run_dir = args.run_dir
    if run_dir is None:
        run_dir = Path(tempfile.mkdtemp(prefix="spectro-default-")) / "run"
        subprocess.run([sys.executable, str(HERE.parents[1] / "jobs" / "run.py"), f"hydra.run.dir={run_dir}"],
                       check=True)
    from hydra import compose, initialize_config_dir

    from spectro.config import as_dict, to_config
    from spectro.store import read_susceptibilities

    config = json.loads((run_dir / "config.json").read_text())
    with initialize_config_dir(config_dir=str(HERE.parents[1] / "conf"), version_base=None):
        default = as_dict(to_config(compose(config_name="config")))      # the main job's config, as typed
    differ = [f"{sec}.{k}" for sec in ("model", "data", "sampler") for k, v in config[sec].items()
              if k in default[sec] and default[sec][k] != v]
    if differ or config["components"] != default["components"]:
        raise SystemExit(f"{run_dir} is not a run of the embedded default ({differ or 'components'} differ)")
    prov = json.loads((run_dir / "provenance.json").read_text())
    ds = read_susceptibilities(run_dir / "susceptibilities.zarr")
    names = [str(c) for c in ds["component"].values]
    np.savez_compressed(
        OUT,
        chi=np.asarray(ds["chi"].values, dtype=np.float32),              # (tokens, components)
        chi_se=np.asarray(ds["chi_se"].values, dtype=np.float32),
        chi_half=np.asarray(ds["chi_half"].values, dtype=np.float32),     # (2, tokens, components)
        components=np.array(names),
        token_text=np.array([str(t) for t in ds["token_text"].values]),
        token_source=np.array([str(s) for s in ds["token_source"].values]),
        model_sha256=np.array(prov["model"]["files"]["model.safetensors"]),
        corpus_hash=np.array(prov["data"]["content_hash"]),
    )
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB) from {run_dir}")


if __name__ == "__main__":
    main()
