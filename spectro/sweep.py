"""Summarise a Hydra multirun over sampler hyperparameters and recommend a setting.

Each job directory of a sweep (`multirun/<date>/<time>/<n>/`) is a normal run
directory. For each, this reads `config.json`, `summary.json` and
`susceptibilities.zarr`, applies the health checks a practitioner runs before
a big job, and ranks the passing settings by what the run is for: reliable
susceptibilities per second of sampling.

Health checks (thresholds are arguments):
- no diverged chain;
- every component's LLC estimate is positive (a negative LLC means the chains
  found lower loss than w*: the step is too large or w* is not a local minimum
  for this nβ, γ; an nβ = 0 control has no LLC and is judged on the rest: it is
  the reference of the other jobs at its γ, never the recommendation);
- every component's R-hat <= `rhat_max` (chains agree);
- every component's bulk ESS >= `ess_min` (enough independent draws);
- the full run's LLC spread over chains, std/mean, <= `llc_rel_spread_max`;
- the signal did not move: the job's clustering features agree with those of
  the most conservative job of the same posterior (same nβ, γ, σ, batch size,
  preconditioner; the smallest step size, then most draws) at a
  noise-corrected correlation >= `min_signal_agreement` (see below).

Ranking. A job's feature reliability rel (split-half, `spectro.reliability`)
says how much of its features is signal: the signal-to-noise ratio
rel / (1 - rel) grows in proportion to the number of independent draws.
So `snr_per_second` = rel / (1 - rel) / sampling seconds is the figure to
maximise (effective samples of chi per second), and `seconds_to_target` =
seconds x [target / (1 - target)] / [rel / (1 - rel)] is the sampling time
the setting would need to reach the target reliability. The recommendation is
the passing job with the shortest `seconds_to_target`.

Non-obvious choices:
- Noise is not the only thing a setting changes: a larger step size also
  changes the distribution sampled. Two settings measure the same signal if
  their features, after dividing out each one's noise, correlate near 1:
  r_corrected = r(features_a, features_b) / sqrt(rel_a rel_b), per component,
  median over components. A job well below 1 against the reference has moved
  the signal and is not recommended, however fast it is.
- R-hat and ESS are about the sampling loss (the LLC's observable); the
  reliability figures are about chi itself. A setting must pass both.
- Locality: E[phi] and the displacement of every component below the
  susceptibilities job's thresholds (spectro.susceptibilities), else the
  setting samples models far from w*.
- The loss must shape the posterior: a sweep that holds an nβ = 0 control job
  (`sampler.control=true`) at a job's γ compares them: the noise-corrected
  agreement of their features, and the known answer's best-cluster F1 above
  the control's. Agreement above `max_control_agreement` with no F1 gain of
  0.2 fails: chi then reflects the localisation, not the loss.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from spectro import rundir
from spectro.config import EstimatorConfig
from spectro.errors import StoreError
from spectro.reliability import MIN_RELIABILITY
from spectro.store import read_susceptibilities
from spectro.susceptibilities import LOCAL_MAX_DISPLACEMENT, LOCAL_MAX_PHI

# The keys that define the local posterior (a change is a different target, not a less exact one); jobs are
# compared for signal agreement only with jobs that share all of them.
POSTERIOR_KEYS = ("nbeta", "gamma", "noise_level", "batch_size", "precondition", "control")
SWEPT_KEYS = ("step_size", "nbeta", "gamma", "noise_level", "batch_size", "precondition", "rmsprop_eps", "num_draws",
              "burnin", "steps_between_draws", "num_chains", "antithetic", "control")


@dataclass(frozen=True)
class Thresholds:
    rhat_max: float = EstimatorConfig().rhat_threshold     # the estimator's "not mixed" threshold
    ess_min: float = 20.0
    llc_rel_spread_max: float = 0.2
    min_signal_agreement: float = 0.95
    target_reliability: float = MIN_RELIABILITY            # the verdict's "reliable" median
    phi_max: float = LOCAL_MAX_PHI                          # locality: the susceptibilities job's thresholds
    displacement_max: float = LOCAL_MAX_DISPLACEMENT
    max_control_agreement: float = 0.9                     # above it the loss barely shapes the posterior
    answer_label: str = "induction"                        # the known answer whose F1 and readout AUC are ranked


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
    row: dict = {"job": job.name, "setting": {k: config["sampler"].get(k) for k in SWEPT_KEYS}}
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
        "llc_min": float(np.nanmin(llc)),
        "rhat_max": float(np.nanmax(rhat)) if np.isfinite(rhat).any() else float("nan"),
        "ess_min": float(np.nanmin(ess)) if np.isfinite(ess).any() else float("nan"),
        "divergence_rate": float(n_div.sum() / (n_chains * len(comps))),
    })
    failures = _chain_failures(comps, llc, llc_std, rhat, ess, n_div, row, t, bool(row["setting"].get("control")))
    phi = ds["mean_phi"].values
    disp = ds["displacement"].values if "displacement" in ds else np.full(len(comps), np.nan)
    row.update({"phi_full": float(phi[fi]), "displacement_max": float(np.nanmax(disp)) if np.isfinite(disp).any()
                else None,
                "phi": dict(zip(comps, map(float, phi))), "displacement": dict(zip(comps, map(float, disp)))})
    far = [c for c, p, d in zip(comps, phi, disp) if p > t.phi_max or d > t.displacement_max]
    if far:
        failures.append(f"not local: E[phi] > {t.phi_max:g} nats or displacement > {t.displacement_max:g} for "
                        f"{len(far)}/{len(comps)} components ({', '.join(far[:4])})")
    rel = ds.attrs.get("reliability")
    summary = json.loads((job / "summary.json").read_text()) if (job / "summary.json").exists() else {}
    answers = (summary.get("clusters") or {}).get("known_answers") or {}
    ind = answers.get(t.answer_label) or {}
    row.update({"answer_f1": ind.get("f1"), "answer_auc": ind.get("readout_auc")})
    seconds = summary.get("sample", {}).get("seconds")
    row.update({"reliability": rel["features_median"] if rel else None, "sampling_seconds": seconds})
    if rel and seconds and rel["features_median"] is not None and 0 < rel["features_median"] < 1:
        snr = rel["features_median"] / (1 - rel["features_median"])
        goal = t.target_reliability / (1 - t.target_reliability)
        row.update(snr_per_second=snr / seconds, seconds_to_target=seconds * goal / snr)
    else:
        row.update(snr_per_second=None, seconds_to_target=None)
        if not rel:
            failures.append("no reliability figures (fewer than two independent units per run)")
    row.update(status="ok", passed=not failures, failures=failures)
    return row


def _chain_failures(comps: list[str], llc, llc_std, rhat, ess, n_div, row: dict, t: Thresholds,
                    control: bool) -> list[str]:
    """The job's failed chain checks: divergences, LLC <= 0, R-hat, bulk ESS, the full LLC's spread over chains
    (`row` holds its worst R-hat and lowest ESS). A control's LLC is nβ E[φ] with nβ = 0: no LLC check applies."""
    fi = comps.index("full")
    failures = []
    if n_div.sum():
        failures.append(f"{int(n_div.sum())} diverged chain(s) ({', '.join(c for c, n in zip(comps, n_div) if n)})")
    bad = [c for c, v in zip(comps, llc) if not v > 0]
    if bad and not control:
        failures.append(f"LLC <= 0 for {', '.join(bad)}")
    bad = [c for c, v in zip(comps, rhat) if not v <= t.rhat_max]
    if bad:
        failures.append(f"R-hat > {t.rhat_max} for {len(bad)}/{len(comps)} components (worst {row['rhat_max']:.2f})")
    bad = [c for c, v in zip(comps, ess) if not v >= t.ess_min]
    if bad:
        failures.append(f"bulk ESS < {t.ess_min:g} for {len(bad)}/{len(comps)} components "
                        f"(lowest {row['ess_min']:.1f})")
    spread = llc_std[fi] / llc[fi] if llc[fi] > 0 else float("inf")
    if not spread <= t.llc_rel_spread_max and not control:
        failures.append(f"full LLC spread over chains {spread:.2f} > {t.llc_rel_spread_max}")
    return failures


def _features_and_reliability(job: Path):
    from spectro.features import feature_matrix

    ds = read_susceptibilities(job / "susceptibilities.zarr")
    rel = ds.attrs.get("reliability")
    if not rel:
        return None
    names = [str(c) for c in ds["component"].values]
    keep = [names.index(c) for c in rel["components"]]
    return (rel["components"], feature_matrix(np.asarray(ds["chi"].values, dtype=np.float64)[:, keep]),
            np.asarray(rel["features_reliability"], dtype=np.float64), ds["token_id"].values)


def signal_agreement(rows: list[dict], jobs: list[Path], t: Thresholds) -> None:
    """Noise-corrected agreement of each job's features with the most conservative job's (module notes);
    a job below `min_signal_agreement` fails."""
    from spectro.reliability import column_correlations

    done = [(r, j) for r, j in zip(rows, jobs) if r["status"] == "ok" and r.get("reliability") is not None]
    groups: dict = {}
    for r, j in done:                     # settings that define the posterior; the rest are numerics
        key = json.dumps([r["setting"][k] for k in POSTERIOR_KEYS])
        groups.setdefault(key, []).append((r, j))
    for members in groups.values():
        if len(members) >= 2:
            _agreement_in_group(members, t, column_correlations)


def _agreement_in_group(members: list, t: Thresholds, column_correlations) -> None:
    ref_row, ref_job = min(members, key=lambda rj: (rj[0]["setting"]["step_size"], -rj[0]["setting"]["num_draws"]))
    ref = _features_and_reliability(ref_job)
    for r, j in members:
        r["signal_reference"] = ref_row["job"]
        if j == ref_job:
            r["signal_agreement"] = 1.0
            continue
        other = _features_and_reliability(j)
        if other is None or other[0] != ref[0] or not np.array_equal(other[3], ref[3]):
            r["signal_agreement"] = None          # other components or probe tokens: not comparable
            continue
        corr = column_correlations(other[1], ref[1]) / np.sqrt(np.clip(other[2] * ref[2], 1e-12, None))
        r["signal_agreement"] = float(np.nanmedian(corr))
        if r["signal_agreement"] < t.min_signal_agreement:
            r["failures"].append(f"signal moved: features agree with job {ref_row['job']} at "
                                 f"{r['signal_agreement']:.2f} after noise correction (< {t.min_signal_agreement})")
            r["passed"] = False


def control_agreement(rows: list[dict], jobs: list[Path], t: Thresholds) -> None:
    """Each job against the sweep's nβ = 0 control at the same γ (module notes): the noise-corrected agreement of
    their features, and the known answer's F1 above the control's. A job the loss does not shape (agreement
    above `max_control_agreement` and F1 no more than 0.2 above the control's) fails."""
    from spectro.reliability import column_correlations

    controls = {r["setting"]["gamma"]: (r, j) for r, j in zip(rows, jobs)
                if r["setting"].get("control") and r["status"] == "ok" and r.get("reliability") is not None}
    for r, j in zip(rows, jobs):
        if r["setting"].get("control") or r["status"] != "ok" or r["setting"]["gamma"] not in controls:
            continue
        c_row, c_job = controls[r["setting"]["gamma"]]
        mine, ctl = _features_and_reliability(j), _features_and_reliability(c_job)
        if mine is None or ctl is None or mine[0] != ctl[0] or not np.array_equal(mine[3], ctl[3]):
            continue
        corr = column_correlations(mine[1], ctl[1]) / np.sqrt(np.clip(mine[2] * ctl[2], 1e-12, None))
        r["control_job"], r["control_agreement"] = c_row["job"], float(np.nanmedian(corr))
        gain = None if r.get("answer_f1") is None or c_row.get("answer_f1") is None else \
            r["answer_f1"] - c_row["answer_f1"]
        r["answer_f1_over_control"] = gain
        failure = control_failure(r["control_agreement"], gain, c_row["job"], t)
        if failure:
            r["failures"].append(failure)
            r["passed"] = False


def control_failure(agreement: float, gain: Optional[float], control_job: str, t: Thresholds) -> Optional[str]:
    """The failure of a job whose posterior the loss does not shape, or None: its features agree with the
    control's above `max_control_agreement` (noise-corrected) and its known answer's F1 is not 0.2 above the
    control's (either one is enough to pass: a different signal, or a better one)."""
    if agreement > t.max_control_agreement and not (gain is not None and gain >= 0.2):
        return (f"the loss barely shapes the posterior: features agree with the nβ = 0 control (job {control_job}) "
                f"at {agreement:.2f} after noise correction")
    return None


def recommend(rows: list[dict]) -> dict:
    """The passing setting that reaches the target reliability soonest (module notes); an nβ = 0 control is the
    reference the others are judged against, never the recommendation."""
    rows = [r for r in rows if not r["setting"].get("control")] or rows
    passing = [r for r in rows if r["passed"]]
    if passing:
        timed = [r for r in passing if r.get("seconds_to_target") is not None]
        if timed:
            best = min(timed, key=lambda r: (r["seconds_to_target"], r["setting"]["step_size"]))
            lead = (f"shortest predicted sampling time to feature reliability {best.get('target', 0.8)} among "
                    f"{len(passing)} passing setting(s): {best['seconds_to_target']:.0f} s (reliability "
                    f"{best['reliability']:.2f} in {best['sampling_seconds']:.0f} s)")
        else:
            best = max(passing, key=lambda r: (r["ess_min"], -r["setting"]["step_size"]))
            lead = f"highest minimum bulk ESS among {len(passing)} passing setting(s): {best['ess_min']:.1f}"
        reasons = ["passes every health check (no divergence, LLC > 0 everywhere, R-hat <= threshold, ESS >= minimum, "
                   "signal unchanged)", lead,
                   f"full-model LLC {best['llc_full']:.3f} ± {best['llc_full_std']:.3f} over chains, max R-hat "
                   f"{best['rhat_max']:.2f}, min bulk ESS {best['ess_min']:.1f}"]
        return {"job": best["job"], "setting": best["setting"], "passed": True, "reasons": reasons}
    finished = [r for r in rows if r["status"] == "ok"] or rows
    closest = min(finished, key=lambda r: (len(r["failures"]), -r.get("ess_min", 0)))
    return {"job": closest["job"], "setting": closest["setting"], "passed": False,
            "reasons": ["no setting passes every health check; this one fails the fewest:"] + closest["failures"]}


def summarize(sweep_dir: Path, thresholds: Optional[Thresholds] = None) -> dict:
    t = thresholds or Thresholds()
    jobs = job_dirs(sweep_dir)
    rows = [summarize_job(j, t) for j in jobs]
    for r in rows:
        r["target"] = t.target_reliability
    signal_agreement(rows, jobs, t)
    control_agreement(rows, jobs, t)
    result = {"sweep_dir": str(sweep_dir), "thresholds": t.__dict__, "jobs": rows, "recommendation": recommend(rows)}
    rundir.write_json(Path(sweep_dir) / "sweep_summary.json", result, indent=2, allow_nan=True)
    return result


def format_table(result: dict) -> str:
    rows = result["jobs"]
    varying = [k for k in SWEPT_KEYS if len({json.dumps(r["setting"][k]) for r in rows}) > 1] or ["step_size"]
    head = ["job", *varying, "LLC(full)", "E[φ] full", "displ. max", "R-hat max", "ESS min", "div. rate",
            "reliability", "s to target", "signal", "vs control", f"{result['thresholds']['answer_label']} F1",
            "F1 - control", "readout AUC", "healthy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["job"], *[f"{r['setting'][k]:g}" if isinstance(r["setting"][k], float) else str(r["setting"][k])
                             for k in varying]]
        if r["status"] == "ok":
            def num(v, f):
                return "-" if v is None else format(v, f)

            cells += [f"{r['llc_full']:.3f} ± {r['llc_full_std']:.3f}", num(r.get("phi_full"), ".3f"),
                      num(r.get("displacement_max"), ".3f"), f"{r['rhat_max']:.2f}", f"{r['ess_min']:.1f}",
                      f"{r['divergence_rate']:.2f}", num(r.get("reliability"), ".3f"),
                      num(r.get("seconds_to_target"), ".0f"), num(r.get("signal_agreement"), ".3f"),
                      num(r.get("control_agreement"), ".3f"), num(r.get("answer_f1"), ".2f"),
                      num(r.get("answer_f1_over_control"), "+.2f"), num(r.get("answer_auc"), ".2f"),
                      "yes" if r["passed"] else "no: " + "; ".join(r["failures"])]
        else:
            cells += ["-"] * 13 + ["no: " + "; ".join(r["failures"])]
        lines.append("| " + " | ".join(cells) + " |")
    rec = result["recommendation"]
    chosen = ", ".join(f"{k}={rec['setting'][k]}" for k in varying)
    lines += ["", f"Recommended: job {rec['job']} ({chosen})" if rec["passed"]
              else f"No setting passed; closest: job {rec['job']} ({chosen})"]
    lines += [f"  - {reason}" for reason in rec["reasons"]]
    return "\n".join(lines)
