"""Main job: `python jobs/run.py [hydra overrides]` (also the Ray Jobs entrypoint).

Everything goes into Hydra's output directory; the work is `spectro.cli.main`.
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from spectro.cli import main as spectro_main


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    code = spectro_main(cfg, HydraConfig.get().runtime.output_dir)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
