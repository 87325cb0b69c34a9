"""`python -m spectro [overrides]`: the main job, the same Hydra app as the `spectro` command."""

from spectro.cli import app

if __name__ == "__main__":
    app()
