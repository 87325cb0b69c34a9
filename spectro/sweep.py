"""Summarise a Hydra multirun over sampler hyperparameters and recommend a setting.

Each job directory of a sweep (`multirun/<date>/<time>/<n>/`) is a normal run
directory. For each, this reads `config.json`, `summary.json` and the
diagnostics in `susceptibilities.zarr`, applies the health checks a
practitioner runs before a big job, and recommends the passing setting that
mixes best.

Health checks (thresholds are arguments):
- no diverged chain;
- every component's LLC estimate is positive (a negative LLC means the chains
  found lower loss than w*: the step is too large or w* is not a local minimum
  for this nβ, γ);
- every component's R-hat <= `rhat_max` (chains agree);
- every component's bulk ESS >= `ess_min` (enough independent draws);
- the full run's LLC spread over chains, std/mean, <= `llc_rel_spread_max`.

Among passing settings the recommendation is the one with the highest
minimum ESS (ties: the smaller step size, which is the safer choice). If none
passes, it says so, and names the setting that fails the fewest checks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from spectro.errors import StoreError
from spectro.store import read_susceptibilities

SWEPT_KEYS = ("step_size", "nbeta", "gamma", "noise_level", "batch_size", "precondition", "num_draws", "burnin",
              "steps_between_draws")


@dataclass(frozen=True)
class Thresholds:
    rhat_max: float = 1.1
    ess_min: float = 20.0
    llc_rel_spread_max: float = 0.2


def job_dirs(sweep_dir: Path) -> list[Path]:
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise StoreError(f"no sweep directory at {sweep_dir}; pass the multirun directory (multirun/<date>/<time>)")
    jobs = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and (p / "config.json").exists()),
                  key=lambda p: (len(p.name), p.name))
    if not jobs:
        raise StoreError(f"{sweep_dir} holds no run directories (no */config.json); did the sweep run?")
    return jobs


def summarize_job(job: Path, t: Thresholds) -> dict:
    config = json.loads((job / "config.json").read_text())
    row: dict = {"job": job.name, "setting": {k: config["sampler"][k] for k in SWEPT_KEYS}}
    overrides = job / ".hydra" / "overrides.yaml"
    if overrides.exists():
        row["overrides"] = [line[2:].strip() for line in overrides.read_text().splitlines() if line.startswith("- ")]
    try:
        ds = read_susceptibilities(job / "susceptibilities.zarr")
    except StoreError:
        row.update(status="incomplete", passed=False, failures=["no susceptibilities.zarr: the job did not finish"])
        return row
    comps = [str(c) for c in ds["component"].values]
    llc = ds["llc_mean"].values
    llc_std = ds["llc_std"].values
    rhat = ds["rhat"].values
    ess = ds["ess_bulk"].values
    n_div = ds["n_diverged"].values
    n_chains = int(config["sampler"]["num_chains"])
    fi = comps.index("full")
    row.update({
        "llc_full": float(llc[fi]), "llc_full_std": float(llc_std[fi]),
        "llc_min": float(np.nanmin(llc)), "rhat_max": float(np.nanmax(rhat)) if np.isfinite(rhat).any() else float("nan"),
        "ess_min": float(np.nanmin(ess)) if np.isfinite(ess).any() else float("nan"),
        "divergence_rate": float(n_div.sum() / (n_chains * len(comps))),
    })
    failures = []
    if n_div.sum():
        failures.append(f"{int(n_div.sum())} diverged chain(s) ({', '.join(c for c, n in zip(comps, n_div) if n)})")
    bad = [c for c, v in zip(comps, llc) if not v > 0]
    if bad:
        failures.append(f"LLC <= 0 for {', '.join(bad)}")
    bad = [c for c, v in zip(comps, rhat) if not v <= t.rhat_max]
    if bad:
        failures.append(f"R-hat > {t.rhat_max} for {len(bad)}/{len(comps)} components (worst {row['rhat_max']:.2f})")
    bad = [c for c, v in zip(comps, ess) if not v >= t.ess_min]
    if bad:
        failures.append(f"bulk ESS < {t.ess_min:g} for {len(bad)}/{len(comps)} components (lowest {row['ess_min']:.1f})")
    spread = llc_std[fi] / llc[fi] if llc[fi] > 0 else float("inf")
    if not spread <= t.llc_rel_spread_max:
        failures.append(f"full LLC spread over chains {spread:.2f} > {t.llc_rel_spread_max}")
    row.update(status="ok", passed=not failures, failures=failures)
    return row


def recommend(rows: list[dict]) -> dict:
    passing = [r for r in rows if r["passed"]]
    if passing:
        best = max(passing, key=lambda r: (r["ess_min"], -r["setting"]["step_size"]))
        reasons = ["passes every health check (no divergence, LLC > 0 everywhere, R-hat <= threshold, ESS >= minimum)",
                   f"highest minimum bulk ESS among {len(passing)} passing setting(s): {best['ess_min']:.1f}",
                   f"full-model LLC {best['llc_full']:.3f} ± {best['llc_full_std']:.3f} over chains, max R-hat {best['rhat_max']:.2f}"]
        return {"job": best["job"], "setting": best["setting"], "passed": True, "reasons": reasons}
    finished = [r for r in rows if r["status"] == "ok"] or rows
    closest = min(finished, key=lambda r: (len(r["failures"]), -r.get("ess_min", 0)))
    return {"job": closest["job"], "setting": closest["setting"], "passed": False,
            "reasons": ["no setting passes every health check; this one fails the fewest:"] + closest["failures"]}


def summarize(sweep_dir: Path, thresholds: Optional[Thresholds] = None) -> dict:
    t = thresholds or Thresholds()
    rows = [summarize_job(j, t) for j in job_dirs(sweep_dir)]
    result = {"sweep_dir": str(sweep_dir), "thresholds": t.__dict__, "jobs": rows, "recommendation": recommend(rows)}
    (Path(sweep_dir) / "sweep_summary.json").write_text(json.dumps(result, indent=2))
    return result


def format_table(result: dict) -> str:
    rows = result["jobs"]
    varying = [k for k in SWEPT_KEYS if len({json.dumps(r["setting"][k]) for r in rows}) > 1] or ["step_size"]
    head = ["job", *varying, "LLC(full)", "R-hat max", "ESS min", "div. rate", "healthy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["job"], *[f"{r['setting'][k]:g}" if isinstance(r["setting"][k], float) else str(r["setting"][k])
                             for k in varying]]
        if r["status"] == "ok":
            cells += [f"{r['llc_full']:.3f} ± {r['llc_full_std']:.3f}", f"{r['rhat_max']:.2f}", f"{r['ess_min']:.1f}",
                      f"{r['divergence_rate']:.2f}", "yes" if r["passed"] else "no: " + "; ".join(r["failures"])]
        else:
            cells += ["-", "-", "-", "-", "no: " + "; ".join(r["failures"])]
        lines.append("| " + " | ".join(cells) + " |")
    rec = result["recommendation"]
    chosen = ", ".join(f"{k}={rec['setting'][k]}" for k in varying)
    lines += ["", f"Recommended: job {rec['job']} ({chosen})" if rec["passed"]
              else f"No setting passed; closest: job {rec['job']} ({chosen})"]
    lines += [f"  - {reason}" for reason in rec["reasons"]]
    return "\n".join(lines)
