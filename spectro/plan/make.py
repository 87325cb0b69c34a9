"""The plan itself: `make_plan` puts counts and clock together for a composed config,
`format_plan` prints it, `run_plan` is the stage (writes `plan.json`)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Optional

from spectro.gpus import GPUS
from spectro.plan.timing import (BW_EFFICIENCY, EFFICIENCY, LAUNCH_S, CpuLoad, _threads, calibrate, fit, fit_ops,
                                 load_stretch, schedule, unit_seconds_cpu, unit_seconds_gpu)
from spectro.plan.work import (ACTOR_START_S, GENERATOR_STATE_BYTES, RUNTIME_BYTES, Shape, actor_memory,
                               checkpoint_moment_bytes, store_arrays, unit_work)
from spectro.probes import probe_context_count

# ---------------------------------------------------------------- the plan


def make_plan(config, prepared=None, calibrate_draws: Optional[int] = None) -> dict:
    """The plan of `config` (a validated SpectroConfig). Loads the model and data unless `prepared` is given;
    `calibrate_draws` (default `plan.calibration_draws`; 0: no calibration) sets the timed steps/evaluations."""
    from spectro import pipeline, rounds

    p = prepared or pipeline.prepare(config)
    s, d, pc = config.sampler, config.data, config.plan
    layout = pipeline.layout_for(p)
    shape = Shape.of(p.loaded.model, d.seq_len)
    by_name = {c.name: c for c in p.components}
    units = _units(layout, by_name, config, shape)
    stores = _stores(layout, p.probe, units, s)
    plan = {
        "config": {"model": config.model.source, "components": list(layout.components),
                   "num_chains": s.num_chains, "chain_group": layout.chain_group, "antithetic": s.antithetic,
                   "num_draws": s.num_draws, "burnin": s.burnin, "steps_between_draws": s.steps_between_draws,
                   "batch_size": s.batch_size, "seq_len": d.seq_len, "n_sampling_contexts": d.n_sampling_contexts,
                   "n_probe_contexts": probe_context_count(d), "num_actors": config.ray.num_actors,
                   "threads_per_actor": _threads(config), "probe_dtype": s.probe_dtype, "tf32": s.tf32},
        "model": dataclasses.asdict(shape),
        "totals": _totals(units, layout),
        "store": stores[layout.probe],          # the configured store.probe mode
        "stores": {mode: {k: v for k, v in st.items() if k != "arrays"} for mode, st in stores.items()},
        "memory": actor_memory(config, shape, units),
        "units": [{k: v for k, v in u.items() if k != "tensors"} for u in units],
    }
    u = s.until
    if rounds.enabled(u):                # the figures above are for the whole budget: the most the rounds cost
        plan["rounds"] = {"round_draws": u.round_draws, "max_rounds": len(rounds.round_draws(u, s.num_draws)),
                          "targets": {"reliability": u.reliability, "rhat": u.rhat}, "max_minutes": u.max_minutes}
        if pc.pilot:                     # round 1 for real: the draws the targets need (spectro.plan.pilot)
            from spectro.plan.pilot import pilot_rounds
            plan["rounds"]["pilot"] = pilot_rounds(config, p)
    n_draws = pc.calibration_draws if calibrate_draws is None else calibrate_draws
    if n_draws > 0:
        plan["cpu"] = _cpu_timing(p, config, layout, shape, by_name, units, plan["units"], n_draws)
    if pc.gpu:
        plan["gpu"] = _gpu_timing(config, layout, shape, by_name, units, plan)
    return plan


def _units(layout, by_name: dict, config, shape: Shape) -> list[dict]:
    """Counts and FLOPs of every unit of work (`unit_work`), with its chains, shard, tokens and tensors."""
    units = []
    for name, chains, shard in layout.shard_units():
        c0, c1 = layout.shard_contexts(shard)
        w = unit_work(by_name[name], len(chains), config, shape, c1 - c0)
        w["chain_ids"] = list(chains)
        w["shard"] = shard
        w["n_tokens"] = (c1 - c0) * (layout.seq_len - 1)
        w["tensors"] = sorted(by_name[name].shapes)
        units.append(w)
    return units


def _totals(units: list[dict], layout) -> dict:
    totals = {"units": len(units), "components": len(layout.components), "probe_shards": layout.probe_shards,
              "chain_draws": sum(u["chain_draws"] for u in units if u["shard"] == 0),
              "sgld_steps": sum(u["steps"] for u in units),
              "chain_steps": sum(u["steps"] * u["chains"] for u in units),
              "evaluations": sum(u["evaluations"] for u in units),
              "probe_tokens": layout.n_tokens,
              "flops_steps": sum(u["flops_steps"] for u in units),
              "flops_evals": sum(u["flops_evals"] for u in units),
              "flops_probe_evals": sum(u["flops_probe_evals"] for u in units),
              "flops_cache": sum(u["flops_cache"] for u in units)}
    totals["flops"] = totals["flops_steps"] + totals["flops_evals"] + totals["flops_cache"]
    return totals


def _stores(layout, probe, units: list[dict], s) -> dict:
    """The sample store's arrays and bytes, and the checkpoints' bytes, in either probe store mode."""
    ckpt = sum(u["chains"] * (u["sampled_entries"] * 4 * (2 if s.precondition == "rmsprop" else 1)
                              + 2 * GENERATOR_STATE_BYTES + 8 * s.num_draws) for u in units)   # + loss history
    stores = {}
    for mode in ("draws", "moments"):
        arrays = store_arrays(layout, probe, mode)
        extra = sum(checkpoint_moment_bytes(u["chains"], u["n_tokens"]) for u in units) if mode == "moments" else 0
        stores[mode] = {"mode": mode, "arrays": arrays, "bytes": sum(a["bytes"] for a in arrays.values()),
                        "checkpoint_bytes": ckpt + extra}
    return stores


def _cpu_timing(p, config, layout, shape: Shape, by_name: dict, units: list[dict], plan_units: list[dict],
                n_draws: int) -> dict:
    """Time `n_draws` draws of `full` and a representative component here, fit the rates, predict every unit
    (written into `plan_units` as `predicted_s`) and the run's wall time on this machine."""
    ref = config.plan.calibrate_on or _median_component(units)
    if ref not in by_name:
        from spectro.errors import ConfigError
        raise ConfigError(f"plan.calibrate_on names {ref!r}, which is not a component of this run "
                          f"({', '.join(layout.components)}); pick one of those or null")
    names = ["full"] + ([ref] if ref != "full" else [])
    chains = tuple(layout.units()[0][1])
    t0 = time.perf_counter()
    with CpuLoad(_threads(config)) as load:
        calib = calibrate(p, names, n_draws, chains)
    work = {n: unit_work(by_name[n], len(chains), config, shape) for n in names}   # as calibrated: all probes
    rates = fit(calib, work)
    per_unit = [unit_seconds_cpu(u, rates, calib, config) for u in units]
    cores = os.cpu_count() or 1
    stretch = load_stretch(config, load.cores, cores)
    durations = [x["total"] * stretch for x in per_unit]
    wall = schedule(durations, config.ray.num_actors, ACTOR_START_S)
    for u, x in zip(plan_units, per_unit):
        u["predicted_s"] = round(x["total"] * stretch, 3)
    return {"calibration": calib, "calibration_seconds": round(time.perf_counter() - t0, 2),
            "rates": rates, "cores": cores, "other_load_cores": round(load.cores, 2), "stretch": stretch,
            "actor_seconds": sum(durations), "predicted_wall_s": wall}


def _gpu_timing(config, layout, shape: Shape, by_name: dict, units: list[dict], plan: dict) -> dict:
    """The run's predicted time on `plan.gpu` (datasheet figures; op counts from the CPU calibration, if any)."""
    pc = config.plan
    gpu = GPUS[pc.gpu]
    calib = plan.get("cpu", {}).get("calibration", {})
    work = {n: {**unit_work(by_name[n], len(layout.units()[0][1]), config, shape),
                "tensors": sorted(by_name[n].shapes)} for n in calib}
    ops = fit_ops(calib, work, shape)
    secs = [unit_seconds_gpu(u, gpu, config, shape, ops) for u in units]
    return {"name": pc.gpu, "part": gpu.name, "efficiency": EFFICIENCY, "bw_efficiency": BW_EFFICIENCY,
            "launch_s": LAUNCH_S, "actors": config.ray.num_actors,
            "op_counts": "counted in the calibration" if ops else "per-layer constants (no calibration)",
            "actor_seconds": sum(secs),
            "predicted_wall_s": schedule(secs, config.ray.num_actors, ACTOR_START_S),
            "fits_memory": plan["memory"]["peak_bytes"] - RUNTIME_BYTES < gpu.memory_gb * 1e9}


def _median_component(units: list[dict]) -> str:
    """The non-`full` component whose step FLOPs is the median: the calibration's representative."""
    others = sorted({u["component"]: u["flops_per_step"] for u in units if u["component"] != "full"}.items(),
                    key=lambda kv: kv[1])
    return others[len(others) // 2][0] if others else "full"


def _b(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return str(n)


def _s(x: float) -> str:
    return f"{x:,.0f} s ({x / 60:.1f} min)" if x >= 60 else f"{x:.1f} s"


def format_plan(plan: dict) -> str:
    """The readable table printed by `stage=plan`."""
    c, t, m = plan["config"], plan["totals"], plan["memory"]
    lines = [f"spectro plan: {c['model']}, {t['components']} components (full included), {c['num_chains']} chains "
             f"in groups of {c['chain_group']}{' (antithetic pairs)' if c['antithetic'] else ''}, "
             f"{c['num_draws']} draws, {c['num_actors']} actors x {c['threads_per_actor']} threads", ""]
    rows = [("units (component x chain group x probe shard)", f"{t['units']:,}"),
            ("chain-draws", f"{t['chain_draws']:,}"),
            ("SGLD steps (per unit: burn-in + draws x steps between)", f"{t['sgld_steps']:,} "
             f"({t['chain_steps']:,} chain-steps)"),
            ("chain evaluations (sampling set + probe set)",
             f"{t['evaluations']:,} x {t['probe_tokens']:,} probe tokens" if t["probe_shards"] == 1 else
             f"{t['evaluations']:,} x a shard's ~{t['probe_tokens'] / t['probe_shards']:,.0f} probe tokens "
             f"({t['probe_shards']} shards)"),
            ("FLOPs: SGLD steps", f"{t['flops_steps'] / 1e12:,.2f} TFLOP"),
            ("FLOPs: evaluations", f"{t['flops_evals'] / 1e12:,.2f} TFLOP"),
            ("FLOPs: lower-layer caches", f"{t['flops_cache'] / 1e12:,.2f} TFLOP"),
            ("FLOPs: total", f"{t['flops'] / 1e12:,.2f} TFLOP")]
    for name, a in plan["store"]["arrays"].items():
        if a["bytes"] >= 1000 or name in ("probe_loss", "moment_phiD"):
            rows.append((f"store {name} {tuple(a['shape'])} {a['dtype']}", _b(a["bytes"])))
    for mode, st in plan["stores"].items():
        mark = " (this run)" if mode == plan["store"]["mode"] else ""
        rows += [(f"store, store.probe={mode}{mark} (logical, all arrays)", _b(st["bytes"])),
                 (f"checkpoints, store.probe={mode}{mark}", _b(st["checkpoint_bytes"]))]
    rows.append((f"peak memory per actor (largest unit: {m['component']})", _b(m["peak_bytes"])))
    if "rounds" in plan:
        rows.append(("sampling until reliable (sampler.until)", f"rounds of {plan['rounds']['round_draws']} draws, at "
                     f"most {plan['rounds']['max_rounds']}: the counts and times here are the whole draw budget; "
                     f"the draws the target needs are predicted after round 1 (rounds.json)"))
        pilot = plan["rounds"].get("pilot")
        if pilot:
            need = pilot["predicted_draws"]
            rows.append(("pilot: round 1 sampled and estimated",
                         f"feature reliability median {pilot['reliability_median']} (min {pilot['reliability_min']}), "
                         f"R-hat max {pilot['rhat_max']} after "
                         f"{pilot['draws']} draws ({pilot['seconds']:.0f} s): "
                         + ("targets met" if pilot["met"] else "draws needed unknown" if need is None else
                            f"about {need} draws ({pilot['predicted_rounds']} rounds)"
                            + ("" if pilot["within_budget"] else ", beyond sampler.num_draws"))))
    if "cpu" in plan:
        cpu = plan["cpu"]
        r = cpu["rates"]
        rows += [("calibration (this process)", ", ".join(
            f"{n}: step {v['step_s'] * 1e3:,.0f} ms, eval {v['eval_s'] * 1e3:,.0f} ms, setup {v['setup_s']:.2f} s"
            for n, v in cpu["calibration"].items())),
            ("fitted rates", f"steps {r['step_flops_per_s'] / 1e9:.1f} GFLOP/s, evaluations "
                             f"{r['eval_flops_per_s'] / 1e9:.1f} GFLOP/s per actor"),
            (f"predicted sampling wall time, this machine ({cpu['cores']} cores, "
             f"{cpu['other_load_cores']:.1f} busy with other work)", _s(cpu["predicted_wall_s"]))]
    if "gpu" in plan:
        g = plan["gpu"]
        rows.append((f"predicted sampling wall time, {g['actors']} x {g['name']} (model, unvalidated)",
                     _s(g["predicted_wall_s"]) + ("" if g["fits_memory"] else " (does not fit its memory)")))
    width = max(len(k) for k, _ in rows)
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def run_plan(config, run_dir, prepared=None) -> dict:
    """`stage=plan`: make the plan, write `plan.json` into `run_dir`, print the table; returns the plan."""
    plan = make_plan(config, prepared)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "plan.json").write_text(json.dumps(plan, indent=2, default=float))
    print(format_plan(plan))
    print(f"\nplan written to {run_dir / 'plan.json'}")
    return plan
