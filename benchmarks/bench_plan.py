"""The cost plan's predicted sampling time against measured runs.

    python benchmarks/bench_plan.py --default-runs RUN_DIR [RUN_DIR ...] [--repeats 2] [--tokenizer PATH]

Two checks, each a plan (`spectro.plan.make_plan`, calibrated in this process on a few steps and evaluations
of `full` and one other component) against the sampling stage's measured wall time (`summary.json`
`sample.seconds`, which starts with the actors and ends with the last unit):

1. the embedded default (`python jobs/run.py`, 22 components + full, 4 chains x 40 draws, 2 actors): the
   measured times are read from finished runs of that config (`--default-runs`, their config.json must match
   the current default's sampler, data, components and actors, else the run is skipped and says why);
2. a reduced run in the Pythia-14M shape (W2's model, `common.write_pythia14m_checkpoint`: random weights
   under the hub's key names, the real GPT-NeoX-20B tokenizer, `--tokenizer`): 3 components + full, 2 chains
   x 8 draws, run `--repeats` times through the real service here.

It also predicts run 2 from the rates fitted on config 1 (no timing of the Pythia shape at all): how far the
FLOP model carries a calibration across models. Prints medians and predicted / measured ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spectro import pipeline  # noqa: E402
from spectro.config import as_dict, to_config  # noqa: E402
from spectro.plan import (ACTOR_START_S, CpuLoad, load_stretch, make_plan, other_demand, schedule,  # noqa: E402
                          unit_seconds_cpu)

from common import TOKENIZER, write_pythia14m_checkpoint  # noqa: E402

SAME = ("sampler", "data", "components", "model")


def pythia_config(model_dir: Path):
    return to_config({
        "model": {"source": str(model_dir)},
        "components": ["l1h2", "l4.mlp", "unembed"],
        "stage": "sample",
        "data": {"seq_len": 65, "n_train_contexts": 256, "n_sampling_contexts": 16, "n_probe_contexts": 32},
        "sampler": {"step_size": 1e-4, "batch_size": 16, "num_chains": 2, "chain_group": 2, "antithetic": False,
                    "num_draws": 8, "burnin": 4, "steps_between_draws": 2, "checkpoint_every": 4},
        "ray": {"num_actors": 2, "num_cpus_per_actor": 1},
    })


def _cost(key: str, value):
    """The part of a config section that sets the cost: everything but the seeds."""
    return {k: v for k, v in value.items() if k != "seed"} if isinstance(value, dict) else value


def measured_default(run_dirs: list[str], config) -> list[float]:
    want = as_dict(config)
    out = []
    for d in run_dirs:
        d = Path(d)
        try:
            got = json.loads((d / "config.json").read_text())
            seconds = json.loads((d / "summary.json").read_text())["sample"]["seconds"]
        except (OSError, KeyError, ValueError) as exc:
            print(f"  {d}: skipped ({type(exc).__name__}: {exc})")
            continue
        differ = [k for k in SAME if _cost(k, got.get(k)) != _cost(k, want[k])]
        if got.get("ray", {}).get("num_actors") != config.ray.num_actors:
            differ.append("ray.num_actors")
        if differ:
            print(f"  {d}: skipped (its config differs in {', '.join(differ)})")
            continue
        print(f"  {d}: sample.seconds {seconds:.1f}")
        out.append(float(seconds))
    return out


class OtherLoad:
    """Cores other processes wanted while the block ran (`spectro.plan.other_demand`): the machine's busy time
    (/proc/stat) against the CPU time of this process and its descendants (Ray's processes and actors, polled
    every 0.5 s), which want `threads` cores (the actors' threads)."""

    def __init__(self, threads: float):
        self.threads = threads

    def __enter__(self):
        import psutil
        import threading

        self.me = psutil.Process()
        self.seen: dict[int, float] = {}
        self.stop = threading.Event()
        self.start = CpuLoad._busy()
        self.own0 = self._tree()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _tree(self) -> float:
        import psutil

        for p in [self.me] + self.me.children(recursive=True):
            try:
                t = p.cpu_times()
                self.seen[p.pid] = t.user + t.system
            except psutil.Error:
                pass
        return sum(self.seen.values())

    def _poll(self):
        while not self.stop.wait(0.5):
            self._tree()

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        end = CpuLoad._busy()
        wall = end[1] - self.start[1]
        own = (self._tree() - self.own0) / wall
        self.cores = other_demand(os.cpu_count() or 1, (end[0] - self.start[0]) / wall, own, self.threads)
        return False


def cross_predict(plan_to: dict, rates: dict, config) -> float:
    """Wall time of `plan_to`'s units from rates fitted on another config (no component of its own timed)."""
    per_unit = [unit_seconds_cpu(u, rates, {}, config)["total"] * plan_to["cpu"]["stretch"] for u in plan_to["units"]]
    return schedule(per_unit, config.ray.num_actors, ACTOR_START_S)


def with_load(plan: dict, config, other_cores: float) -> float:
    """The plan's wall time for a run during which other processes want `other_cores` cores (same calibration)."""
    c = plan["cpu"]
    scale = load_stretch(config, c["other_load_cores"], c["cores"], other_in_run=other_cores) / c["stretch"]
    return schedule([u["predicted_s"] * scale for u in plan["units"]], config.ray.num_actors, ACTOR_START_S)


def line(label: str, predicted: float, measured: list[float]) -> str:
    if not measured:
        return f"| {label} | {predicted:,.1f} | (no measured run) | |"
    med = statistics.median(measured)
    runs = ", ".join(f"{m:,.1f}" for m in measured)
    return f"| {label} | {predicted:,.1f} | {med:,.1f} ({runs}) | {predicted / med:.2f} |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--default-runs", nargs="*", default=[], help="finished runs of the default config")
    ap.add_argument("--repeats", type=int, default=2, help="measured runs of the Pythia-shape config")
    ap.add_argument("--tokenizer", default=str(TOKENIZER), help="the GPT-NeoX-20B tokenizer.json")
    ap.add_argument("--skip-pythia", action="store_true")
    args = ap.parse_args()

    rows = []
    print("1. the embedded default")
    default = to_config({})
    t0 = time.perf_counter()
    plan_d = make_plan(default)
    print(f"  plan: {plan_d['cpu']['calibration_seconds']:.1f} s of calibration, {time.perf_counter() - t0:.1f} s "
          f"in all; rates {json.dumps({k: v for k, v in plan_d['cpu']['rates'].items()})}")
    rows.append(line("embedded default (22 components + full, 4 chains x 40 draws)",
                     plan_d["cpu"]["predicted_wall_s"], measured_default(args.default_runs, default)))

    if not args.skip_pythia:
        print("2. the Pythia-14M shape, reduced")
        with tempfile.TemporaryDirectory(prefix="plan-") as work:
            model_dir = write_pythia14m_checkpoint(Path(work) / "pythia14m", Path(args.tokenizer))
            config = pythia_config(model_dir)
            prepared = pipeline.prepare(config)
            plan_p = make_plan(config, prepared)
            print(f"  plan: {plan_p['cpu']['calibration_seconds']:.1f} s of calibration; "
                  f"predicted {plan_p['cpu']['predicted_wall_s']:.1f} s")
            cross = cross_predict(plan_p, plan_d["cpu"]["rates"], config)
            measured, in_load = [], []
            for i in range(args.repeats):
                with OtherLoad(config.ray.num_actors * config.ray.num_cpus_per_actor) as load:
                    out = pipeline.run(config, Path(work) / f"run{i}", prepared)
                measured.append(float(out["sample"]["seconds"]))
                in_load.append(with_load(plan_p, config, load.cores))
                print(f"  run {i}: sample.seconds {measured[-1]:.1f}; other processes kept {load.cores:.2f} cores "
                      f"busy (planned with {plan_p['cpu']['other_load_cores']:.2f}): predicted with that load "
                      f"{in_load[-1]:.1f} s", flush=True)
        rows.append(line("Pythia-14M shape (3 components + full, 2 chains x 8 draws), own calibration",
                         plan_p["cpu"]["predicted_wall_s"], measured))
        rows.append(line("the same, with the other load measured during each run",
                         statistics.median(in_load), measured))
        rows.append(line("the same, from the embedded default's rates", cross, measured))

    print("\n| config | predicted (s) | measured median (s) (runs) | predicted / measured |")
    print("|---|---|---|---|")
    for r in rows:
        print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
