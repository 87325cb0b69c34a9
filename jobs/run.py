"""Main job: `python jobs/run.py [hydra overrides]`, the Ray Jobs entrypoint.

The same Hydra app as the `spectro` command and `python -m spectro`
(`spectro.cli.app`); everything goes into Hydra's output directory.
"""

import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the package may not be installed on the
# cluster: the repository root (the job's working dir) is importable either way.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spectro.cli import app  # noqa: E402

if __name__ == "__main__":
    app()
