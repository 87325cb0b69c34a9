"""Tabulate a Hydra multirun of spectro and recommend a sampler setting.

    python jobs/sweep_summary.py multirun/<date>/<time> [--rhat-max 1.1] [--ess-min 20] [--llc-spread-max 0.2]
                                 [--target-reliability 0.8] [--min-signal-agreement 0.95] [--phi-max 0.5]
                                 [--displacement-max 0.5] [--max-control-agreement 0.9] [--answer-label induction]

Prints a markdown table per setting (LLC, E[phi] of full and the largest
displacement (locality), R-hat, ESS, divergence rate, the feature reliability,
the predicted sampling seconds to reach the target reliability, the
noise-corrected agreement with the most conservative setting and with the
sweep's nβ = 0 control at the same γ, the known answer's best-cluster F1 and
readout AUC, health) and the recommendation with its reasons: the healthy setting that
reaches the target reliability in the least sampling time. Writes
`<sweep>/sweep_summary.json`. The rules are in `spectro/sweep.py`.
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
    t = Thresholds()                                   # the defaults live there, once
    ap.add_argument("--rhat-max", type=float, default=t.rhat_max)
    ap.add_argument("--ess-min", type=float, default=t.ess_min)
    ap.add_argument("--llc-spread-max", type=float, default=t.llc_rel_spread_max)
    ap.add_argument("--target-reliability", type=float, default=t.target_reliability)
    ap.add_argument("--min-signal-agreement", type=float, default=t.min_signal_agreement)
    ap.add_argument("--phi-max", type=float, default=t.phi_max)
    ap.add_argument("--displacement-max", type=float, default=t.displacement_max)
    ap.add_argument("--max-control-agreement", type=float, default=t.max_control_agreement)
    ap.add_argument("--answer-label", default=t.answer_label)
    args = ap.parse_args()
    try:
        result = summarize(args.sweep_dir, Thresholds(args.rhat_max, args.ess_min, args.llc_spread_max,
                                                      args.min_signal_agreement, args.target_reliability,
                                                      args.phi_max, args.displacement_max,
                                                      args.max_control_agreement, args.answer_label))
    except SpectroError as exc:
        print(f"spectro: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
