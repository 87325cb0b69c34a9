"""When probe sharding (`sampler.probe_shards=S`) pays: the share of a draw spent evaluating the probe set.

    python benchmarks/bench_shards.py [--repeats 5] [--skip-pythia14m]

A draw of a unit is `steps_between_draws` SGLD steps of its chain group plus, per chain, one evaluation of the
sampling set (for divergence and sampling_loss) and one of the probe set. With S shards every shard unit
repeats the steps and the sampling-set evaluation and evaluates 1/S of the probe set, so with p = the probe
evaluations' share of a draw:

    a unit's time      (1 - p) + p / S      of the unsharded unit's (what a chain group's latency becomes)
    the run's work     S (1 - p) + p        of the unsharded run's (what the actors spend in all)

Sharding pays when there are idle actors (fewer chain-group units than actors, e.g. few components, many GPUs)
and p is close to 1: the unit's latency falls towards (1 - p) while the extra work stays S (1 - p).

Measured (one torch thread, CPU seconds of this process, median of --repeats, component `full` and a
mid-layer head with the lower-layer cache):
- the embedded default model with the default config (data and sampler defaults of spectro.config);
- the Pythia-14M shape (6 layers, d_model 128, 4 heads, vocabulary 50,304, random weights) with the
  `experiment=pythia14m` counts (seq 512, 256 sampling and 2,048 probe contexts, 8 chains, minibatch 64, 5
  steps between draws): the steps and evaluations are timed on fewer rows (2 chains x 4 contexts a step,
  8 probe contexts) and scaled per token to the preset's counts.
By FLOP count per draw (the plan's FLOP model, `spectro.plan.work.unit_work`; burn-in excluded): both of
those and a 1.4B Pythia shape (24 layers, d_model 2048, 16 heads, MLP 8192, vocabulary 50,304; seq 2,048,
2,076 probe contexts = 4.25M probe tokens, 4 chains x 100 draws, minibatch 16, 5 steps between draws, 64
sampling contexts).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

CLOCK = time.process_time
SHARDS = (2, 4, 8)


def timed(fn, repeats: int) -> float:
    fn()                                                             # warm-up
    out = []
    for _ in range(repeats):
        t0 = CLOCK()
        fn()
        out.append(CLOCK() - t0)
    return statistics.median(out)


def measure(problem, component, sampler, repeats: int, chains: int) -> dict:
    """Seconds of one SGLD step (`chains` chains), and of one chain's sampling-set and probe-set evaluation."""
    from spectro.device import eval_autocast
    from spectro.sampling import UnitRunner

    runner = UnitRunner(problem, component, tuple(range(chains)), sampler, 0)
    state = runner.start()
    params = {n: p[0] for n, p in state.sgld.params.items()}

    def evaluate(which):
        with eval_autocast(problem.device, sampler.probe_dtype):
            runner._per_token(params, which)

    return {"step": timed(lambda: runner._step(state.sgld, state, state.diverged_at), repeats),
            "sampling": timed(lambda: evaluate("sampling"), repeats),
            "probe": timed(lambda: evaluate("probe"), repeats)}


def draw_share(step_s: float, sampling_s: float, probe_s: float, steps_between: int, chains: int) -> float:
    """p: the probe evaluations' share of one draw of a chain group."""
    probe = chains * probe_s
    return probe / (steps_between * step_s + chains * sampling_s + probe)


def flop_share(component, config, shape) -> float:
    from spectro.plan.work import unit_work

    s = config.sampler
    g = min(s.chain_group, s.num_chains)
    w = unit_work(component, g, config, shape)
    probe = w["flops_probe_evals"] / s.num_draws                      # per draw; burn-in excluded, as timed
    return probe / (s.steps_between_draws * w["flops_per_step"] + g * w["flops_per_eval"])


def line(label: str, p: float) -> str:
    cells = ", ".join(f"S={S}: unit {(1 - p) + p / S:.2f}, work {S * (1 - p) + p:.2f}" for S in SHARDS)
    return f"  {label:<58} p = {p:6.1%}   {cells}"


def embedded(repeats: int) -> None:
    from spectro import pipeline
    from spectro.config import to_config
    from spectro.plan.work import Shape

    config = to_config({"components": ["l2h1"], "device": "cpu"})
    p = pipeline.prepare(config)
    s, shape = config.sampler, Shape.of(p.loaded.model, config.data.seq_len)
    g = min(s.chain_group, s.num_chains)
    print(f"embedded default model (seq {config.data.seq_len}, {config.data.n_sampling_contexts} sampling and "
          f"{config.data.n_probe_contexts} probe contexts, chain group {g}, minibatch {s.batch_size}, "
          f"{s.steps_between_draws} steps between draws)")
    for comp in p.components:
        m = measure(p.problem, comp, s, repeats, g)
        print(f"  {comp.name}: step {m['step'] * 1e3:.1f} ms, sampling eval {m['sampling'] * 1e3:.1f} ms, "
              f"probe eval {m['probe'] * 1e3:.1f} ms (CPU seconds, one thread)")
        print(line(f"{comp.name}, measured time", draw_share(m["step"], m["sampling"], m["probe"],
                                                              s.steps_between_draws, g)))
        print(line(f"{comp.name}, FLOPs", flop_share(comp, config, shape)))


def pythia14m(repeats: int) -> None:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from spectro.components import resolve_components
    from spectro.config import to_config
    from spectro.plan.work import Shape
    from spectro.sampling import make_problem

    seq, n_samp, n_probe, chains, batch, between = 512, 256, 2048, 8, 64, 5
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=50304, hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
                        intermediate_size=512, rotary_pct=0.25, max_position_embeddings=2048,
                        use_parallel_residual=True, tie_word_embeddings=False, attn_implementation="eager")
    model = GPTNeoXForCausalLM(cfg).float().eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50304, (16 + 4 + 8, seq), generator=g)
    small = dict(n_train_contexts=16, n_sampling_contexts=4, n_probe_contexts=8)
    timing = to_config({"data": {"seq_len": seq, **small}, "device": "cpu",
                        "sampler": {"batch_size": 4, "num_chains": 2, "antithetic": False, "chain_group": 2}})
    problem = make_problem(model, ids[:16], ids[16:20], ids[20:28])
    preset = to_config({"data": {"seq_len": seq, "n_sampling_contexts": n_samp, "n_probe_contexts": n_probe,
                                 "n_train_contexts": 20000},
                        "sampler": {"num_chains": chains, "chain_group": chains, "batch_size": batch,
                                    "steps_between_draws": between, "num_draws": 200, "burnin": 200}})
    shape = Shape.of(model, seq)
    print(f"Pythia-14M shape, experiment=pythia14m counts (seq {seq}, {n_samp} sampling and {n_probe} probe "
          f"contexts, chain group {chains}, minibatch {batch}, {between} steps between draws)")
    for comp in resolve_components(model, ["full", "l3h1"]):
        m = measure(problem, comp, timing.sampler, repeats, 2)
        step = m["step"] * (chains * batch) / (2 * 4)               # per minibatch context, scaled to the preset
        samp, probe = m["sampling"] * n_samp / 4, m["probe"] * n_probe / 8
        print(f"  {comp.name}: step {step:.1f} s, sampling eval {samp:.1f} s, probe eval {probe:.1f} s "
              f"(scaled from {m['step'] * 1e3:.0f} / {m['sampling'] * 1e3:.0f} / {m['probe'] * 1e3:.0f} ms)")
        print(line(f"{comp.name}, measured time (scaled)", draw_share(step, samp, probe, between, chains)))
        print(line(f"{comp.name}, FLOPs", flop_share(comp, preset, shape)))


def pythia1b4() -> None:
    from spectro.config import to_config
    from spectro.plan.work import Shape

    H, I, V, L, heads, seq = 2048, 8192, 50304, 24, 16, 2048
    n_probe = 2076                                                    # x 2047 = 4,249,572 probe tokens
    params = L * (4 * H * H + 4 * H + 2 * H * I + I + H + 4 * H) + 2 * V * H + 2 * H
    shape = Shape(H, I, V, L, heads, seq, params)
    config = to_config({"data": {"seq_len": seq, "n_sampling_contexts": 64, "n_probe_contexts": n_probe,
                                 "n_train_contexts": 20000},
                        "sampler": {"num_chains": 4, "chain_group": 4, "num_draws": 100, "batch_size": 16,
                                    "steps_between_draws": 5, "burnin": 0}})
    print(f"Pythia-1.4B shape by FLOPs ({L} layers, d_model {H}, {heads} heads, vocabulary {V}, {params / 1e9:.2f}B "
          f"parameters; seq {seq}, {n_probe * (seq - 1):,} probe tokens, 4 chains x 100 draws, minibatch 16, "
          f"5 steps between draws, 64 sampling contexts)")
    full = SimpleNamespace(name="full", layer=0, n_parameters=params, shapes={"all": (params,)},
                           masks={"gpt_neox.embed_in.weight": None})
    head = SimpleNamespace(name="l12h3", layer=12, n_parameters=4 * H * H // heads, shapes={"qkv": (3 * H, H)},
                           masks={})
    for comp in (full, head):
        print(line(f"{comp.name}, FLOPs", flop_share(comp, config, shape)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-pythia14m", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("p = probe evaluations' share of a draw; unit = a shard unit's time / the unsharded unit's; "
          "work = the run's total / unsharded\n")
    embedded(args.repeats)
    if not args.skip_pythia14m:
        print()
        pythia14m(args.repeats)
    print()
    pythia1b4()


if __name__ == "__main__":
    main()
