"""A pilot for `sampler.until` (`plan.pilot=true`): round 1 of the run, sampled and estimated for real in a
scratch directory, and the draws and rounds its reliability predicts the targets need.

The plan's other figures come from a few timed steps and say what a run costs; how many draws a reliability
target needs depends on chi's noise, which only an estimate shows. The pilot runs the configured run's first
round (`sampler.until.round_draws` draws, every component, the same seed: exactly round 1 of the real run),
estimates it, and applies the rounds' own rule (spectro.rounds.predicted_draws, Spearman-Brown from the
split halves) to its least reliable component. The scratch directory is deleted afterwards; nothing is
written into the run directory but plan.json.

    plan = make_plan(config)                  # with config.plan.pilot and a sampler.until target
    plan["rounds"]["pilot"]                   # reliability / R-hat after round 1, predicted draws and rounds
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from pathlib import Path

from spectro.config import SpectroConfig, UntilConfig


def pilot_rounds(config: SpectroConfig, prepared) -> dict:
    """Sample and estimate round 1 of `config`'s run (a `pipeline.Prepared` of it); return its figures and the
    predicted draws and rounds (None where the figures cannot tell)."""
    from spectro import pipeline, rounds, service

    u = config.sampler.until
    pilot = dataclasses.replace(config, sampler=dataclasses.replace(config.sampler, num_draws=u.round_draws,
                                                                    until=UntilConfig()),
                                wandb=dataclasses.replace(config.wandb, mode="disabled"), fresh=False,
                                storage=dataclasses.replace(config.storage, uri=None))
    p = dataclasses.replace(prepared, config=pilot)
    t0 = time.perf_counter()
    started = pipeline.start_ray(config)
    try:
        with tempfile.TemporaryDirectory(prefix="spectro-pilot-") as tmp:
            run_dir = Path(tmp) / "pilot"
            pipeline.run_sampling(pilot, run_dir, p)
            estimate = pipeline.run_susceptibilities(pilot, run_dir)
    finally:
        if started:
            service.shutdown_ray()
    fig = rounds.figures(estimate)
    record = {"draws": u.round_draws, **{k: fig[k] for k in ("reliability_min", "reliability_median", "rhat_max")},
              "seconds": round(time.perf_counter() - t0, 2)}
    record["met"] = rounds.judge(record, u)
    draws = u.round_draws if record["met"] else None
    if draws is None and u.reliability is not None:
        draws = rounds.predicted_draws(rounds.judged_reliability(record, u), u.round_draws, u.reliability)
    record["predicted_draws"] = draws
    record["predicted_rounds"] = None if draws is None else int(math.ceil(draws / u.round_draws))
    record["within_budget"] = None if draws is None else draws <= config.sampler.num_draws
    return record
