"""Main job: `python jobs/run.py [hydra overrides]` (also the Ray Jobs entrypoint).

Everything goes into Hydra's output directory; the work is `spectro.cli.main`.
"""

import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the package may not be installed on the
# cluster: the repository root (the job's working dir) is importable either way.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from spectro.cli import main as spectro_main  # noqa: E402


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN and cfg.wandb.group is None:
        with open_dict(cfg):
            cfg.wandb.group = f"sweep-{Path(hc.sweep.dir).name}"   # one wandb run per job, one group per sweep
    code = spectro_main(cfg, hc.runtime.output_dir)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
