"""Workload W2 and FLOP accounting: the Pythia-14M shape through the service.

    python benchmarks/bench_w2.py [--draws 20] [--components all] [--actors 2] [--skip-service]
                                  [--skip-hot-paths] [--tokenizer /path/to/gpt-neox-20b/tokenizer.json]

W2: the Pythia-14M architecture (random fp16 weights under the hub's key names:
normal(0, 0.02) matrices and embeddings, zero biases, unit LayerNorm gains;
the real GPT-NeoX-20B tokenizer given by --tokenizer, which is not part of the
repository; written to a temp dir by `common.write_pythia14m_checkpoint`),
all 32 components + full, 2 chains x 20 draws (chain group 2), SGLD minibatch
16, no burn-in, 1 step between draws, step 1e-4, nβ 30, γ 100; 32 sampling
contexts and 32 probe contexts of 65 tokens = 2,048 probe tokens; the data are
windows of the embedded corpus. Reported: wall time of the sampling stage
(Ray start, actors, store and all), chain-draws/s, probe tokens/s, and the
peak RSS of every SamplerActor process (psutil, polled every 0.2 s).

FLOP accounting (same invocation, one torch thread, timed in CPU seconds of
the process so that other tenants of a shared machine do not count): the
dense matmul rate of one core (fp32
and bf16, (4096 x 128) @ (128 x 4096)-sized products, the unembedding's shape)
and, in-process on one thread, the two hot paths of a unit for a few
components of each workload's model: one SGLD step (4 chains vmapped, 16
contexts each) and one probe-set evaluation (one chain). FLOPs are counted from
the shapes (2 per multiply-add; `common.unit_flops`): per token and layer 2*(4H^2 + 2HI) for the
projections plus 4*S*H for attention scores and values (full S x S, as the
eager kernel computes it), 2*H*V for the head; backward = activation gradients
(same as the forward of the component's layer and those above it, head
included; none when only the head is sampled) plus 2 x (sampled parameters)
per token for the weight gradients, the token embedding's excepted (its
gradient is a scatter-add, not a matmul): counting the activation gradients
of the whole forward that ran would over-count components above layer 0 run
without the cache, and `unembed`, and counting the embedding's gradient as a
matmul would over-count `full` and `embed`. With the lower-layer cache a
component in layer L counts only layers L.. . Achieved FLOP/s / matmul rate is
the fraction of the machine's dense limit.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

# Hot paths and the matmul rate run on one torch thread and are timed in CPU seconds of this process
# (common.CLOCK): on a shared machine wall time measures the other tenants, CPU time measures the work.
from common import (CLOCK, TOKENIZER, dense_sampled, matmul_rate, unit_flops, w1_config,  # noqa: E402
                    write_pythia14m_checkpoint, write_w1_checkpoint)


# ---------------------------------------------------------------- the hot paths

def hot_paths(prepared, names: list[str], label: str, rates: dict, repeats: int = 3) -> list[str]:
    """One-thread timings of an SGLD step (4 chains) and a probe evaluation (1 chain), vs the matmul rate."""
    from spectro.device import eval_autocast
    from spectro.sampling import UnitRunner

    problem, cfg = prepared.problem, prepared.config.sampler
    seq = problem.probe_ids.shape[1]
    rows = []
    for name in names:
        comp = problem.components(problem.model, [name])[0]
        for cache in (False, True):
            runner = UnitRunner(problem, comp, range(4), cfg, run_seed=0, cache_lower_layers=cache)
            if cache and not runner.cached:
                continue
            start = comp.layer if runner.cached else 0
            state = runner.start()
            active = state.diverged_at.copy()
            runner._step(state.sgld, state, active)                                  # warm-up
            t0 = CLOCK()
            for _ in range(repeats):
                runner._step(state.sgld, state, active)
            t_step = (CLOCK() - t0) / repeats
            params = {n: p[0] for n, p in state.sgld.params.items()}
            f = unit_flops(problem.model.config, seq, start, comp.layer, dense_sampled(comp, problem.model.config),
                           4 * cfg.batch_size * seq, problem.probe_ids.numel())
            line = (f"| {label} | {name} | {'cached from layer %d' % start if runner.cached else 'full forward'} | "
                    f"{t_step * 1e3:.0f} ms | {f['step'] / t_step / 1e9:.1f} | "
                    f"{f['step'] / t_step / rates['float32']:.0%} |")
            for dtype in ("float32", "bfloat16"):
                with eval_autocast(problem.device, dtype):
                    runner._per_token(params, "probe")
                    t0 = CLOCK()
                    for _ in range(repeats):
                        runner._per_token(params, "probe")
                    t_eval = (CLOCK() - t0) / repeats
                line += (f" {dtype[:4]}: {t_eval * 1e3:.0f} ms, {f['eval'] / t_eval / 1e9:.1f} GFLOP/s, "
                         f"{f['eval'] / t_eval / rates[dtype]:.0%} |")
            rows.append(line)
            print(line, flush=True)
    return rows


# ---------------------------------------------------------------- W2 through the service

def w2_config(model_dir: Path, components: list[str], draws: int, actors: int):
    from spectro.config import to_config

    return to_config({
        "model": {"source": str(model_dir)},
        "components": components,
        "stage": "sample",
        "data": {"seq_len": 65, "n_train_contexts": 512, "n_sampling_contexts": 32, "n_probe_contexts": 32},
        "sampler": {"step_size": 1e-4, "nbeta": 30.0, "gamma": 100.0, "batch_size": 16, "num_chains": 2,
                    "num_draws": draws, "burnin": 0, "steps_between_draws": 1, "chain_group": 2,
                    "checkpoint_every": draws, "seed": 0, "antithetic": False},
        "ray": {"num_actors": actors, "num_cpus_per_actor": 1},
    })


class ActorMemory:
    """Peak RSS of every SamplerActor process of this driver's Ray instance, polled in a thread."""

    def __init__(self, every_s: float = 0.2):
        self.peak: dict[int, int] = {}
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            me = os.getpid()
            for proc in psutil.process_iter(["pid", "ppid", "cmdline"]):
                try:
                    # only this run's actors: workers are children of the raylet this driver started
                    parent = psutil.Process(proc.info["ppid"]) if proc.info["ppid"] else None
                    ours = parent is not None and parent.ppid() == me
                    if ours and any("SamplerActor" in part for part in (proc.info["cmdline"] or [])):
                        rss = proc.memory_info().rss
                        self.peak[proc.pid] = max(self.peak.get(proc.pid, 0), rss)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self._stop.wait(self.every_s)

    def __enter__(self) -> "ActorMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--components", default="all", help="comma-separated names or 'all'")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--skip-service", action="store_true", help="FLOP accounting and hot paths only")
    ap.add_argument("--skip-hot-paths", action="store_true")
    ap.add_argument("--tokenizer", default=str(TOKENIZER), help="the GPT-NeoX-20B tokenizer.json")
    args = ap.parse_args()

    from spectro import pipeline

    work = Path(tempfile.mkdtemp(prefix="w2-"))
    model_dir = write_pythia14m_checkpoint(work / "pythia14m", Path(args.tokenizer))
    prepared = pipeline.prepare(w2_config(model_dir, args.components.split(","), args.draws, args.actors))
    problem = prepared.problem
    n_units = len(prepared.components)

    torch.set_num_threads(1)
    rates = {"float32": matmul_rate(torch.float32), "bfloat16": matmul_rate(torch.bfloat16)}
    print(f"matmul rate, 1 thread: fp32 {rates['float32'] / 1e9:.1f} GFLOP/s, bf16 {rates['bfloat16'] / 1e9:.1f} "
          f"GFLOP/s ({rates['bfloat16'] / rates['float32']:.1f}x)", flush=True)
    if not args.skip_hot_paths:
        print("\n| model | component | path | SGLD step (4 chains x 16 ctx) | GFLOP/s | of fp32 rate | "
              "probe eval fp32 | probe eval bf16 |")
        print("|---|---|---|---|---|---|---|---|")
        w1_prep = pipeline.prepare(w1_config(write_w1_checkpoint(work / "w1"), 4, 2, 50))
        hot_paths(w1_prep, ["full", "l1h1", "l3h3"], "W1", rates)
        hot_paths(prepared, ["full", "l2h1", "l5.mlp", "unembed"], "W2", rates)
    torch.set_num_threads(os.cpu_count() or 1)

    if args.skip_service:
        return
    chain_draws = n_units * 2 * args.draws
    with tempfile.TemporaryDirectory() as d, ActorMemory() as mem:
        t0 = time.perf_counter()
        out = pipeline.run(prepared.config, Path(d), prepared)
        wall = time.perf_counter() - t0
    seq = problem.probe_ids.shape[1]
    total = 0.0
    for comp in prepared.components:
        start = comp.layer if comp.layer >= 1 else 0
        f = unit_flops(problem.model.config, seq, start, comp.layer, dense_sampled(comp, problem.model.config),
                       2 * 16 * seq,
                       2 * (problem.sampling_ids.numel() + problem.probe_ids.numel()))
        total += args.draws * (f["step"] + f["eval"])
    print(f"\nW2: {n_units} units x 2 chains x {args.draws} draws = {chain_draws} chain-draws, "
          f"{args.actors} actors, probe tokens {problem.n_probe_tokens}")
    print(f"| wall (s) | chain-draws/s | probe tokens/s | peak RSS per actor (MB) | FLOPs (T) | achieved GFLOP/s | "
          f"of {args.actors} x fp32 rate |")
    print("|---|---|---|---|---|---|---|")
    peaks = ", ".join(f"{v / 2**20:,.0f}" for v in sorted(mem.peak.values()))
    print(f"| {wall:.1f} | {chain_draws / wall:.2f} | {chain_draws * problem.n_probe_tokens / wall:,.0f} | {peaks} | "
          f"{total / 1e12:.2f} | {total / wall / 1e9:.1f} | {total / wall / (args.actors * rates['float32']):.0%} |")
    print(f"sampler summary: {out['sample']['draws_per_second']} draws/s over {out['sample']['seconds']} s "
          f"(service time, excluding Ray start-up)")


if __name__ == "__main__":
    main()
