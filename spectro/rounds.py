"""Sample until reliable: rounds of draws, an estimate after each, a stop at the first round that meets the targets.

With a target in `sampler.until` (feature reliability, R-hat), the sample and
susceptibilities stages run in rounds (`run_rounds`): round k samples every
chain to k x `round_draws` draws (`spectro.service.sample(stop_at=...)`),
estimates chi on those draws (`spectro.susceptibilities.compute(draws=...)`)
and judges its figures (`judge`):

    met  =  the features' reliability over components (until.over: their median,
            or their min) >= until.reliability
            and  max over components of R-hat <= until.rhat        (each when set)

The loop stops at the first round that meets the targets ("target met"), when
the next round would pass `sampler.num_draws` ("draw budget"), or when the
next round would end after `until.max_minutes` ("time budget": the last
round's duration predicts the next one's). The later stages (clusters, sae,
report) read the final round's estimate. `rounds.json` in the run directory
records every round (draws, seconds, per-component reliability and R-hat,
min/median, met?, the draws the reliability target needs by Spearman-Brown)
and why the rounds stopped; it is rewritten after every round.
`run_in_rounds` runs the loop with the pipeline's sample and susceptibilities
stages and one wandb run (`Monitor.log_round` after each round).

Non-obvious choices:
- A round's draws are the first draws of the longer run: a unit checkpoints
  at the round's end and the next round continues from that checkpoint, as a
  resume after a crash does, so where rounds cut changes no draw, and a run
  that stops at round k is bit-identical to a run of k x round_draws draws.
- Rounds need the estimate: they run with `stage=all`; `stage=sample` alone
  samples the whole budget, as without a target.
- The reliability target is on the median over components by default, the
  figure the verdict judges. `until.over=min` asks it of every component; a
  component with almost no token-specific response (a head with E[phi] near
  0) then stays noisy long after the rest, and its projected draws grow round
  by round (docs/calibration.md measured it: median 0.54 -> 0.85 over 40-200
  draws, min 0.28 -> 0.47). Both figures are in every round's record.
- Resume: rerun the same command. The rounds that rounds.json lists and the
  store holds (with the same round size and estimator form) are taken from it (their samples are not drawn again, their
  figures are judged against the current targets), the rest run; the time
  budget counts the listed rounds' seconds. `sampler.until` may change on
  resume (spectro.config.RESUME_NEUTRAL_KEYS): a run stopped by a budget
  continues with a larger one. With `fresh=true` rounds.json is ignored.
- `predicted_draws` is `spectro.reliability.draws_factor` times the round's
  draws: Spearman-Brown with the noise variance inversely proportional to the
  draws, D_needed = D (t/(1-t)) / (r/(1-r)).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable, Optional

from spectro import rundir
from spectro.config import SpectroConfig, UntilConfig
from spectro.reliability import draws_factor
from spectro.store import SampleStore

log = logging.getLogger("spectro")

ROUNDS = rundir.ROUNDS
TARGET_MET, DRAW_BUDGET, TIME_BUDGET = "target met", "draw budget", "time budget"


def enabled(until: UntilConfig) -> bool:
    """Whether the run samples in rounds (a target is set)."""
    return until.reliability is not None or until.rhat is not None


def round_draws(until: UntilConfig, num_draws: int) -> list[int]:
    """The draws at the end of each round that fits the budget: round_draws, 2 x round_draws, ... <= num_draws."""
    return list(range(until.round_draws, num_draws + 1, until.round_draws)) if until.round_draws > 0 else []


def predicted_draws(reliability: Optional[float], draws: int, target: float) -> Optional[int]:
    """The draws at which a run whose reliability is `reliability` at `draws` draws reaches `target`
    (Spearman-Brown); `draws` if it already does; None if it cannot tell (reliability unknown or <= 0)."""
    if reliability is None or not math.isfinite(reliability):
        return None
    factor = draws_factor(reliability, target)
    return None if not math.isfinite(factor) else int(math.ceil(draws * factor - 1e-9))


def _finite(x) -> Optional[float]:
    return round(float(x), 5) if x is not None and math.isfinite(float(x)) else None


def figures(estimate: dict) -> dict:
    """A round's figures from the susceptibilities stage's summary: per component its feature reliability and
    R-hat, and the minimum / median reliability and the largest R-hat (None where unknown)."""
    rel = estimate.get("reliability") or {}
    by_comp = dict(zip(rel.get("components") or [], rel.get("features_reliability") or []))
    rhat = estimate.get("rhat") or {}
    comps = {c: {"reliability": _finite(by_comp.get(c)), "rhat": _finite(rhat.get(c))}
             for c in list(rhat) or list(by_comp)}
    return {"components": comps, "reliability_min": _finite(rel.get("features_min")),
            "reliability_median": _finite(rel.get("features_median")), "rhat_max": _finite(estimate.get("rhat_max"))}


def judged_reliability(record: dict, until: UntilConfig) -> Optional[float]:
    """The round's reliability figure that the target is on: its median or min over components (`until.over`)."""
    return record.get(f"reliability_{until.over}")


def judge(record: dict, until: UntilConfig) -> bool:
    """Whether a round's figures (`figures`) meet every target set; an unknown figure meets none."""
    ok = True
    if until.reliability is not None:
        r = judged_reliability(record, until)
        ok = ok and r is not None and r >= until.reliability
    if until.rhat is not None:
        h = record.get("rhat_max")
        ok = ok and h is not None and h <= until.rhat
    return bool(ok)


def _judged(record: dict, until: UntilConfig) -> dict:
    """The record with `met` and (with a reliability target) `predicted_draws` for the current targets."""
    out = {**record, "met": judge(record, until)}
    if until.reliability is not None:
        out["predicted_draws"] = predicted_draws(judged_reliability(record, until), record["draws"],
                                                 until.reliability)
    return out


def _recorded(config: SpectroConfig, run_dir: rundir.Location) -> list[dict]:
    """The rounds of an earlier invocation that can be taken over: listed in rounds.json with the same round
    size and estimator form, and held by the store (every chain has their draws committed)."""
    path, samples = run_dir / ROUNDS, run_dir / rundir.SAMPLES
    if config.fresh or not path.exists() or not samples.exists():
        return []
    doc = rundir.read_json(path)
    if doc.get("round_draws") != config.sampler.until.round_draws or doc.get("form") != config.estimator.form:
        return []
    committed = int(SampleStore.open(samples).progress().min())
    plan = round_draws(config.sampler.until, config.sampler.num_draws)
    kept = []
    for k, r in enumerate(doc.get("rounds") or []):
        if k >= len(plan) or r.get("draws") != plan[k] or r["draws"] > committed:
            break
        kept.append(r)
    return kept


def _stop(rounds: list[dict], until: UntilConfig, plan: list[int], elapsed: float) -> Optional[str]:
    """Why no further round runs after `rounds` (None: run the next one)."""
    if rounds and rounds[-1]["met"]:
        return TARGET_MET
    if len(rounds) >= len(plan):
        return DRAW_BUDGET
    if rounds and until.max_minutes is not None and elapsed + rounds[-1]["seconds"] > 60 * until.max_minutes:
        return TIME_BUDGET
    return None


def run_rounds(config: SpectroConfig, run_dir: rundir.PathLike, sample_to: Callable[[int], dict],
               estimate: Callable[[int], dict], on_round: Optional[Callable[[dict], None]] = None) -> dict:
    """The rounds loop (module doc). `sample_to(draws)` samples every chain to `draws` draws, `estimate(draws)`
    runs the susceptibilities stage on them and returns its summary, `on_round(record)` sees every round run or
    taken over. Writes rounds.json; returns its contents."""
    until, run_dir = config.sampler.until, rundir.location(run_dir)
    run_dir.mkdir()
    plan = round_draws(until, config.sampler.num_draws)
    earlier = _recorded(config, run_dir)
    t0, spent_before = time.monotonic(), sum(r["seconds"] for r in earlier)
    rounds: list[dict] = []
    estimated_at = None
    while (why := _stop(rounds, until, plan, spent_before + time.monotonic() - t0)) is None:
        k = len(rounds)
        if k < len(earlier):
            record = _judged({**earlier[k], "taken_over": True}, until)
        else:
            r0 = time.monotonic()
            sample_to(plan[k])
            out = estimate(plan[k])
            estimated_at = plan[k]
            record = _judged({"round": k + 1, "taken_over": False, "draws": plan[k],
                              "seconds": round(time.monotonic() - r0, 2), **figures(out)}, until)
        rounds.append(record)
        _log_round(record, until)
        if on_round is not None:
            on_round(record)
        _write(run_dir, config, plan, rounds, None)
    if estimated_at != rounds[-1]["draws"]:           # the later stages read the final round's estimate
        estimate(rounds[-1]["draws"])
    log.info("rounds: stopped after round %d of %d draws (%s)", len(rounds), rounds[-1]["draws"], why)
    return _write(run_dir, config, plan, rounds, why)


def _write(run_dir: rundir.Location, config: SpectroConfig, plan: list[int], rounds: list[dict],
           why: Optional[str]) -> dict:
    until = config.sampler.until
    doc = {"targets": {"reliability": until.reliability, "over": until.over, "rhat": until.rhat},
           "form": config.estimator.form,
           "round_draws": until.round_draws, "draw_budget": plan[-1] if plan else 0,
           "max_minutes": until.max_minutes, "rounds": rounds, "stopped_because": why,
           "draws": rounds[-1]["draws"] if rounds else 0, "seconds": round(sum(r["seconds"] for r in rounds), 2)}
    rundir.write_json(run_dir / ROUNDS, doc)
    return doc


def _log_round(record: dict, until: UntilConfig) -> None:
    """One console line per round."""
    def f(x, fmt="{:.3f}"):
        return "–" if x is None else fmt.format(x)

    more = ""
    if not record["met"] and record.get("predicted_draws") is not None:
        more = f", about {record['predicted_draws']} draws for {until.over} reliability {until.reliability}"
    log.info("round %d%s: %d draws in %.0f s, feature reliability median %s (min %s), R-hat max %s: %s%s",
             record["round"], " (from rounds.json)" if record.get("taken_over") else "", record["draws"],
             record["seconds"], f(record["reliability_median"], "{:.2f}"),
             f(record["reliability_min"], "{:.2f}"), f(record["rhat_max"]),
             "targets met" if record["met"] else "targets not met", more)


def final_draws(run_dir: rundir.PathLike) -> Optional[int]:
    """The draws the rounds of a finished run stopped at (the estimate the later stages read), else None."""
    path = rundir.location(run_dir) / ROUNDS
    if not path.exists():
        return None
    doc = rundir.read_json(path)
    return int(doc["draws"]) if doc.get("stopped_because") and doc.get("draws") else None


def forget(run_dir: rundir.PathLike) -> dict:
    """After a sample stage without rounds: remove an earlier rounds.json (the estimate no longer rests on its
    rounds); returns the summary entry that says so ({"rounds": None}), or {} when there was none."""
    path = rundir.location(run_dir) / ROUNDS
    if not path.exists():
        return {}
    path.unlink(missing_ok=True)
    return {"rounds": None}
