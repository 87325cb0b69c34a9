"""Tabulate a Hydra multirun of spectro and recommend a sampler setting.

    python jobs/sweep_summary.py multirun/<date>/<time> [--rhat-max 1.1] [--ess-min 20] [--llc-spread-max 0.2]

Prints a markdown table (LLC, R-hat, ESS, divergence rate and health per
setting) and the recommendation with its reasons; writes
`<sweep>/sweep_summary.json`.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spectro.errors import SpectroError  # noqa: E402
from spectro.sweep import Thresholds, format_table, summarize  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("--rhat-max", type=float, default=1.1)
    ap.add_argument("--ess-min", type=float, default=20.0)
    ap.add_argument("--llc-spread-max", type=float, default=0.2)
    args = ap.parse_args()
    try:
        result = summarize(args.sweep_dir, Thresholds(args.rhat_max, args.ess_min, args.llc_spread_max))
    except SpectroError as exc:
        print(f"spectro: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
