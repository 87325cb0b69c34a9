"""Workload W1: spectro vs devinterp 2.0.1 on identical work, end to end.

    python benchmarks/bench_w1.py [--repeats 3] [--quick] [--skip-peer] [--draws 50]
                                  [--variants float32,bfloat16] [--chain-group 1]

W1: a GPT-NeoX with 4 layers, d_model 128, 4 heads, vocab 4096, context 64,
random init with seed 0 (normal(0, 0.02) matrices and embeddings, zero biases,
unit LayerNorm gains, drawn from a torch.Generator); restrictions full + l0h0 +
l1h1 + l2.mlp + l3h3; 4 chains x 50 draws, SGLD minibatch 16, 1 step between
draws, no burn-in, lr (step size) 1e-4, nβ 30, localization γ = 100 for both
(devinterp's default is 0, spectro's 300: 100 is a neutral choice that keeps
the chains local); a fixed sampling-task observable of 32 sequences and 64
probe contexts (4,032 probe tokens). The data are windows of the embedded
corpus tokenized with the embedded model's 4096-token BPE (the same tensors go
to both tools).

Timed: devinterp's `susceptibilities(...)` call (it samples every chain of
every restriction one after another in this process, then reduces); spectro's
`pipeline.run(stage=sample, then susceptibilities)` (starts a private Ray
instance, 2 sampler actors, Zarr store, Ray Data covariance job, shuts Ray
down). Data preparation is outside both timings. spectro runs once per
variant (`sampler.probe_dtype`: float32, the default, and bfloat16 observables,
whose effect on chi benchmarks/bench_precision.py measures); the tools
alternate, repeat by repeat, and the script prints the medians and their
ratios. Chain group 1 (20 units of one chain for 2 actors) balances the
actors best; a unit's cost per chain-draw does not depend on its chain group
on this CPU (measured 1, 2, 4).

Arithmetic floor: the FLOPs each tool's work needs (counted from the shapes as
in bench_w2.py: `common.unit_flops`; spectro with its lower-layer cache, devinterp without) over
2 cores x the dense matmul rate measured in this run (fp32; bf16 for
spectro's bfloat16 evaluations). No implementation of the same arithmetic can
beat it on this machine.

Agreement: the chi of the last repeat of each, token by token, per component:
Pearson correlation and z = (chi_spectro - chi_peer) / (sqrt(2) * se_spectro),
with se_spectro spectro's standard error over chains (both estimates come from
the same sampler with the same number of chains, so their errors have about
the same size). devinterp's `init_loss` is the mean loss over 32 minibatches of
the SGLD pool, spectro's is the sampling set's loss at w*; phi therefore
differs by a constant c, which shifts the peer's chi by c * (E_C[D] - E_full[D]).
The script reports the raw agreement and the agreement after removing that
shift (computed from devinterp's own stored samples).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from common import (W1_COMPONENTS, W1_GAMMA, dense_sampled, matmul_rate, unit_flops, w1_config,  # noqa: E402
                    write_w1_checkpoint)


def run_spectro(prepared, run_dir: Path) -> tuple[float, np.ndarray, np.ndarray, list[str]]:
    import dataclasses

    from spectro import pipeline
    from spectro.store import read_susceptibilities

    cfg = prepared.config
    t0 = time.perf_counter()
    pipeline.run(cfg, run_dir, prepared)
    pipeline.run(dataclasses.replace(cfg, stage="susceptibilities"), run_dir)
    wall = time.perf_counter() - t0
    ds = read_susceptibilities(run_dir / "susceptibilities.zarr")
    comps = [str(c) for c in ds["component"].values]
    return wall, ds["chi"].values, ds["chi_se"].values, comps


def run_peer(prepared, out_dir: Path, independent_batches: bool = False) -> tuple[float, dict[str, np.ndarray], dict]:
    """devinterp's susceptibilities on the same model, data and hyperparameters.

    `independent_batches`: each chain draws its own minibatch sequence (devinterp's
    `match_sampling_input_ids_across_chains=False`; its default shares one sequence
    across chains, which correlates the chains). spectro's chains are always independent."""
    import copy

    from datasets import Dataset
    from devinterp.slt.susceptibilities import susceptibilities

    problem = prepared.problem
    model = copy.deepcopy(problem.model)
    model.config._attn_implementation = "sdpa"        # the peer's natural (faster) attention path
    model.requires_grad_(True)
    masks = {"full": None}
    for comp in prepared.components:
        if comp.name != "full":
            masks[comp.name] = dict(comp.masks)

    def ds(ids: torch.Tensor):
        return Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")

    observables = {"pretrain": (ds(problem.sampling_ids), 2), "probe": (ds(problem.probe_ids), 4)}
    pool = ds(problem.train_ids)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tree = susceptibilities(model, pool, observables, masks, sampling_task="pretrain", lr=1e-4, n_beta=30.0,
                                localization=W1_GAMMA, num_chains=4, num_draws=prepared.config.sampler.num_draws,
                                batch_size=16, num_burnin_steps=0, num_steps_bw_draws=1, device="cpu",
                                output_path=out_dir / "samples.zarr",
                                match_sampling_input_ids_across_chains=not independent_batches)
    wall = time.perf_counter() - t0
    return wall, tree, masks


def peer_chi(tree, prepared, out_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """devinterp's chi in spectro's (token, component) order, raw and with the init_loss shift removed."""
    import xarray as xr

    problem = prepared.problem
    sus = tree["susceptibilities"]
    ctx_ids = tree["context"]["input_ids"].values
    n_ctx, seq = problem.probe_ids.shape
    rows = ctx_ids.reshape(n_ctx, seq)
    where = {tuple(r): i for i, r in enumerate(problem.probe_ids.numpy().tolist())}
    order = np.array([where[tuple(r)] for r in rows.tolist()])          # peer batch row -> our context
    names = [c.name for c in prepared.components if c.name != "full"]
    raw = np.zeros((n_ctx * (seq - 1), len(names)))
    shift = np.zeros_like(raw)
    full = xr.open_datatree(str(out_dir / "samples_full.zarr"), engine="zarr", consolidated=False).dataset
    d_full = full["loss_pretrain"].values.mean(axis=(2, 3))[:, :, None, None] - full["loss_probe"].values
    c = problem.init_loss - float(full["init_loss"].values.mean())
    for k, name in enumerate(names):
        chi = sus["sus"].sel(wr=name).values.reshape(n_ctx, seq - 1)
        ours = np.empty_like(chi)
        ours[order] = chi
        raw[:, k] = ours.reshape(-1)
        wr = xr.open_datatree(str(out_dir / f"samples_{name}.zarr"), engine="zarr", consolidated=False).dataset
        d_c = wr["loss_pretrain"].values.mean(axis=(2, 3))[:, :, None, None] - wr["loss_probe"].values
        s = c * (d_c.mean(axis=(0, 1)) - d_full.mean(axis=(0, 1)))              # (batch, pos)
        tmp = np.empty_like(s)
        tmp[order] = s
        shift[:, k] = tmp.reshape(-1)
    return raw, raw - shift      # chi_peer = chi_ours(same samples) + c (E_C[D] - E_full[D])


def agreement(ours: np.ndarray, se: np.ndarray, theirs: np.ndarray, names: list[str]) -> None:
    print("| component | corr(chi_spectro, chi_peer) | median abs z | frac abs z > 2 | frac abs z > 3 |")
    print("|---|---|---|---|---|")
    for k, name in enumerate(names):
        a, b, s = ours[:, k], theirs[:, k], se[:, k]
        z = (a - b) / (np.sqrt(2) * s)
        r = np.corrcoef(a, b)[0, 1]
        print(f"| {name} | {r:.3f} | {np.median(np.abs(z)):.2f} | {np.mean(np.abs(z) > 2):.3f} | "
              f"{np.mean(np.abs(z) > 3):.3f} |")
    z = (ours - theirs) / (np.sqrt(2) * se)
    print(f"all entries: corr {np.corrcoef(ours.ravel(), theirs.ravel())[0, 1]:.3f}, "
          f"median |z| {np.median(np.abs(z)):.2f} (|t| with 3 dof: median 0.76), "
          f"frac |z| > 2 {np.mean(np.abs(z) > 2):.3f} (t3: 0.139), frac |z| > 3 {np.mean(np.abs(z) > 3):.3f} (t3: 0.058)")


def report_agreement(last: dict) -> None:
    chi, se, comps = last["spectro"]
    names = [c for c in comps if c != "full"]
    idx = [comps.index(n) for n in names]
    raw, adjusted = last["devinterp"]
    print("\nAgreement (this repeat), raw peer chi:")
    agreement(chi[:, idx], se[:, idx], raw, names)
    print("\nAgreement (this repeat), peer chi with its init_loss shift removed:")
    agreement(chi[:, idx], se[:, idx], adjusted, names)
    print(flush=True)


def arithmetic_floor(prepared, draws: int) -> None:
    """FLOPs of W1 for each tool and the time they need at 2 cores x the measured matmul rate."""
    problem, cfg = prepared.problem, prepared.config.sampler
    seq = problem.probe_ids.shape[1]
    eval_tokens = problem.probe_ids.numel() + problem.sampling_ids.numel()
    step_tokens = cfg.batch_size * seq
    chain_draws = cfg.num_chains * draws
    torch.set_num_threads(1)
    rates = {"float32": matmul_rate(torch.float32), "bfloat16": matmul_rate(torch.bfloat16)}
    torch.set_num_threads(2)
    ours = {"step": 0.0, "eval": 0.0}
    peer = {"step": 0.0, "eval": 0.0}
    for comp in prepared.components:
        start = comp.layer if comp.layer >= 1 else 0        # spectro's cache: components in layers >= 1
        for total, s in ((ours, start), (peer, 0)):
            f = unit_flops(problem.model.config, seq, s, comp.layer, dense_sampled(comp, problem.model.config),
                           step_tokens, eval_tokens)
            total["step"] += chain_draws * f["step"]
            total["eval"] += chain_draws * f["eval"]
    two = 2.0
    peer_s = (peer["step"] + peer["eval"]) / (two * rates["float32"])
    ours_fp32 = (ours["step"] + ours["eval"]) / (two * rates["float32"])
    ours_bf16 = ours["step"] / (two * rates["float32"]) + ours["eval"] / (two * rates["bfloat16"])
    print(f"matmul rate per core: fp32 {rates['float32'] / 1e9:.1f} GFLOP/s, bf16 {rates['bfloat16'] / 1e9:.1f} GFLOP/s")
    print(f"arithmetic floor on 2 cores at 100% of that rate: devinterp's work {peer_s:.0f} s "
          f"({(peer['step'] + peer['eval']) / 1e12:.1f} TFLOP); spectro's work {ours_fp32:.0f} s fp32 "
          f"({(ours['step'] + ours['eval']) / 1e12:.1f} TFLOP), {ours_bf16:.0f} s with bf16 evaluations", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one repeat of 5 draws per chain (a smoke check)")
    ap.add_argument("--draws", type=int, default=50)
    ap.add_argument("--skip-peer", action="store_true", help="time spectro only")
    ap.add_argument("--chain-group", type=int, default=1)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--variants", default="float32,bfloat16",
                    help="spectro's sampler.probe_dtype values to time, comma-separated")
    ap.add_argument("--components", default=",".join(W1_COMPONENTS),
                    help="restrictions besides full (default: W1's four), comma-separated")
    ap.add_argument("--seed-baseline", action="store_true",
                    help="also run spectro (first variant) with run seed 1 and print seed 0 vs seed 1 agreement: "
                         "what two independent runs of one sampler look like under the same z-scores")
    ap.add_argument("--peer-independent-batches", action="store_true",
                    help="devinterp with match_sampling_input_ids_across_chains=False (an agreement check, not W1)")
    args = ap.parse_args()
    repeats, draws = (1, 5) if args.quick else (args.repeats, args.draws)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in ("float32", "bfloat16")]
    if bad or not variants:
        ap.error(f"--variants takes float32 and/or bfloat16, got {args.variants!r}")

    from spectro import pipeline

    work = Path(tempfile.mkdtemp(prefix="w1-"))
    try:
        model_dir = write_w1_checkpoint(work / "model")
        comps = tuple(c.strip() for c in args.components.split(",") if c.strip())
        prepared = {v: pipeline.prepare(w1_config(model_dir, args.chain_group, args.actors, draws, probe_dtype=v,
                                                  components=comps))
                    for v in variants}
        first = prepared[variants[0]]
        print(f"W1: init loss {first.problem.init_loss:.4f}, probe tokens {first.probe.n_tokens}, "
              f"torch threads (driver/peer) {torch.get_num_threads()}, chain group {args.chain_group}, "
              f"{args.actors} actors", flush=True)
        arithmetic_floor(first, draws)
        tools = [f"spectro {v}" for v in variants] + ([] if args.skip_peer else ["devinterp"])
        times: dict[str, list[float]] = {t: [] for t in tools}
        last = {}
        for rep in range(repeats):
            for tool in tools:
                d = work / f"{tool.replace(' ', '-')}-{rep}"
                d.mkdir()
                if tool.startswith("spectro"):
                    wall, chi, se, comps = run_spectro(prepared[tool.split()[1]], d)
                    last[tool] = (chi, se, comps)
                else:
                    wall, tree, _ = run_peer(first, d, args.peer_independent_batches)
                    last["devinterp"] = peer_chi(tree, first, d)
                times[tool].append(wall)
                print(f"repeat {rep} {tool}: {wall:.1f} s", flush=True)
            if "devinterp" in last:
                for v in variants:
                    print(f"\n=== spectro {v} vs devinterp")
                    report_agreement({"spectro": last[f"spectro {v}"], "devinterp": last["devinterp"]})
        if args.seed_baseline:
            v = variants[0]
            base = pipeline.prepare(w1_config(model_dir, args.chain_group, args.actors, draws, probe_dtype=v,
                                              components=comps, seed=1))
            d = work / "spectro-seed1"
            d.mkdir()
            wall, chi1, se1, comps1 = run_spectro(base, d)
            chi0, se0, comps0 = last[f"spectro {v}"]
            names = [c for c in comps0 if c != "full"]
            idx = [comps0.index(n) for n in names]
            print(f"\n=== spectro {v} seed 0 vs seed 1 ({wall:.1f} s): the same z = (a - b) / (sqrt(2) se_a)")
            agreement(chi0[:, idx], se0[:, idx], chi1[:, [comps1.index(n) for n in names]], names)
        print()
        print("| tool | median wall (s) | runs |")
        print("|---|---|---|")
        for tool, ts in times.items():
            print(f"| {tool} | {statistics.median(ts):.1f} | {', '.join(f'{t:.1f}' for t in ts)} |")
        if times.get("devinterp"):
            for v in variants:
                ratio = statistics.median(times["devinterp"]) / statistics.median(times[f"spectro {v}"])
                print(f"devinterp / spectro {v} (ratio of medians): {ratio:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
