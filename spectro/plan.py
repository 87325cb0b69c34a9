"""`stage=plan`: what a run will cost, computed before it runs.

`python jobs/run.py stage=plan [overrides]` loads the model and data exactly
as a run would (`pipeline.prepare`, which writes nothing), then prints a
table and writes `plan.json` into the run directory; it samples nothing and
creates no store, checkpoint or summary. The plan holds:

- work: units (component x chain group, as `store.Layout.units` forms them
  for the service), chain-draws, SGLD steps (burn-in + draws x
  steps_between_draws per chain group), chain evaluations;
- FLOPs of the SGLD steps, of the draw-time evaluations and of building the
  lower-layer caches (model below);
- the sample store's logical (uncompressed) bytes per array, as
  `SampleStore._create` lays it out, the checkpoints' bytes, and what a
  per-chain float64 moments store would hold (not implemented yet);
- peak memory per actor (model below);
- predicted wall time of the sampling stage on this machine, from a few
  timed SGLD steps and evaluations of `full` and of one other component in
  this process (one actor's threads), and on a named GPU (`plan.gpu`).

FLOP model (the one `benchmarks/bench_w2.py` uses; per token, GPT-NeoX with
hidden H, MLP width I, vocabulary V, context T, n layers):

    fwd(s)   = (n - s) * (2 * (4 H^2 + 2 H I) + 4 T H) + 2 H V     layers s.. and the head
    step     = g B T * (fwd(start) + act(layer) + 2 * dense_sampled)
    eval     = (n_sampling + n_probe) * T * fwd(start)              per chain and draw
    cache    = (n_train + n_sampling + n_probe) * T * (fwd(0) - fwd(start))   per unit

`start` is the component's layer when the lower-layer cache applies (layer
>= 1: all but `full`, `embed` and layer 0's heads and MLP), else 0; `act(layer)` = fwd(layer) is the
activation gradient from the head down to the component's layer (0 for
`unembed`); `dense_sampled` is the number of sampled entries whose gradient
is a matmul (the token embedding's is a scatter-add and counts nothing). For
`full` this is 6 x params x tokens up to the attention term. g = chains in
the unit, B = `sampler.batch_size`.

Time model on this machine: per unit, `setup + steps * t_step + draws * g *
t_eval`, with t_step = step FLOPs / r + u * g * S (S = entries of the sampled
tensors: the update, its noise and norms stream every entry, masked or not)
and t_eval = eval FLOPs / r_e + v, fitted to the two calibrated components
(each of which is then predicted exactly as measured); units are dealt to
`ray.num_actors` actors in the service's order (an idle actor takes the next
unit), plus the actors' start. The calibration also measures how many cores
other processes want meanwhile (O, from /proc/stat: their busy cores, or,
when the calibration got less than its threads, the demand fair sharing
implies): with the machine's c cores shared fairly, the calibration ran at
min(1, c / (threads + O)) of a core's speed and each actor of a local run
will run at min(1, c / (actors x threads + O)); unit times are stretched by
that ratio.
So the prediction is for the machine as loaded while planning.

GPU model: FLOPs / (datasheet dense rate x EFFICIENCY) + the SGLD update's
memory traffic / (bandwidth x BW_EFFICIENCY) + one launch latency (LAUNCH_S)
per eager op. The ops are counted in the calibration (every aten op torch
dispatches in one step and one evaluation of each calibrated component;
other units from a fit per layer run and per sampled tensor), or without a
calibration taken from per-layer constants. The dtype is that of the run:
SGLD steps float32 (TF32 with `sampler.tf32`), evaluations float32 or bf16
(`sampler.probe_dtype`). Nothing here has been checked against a GPU run
(docs/performance.md).

Peak memory per actor: runtime (Python, torch, Ray) + model (float32) + the
fixed data (int64 ids) + for the largest unit: chain states (g x S float32,
three copies during an update: weights, new weights, gradients; RMSProp adds
two), the lower-layer cache, the activations autograd saves in a step
(g B T tokens x layers above `start` x (11 H + 2 I + 2 heads T) float32 + the
head's (128 x V) block per chain) or of one evaluation chunk, whichever is
larger, and the draws buffered for one store chunk.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

CE_ROWS = 128                  # token rows per chain per head block (spectro.observables.CE_ROWS)
BODY_ROWS = 4096               # token rows per evaluation chunk (spectro.observables.BODY_ROWS)
RUNTIME_BYTES = 400 << 20      # resident set of a process that imported torch, transformers, ray, zarr (measured)
GENERATOR_STATE_BYTES = 5056  # torch.Generator.get_state() of a CPU generator (Mersenne Twister), per stream and chain
ACTOR_START_S = 5.0            # ray.put of the payload and constructing the actors, before the first unit runs


@dataclass(frozen=True)
class GPU:
    """Datasheet figures (dense, no sparsity) of an SXM/PCIe part, TFLOP/s and TB/s."""
    name: str
    fp32: float
    tf32: float
    bf16: float
    bandwidth: float
    memory_gb: float


GPUS = {
    "h100": GPU("NVIDIA H100 SXM5 80GB", fp32=67.0, tf32=494.7, bf16=989.4, bandwidth=3.35, memory_gb=80),
    "h200": GPU("NVIDIA H200 SXM 141GB", fp32=67.0, tf32=494.7, bf16=989.4, bandwidth=4.8, memory_gb=141),
    "a100": GPU("NVIDIA A100 SXM4 80GB", fp32=19.5, tf32=156.0, bf16=312.0, bandwidth=2.039, memory_gb=80),
    "l4": GPU("NVIDIA L4 24GB", fp32=30.3, tf32=60.0, bf16=121.0, bandwidth=0.3, memory_gb=24),
}
EFFICIENCY = 0.35              # share of the dense datasheet rate our matmuls reach (docs/performance.md, "Cost plan")
BW_EFFICIENCY = 0.7            # share of the datasheet bandwidth an elementwise update streams at
LAUNCH_S = 10e-6               # per eager op: launch + PyTorch dispatch
OPS_PER_LAYER_FWD = 30         # eager ops per transformer layer, forward
OPS_PER_LAYER_BWD = 45         # ... backward (autograd + vmap)
OPS_PER_HEAD_BLOCK = 6         # ops per 128-row head block (matmul, softmax in place, gather, sums)
OPS_PER_TENSOR_UPDATE = 14     # ops per sampled tensor per step in SGLD.update, plus one randn per chain

# ---------------------------------------------------------------- shapes and counts


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    vocab: int
    layers: int
    heads: int
    seq: int
    n_parameters: int

    @staticmethod
    def of(model, seq: int) -> "Shape":
        c = model.config
        return Shape(int(c.hidden_size), int(c.intermediate_size), int(c.vocab_size), int(c.num_hidden_layers),
                     int(c.num_attention_heads), int(seq), sum(p.numel() for p in model.parameters()))

    def fwd(self, start: int) -> float:
        """Forward FLOPs per token of layers `start..` and the head."""
        H, I, T = self.hidden, self.intermediate, self.seq
        return (self.layers - start) * (2 * (4 * H * H + 2 * H * I) + 4 * T * H) + 2 * H * self.vocab


def cached_from(component) -> int:
    """The layer a unit's forward starts from (the lower-layer cache applies for layer >= 1)."""
    return component.layer if component.layer >= 1 else 0


def sampled_entries(component) -> int:
    """Entries of the tensors a unit's SGLD state holds per chain (whole tensors; masks zero the rest)."""
    return sum(math.prod(s) for s in component.shapes.values())


def dense_sampled(component, shape: Shape) -> int:
    embed = "gpt_neox.embed_in.weight" in component.masks
    return component.n_parameters - (shape.vocab * shape.hidden if embed else 0)


def unit_work(component, chains: int, config, shape: Shape) -> dict:
    """Counts and FLOPs of one unit (component, `chains` chains)."""
    s, d = config.sampler, config.data
    start = cached_from(component)
    act = shape.fwd(component.layer) if component.layer < shape.layers else 0.0
    steps = s.burnin + s.num_draws * s.steps_between_draws
    step_tokens = chains * s.batch_size * d.seq_len
    eval_tokens = (d.n_sampling_contexts + d.n_probe_contexts) * d.seq_len
    step = step_tokens * (shape.fwd(start) + act + 2 * dense_sampled(component, shape))
    ev = eval_tokens * shape.fwd(start)
    cache_tokens = (d.n_train_contexts + d.n_sampling_contexts + d.n_probe_contexts) * d.seq_len
    cache = cache_tokens * (shape.fwd(0) - shape.fwd(start)) if start else 0.0
    return {"component": component.name, "chains": chains, "layer": component.layer, "start_layer": start,
            "sampled_entries": sampled_entries(component), "n_parameters": component.n_parameters,
            "steps": steps, "chain_draws": chains * s.num_draws, "evaluations": chains * s.num_draws,
            "flops_per_step": step, "flops_per_eval": ev, "flops_cache": cache,
            "flops_steps": steps * step, "flops_evals": chains * s.num_draws * ev}


# ---------------------------------------------------------------- the store

_F8, _F4, _I8, _I4 = 8, 4, 8, 4


def _utf8(values) -> int:
    return int(sum(len(str(v).encode("utf-8")) for v in values))


def store_arrays(layout, probe) -> dict:
    """Logical (uncompressed) bytes of every array `SampleStore._create` makes: {name: {shape, dtype, bytes}}.
    String arrays count their UTF-8 bytes."""
    C, N, D, T = len(layout.components), layout.n_chains, layout.n_draws, layout.n_tokens
    out = {}

    def add(name, shape, dtype, size):
        n = math.prod(shape)
        out[name] = {"shape": list(shape), "dtype": dtype, "bytes": int(n * size)}

    add("sampling_loss", (C, N, D), "float64", _F8)
    add("probe_loss", (C, N, D, T), "float32", _F4)
    for name in ("step_loss", "grad_norm", "noise_norm", "distance"):
        add(name, (C, N, D), "float64", _F8)
    add("diverged_at", (C, N), "int64", _I8)
    add("progress", (C, N), "int64", _I8)
    out["component"] = {"shape": [C], "dtype": "str", "bytes": _utf8(layout.components)}
    add("token_context", (T,), "int32", _I4)
    add("token_position", (T,), "int32", _I4)
    add("token_id", (T,), "int64", _I8)
    out["token_text"] = {"shape": [T], "dtype": "str", "bytes": _utf8(probe.token_text)}
    out["token_source"] = {"shape": [T], "dtype": "str", "bytes": _utf8(probe.token_source)}
    add("probe_input_ids", (layout.n_contexts, layout.seq_len), "int64", _I8)
    return out


def moments_arrays(layout, store: dict) -> dict:
    """What a per-chain float64 moments store would hold instead of `probe_loss` (not implemented yet):
    `estimator.ChainMoments`'s sums per (component, chain): n, sum phi, sum phi^2 and, per token, sum phi*D and
    sum D; the per-draw scalar traces (R-hat, ESS, divergence) and the probe table stay as they are."""
    C, N, T = len(layout.components), layout.n_chains, layout.n_tokens
    out = {"moment_phiD": {"shape": [C, N, T], "dtype": "float64", "bytes": C * N * T * _F8},
           "moment_D": {"shape": [C, N, T], "dtype": "float64", "bytes": C * N * T * _F8},
           "moment_n": {"shape": [C, N], "dtype": "int64", "bytes": C * N * _I8},
           "moment_phi": {"shape": [C, N], "dtype": "float64", "bytes": C * N * _F8},
           "moment_phi2": {"shape": [C, N], "dtype": "float64", "bytes": C * N * _F8}}
    for name, a in store.items():
        if name != "probe_loss":
            out[name] = a
    return out


# ---------------------------------------------------------------- memory


def actor_memory(config, shape: Shape, units: list[dict]) -> dict:
    """Peak resident bytes of one actor (model in the module doc), and the unit that sets it."""
    s, d = config.sampler, config.data
    H, I, V, T = shape.hidden, shape.intermediate, shape.vocab, shape.seq
    model = shape.n_parameters * 4
    data = (d.n_train_contexts + d.n_sampling_contexts + d.n_probe_contexts) * T * 8
    per_token_layer = 4 * (11 * H + 2 * I + 2 * shape.heads * T)
    best = None
    for u in units:
        g, S, start = u["chains"], u["sampled_entries"], u["start_layer"]
        state = 3 * g * S * 4 + (2 * g * S * 4 if s.precondition == "rmsprop" else 0) + S   # + bool masks
        cache = (d.n_train_contexts + d.n_sampling_contexts + d.n_probe_contexts) * T * H * 4 if start else 0
        step_act = g * s.batch_size * T * ((shape.layers - start) * per_token_layer + 2 * H * 4) + g * CE_ROWS * V * 4
        rows = max(T, BODY_ROWS // T * T)
        eval_act = rows * per_token_layer + CE_ROWS * V * 4
        buffer = 2 * min(s.checkpoint_every, s.num_draws) * g * u["n_tokens"] * 4
        total = state + cache + max(step_act, eval_act) + buffer
        if best is None or total > best["unit_bytes"]:
            best = {"component": u["component"], "unit_bytes": total, "chain_state": state, "cache": cache,
                    "activations": max(step_act, eval_act), "draw_buffer": buffer}
    peak = RUNTIME_BYTES + model + data + best["unit_bytes"]
    return {"peak_bytes": int(peak), "runtime": RUNTIME_BYTES, "model": model, "data": data,
            **{k: (int(v) if not isinstance(v, str) else v) for k, v in best.items()}}


# ---------------------------------------------------------------- calibration (this machine)


def _threads(config) -> int:
    r = config.ray
    return r.torch_threads or max(1, int(r.num_cpus_per_actor))


class OpCount:
    """Counts the aten ops torch dispatches inside the block (vmapped ops count once, as one kernel each)."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.n += 1
                return func(*args, **(kwargs or {}))

        self.n = 0
        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        return False


def other_demand(cores: int, busy: float, own: float, own_threads: float) -> float:
    """Cores other processes want, from the machine's busy cores and ours (both per second of wall time):
    their busy cores, or, when we got less than our threads (the cores are shared out), what fair sharing
    implies: own / own_threads = cores / (own_threads + other)."""
    other = max(0.0, busy - own)
    share = own / own_threads if own_threads > 0 else 1.0
    if 0 < share < 0.95:
        other = max(other, cores / share - own_threads)
    return other


class CpuLoad:
    """Cores other processes want while the block runs (`other_demand`, from /proc/stat and this process's
    CPU time, which one torch thread `threads` uses). 0 where /proc/stat is not readable."""

    def __init__(self, threads: int = 1):
        self.threads = threads

    @staticmethod
    def _busy() -> Optional[tuple[float, float]]:
        try:
            with open("/proc/stat") as f:
                v = [float(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        busy = v[0] + v[1] + v[2] + sum(v[5:8])           # user nice system (idle iowait) irq softirq steal
        return busy / hz, time.perf_counter()

    def __enter__(self):
        self.start, self.own0 = self._busy(), time.process_time()
        self.cores = 0.0
        return self

    def __exit__(self, *exc):
        end = self._busy()
        if self.start is not None and end is not None and end[1] > self.start[1]:
            wall = end[1] - self.start[1]
            own = (time.process_time() - self.own0) / wall
            self.cores = other_demand(os.cpu_count() or 1, (end[0] - self.start[0]) / wall, own, self.threads)
        return False


def load_stretch(config, other_cores: float, cores: Optional[int] = None,
                 other_in_run: Optional[float] = None) -> float:
    """How much slower each actor of a local run is than the calibration, with `other_cores` cores wanted by
    other processes during the calibration and `other_in_run` (default: the same) during the run (the module
    doc); 1 for a run on a Ray cluster elsewhere."""
    if config.ray.address is not None:
        return 1.0
    cores = cores or os.cpu_count() or 1
    other_in_run = other_cores if other_in_run is None else other_in_run
    need, own = config.ray.num_actors * _threads(config), _threads(config)
    return min(1.0, cores / (own + other_cores)) / min(1.0, cores / (need + other_in_run))


def calibrate(prepared, component_names: list[str], draws: int, chains: tuple[int, ...]) -> dict:
    """Time unit start-up, SGLD steps and one chain's evaluation for each named component, in this process with
    one actor's torch threads: {name: {setup_s, step_s, eval_s}} (medians of `draws` steps and evaluations)."""
    import torch

    from spectro.device import eval_autocast
    from spectro.sampling import UnitRunner

    cfg = prepared.config.sampler
    problem = prepared.problem
    threads = torch.get_num_threads()
    torch.set_num_threads(_threads(prepared.config))
    out = {}
    try:
        for name in component_names:
            comp = next(c for c in prepared.components if c.name == name)
            t0 = time.perf_counter()
            runner = UnitRunner(problem, comp, chains, cfg, cfg.seed)
            state = runner.start()
            setup = time.perf_counter() - t0
            healthy = state.diverged_at.copy()
            sg = state.sgld
            sg, _ = runner._step(sg, state, healthy)                 # warm-up (allocator, vmap tracing)
            steps = []
            for _ in range(max(1, draws)):
                t0 = time.perf_counter()
                sg, _ = runner._step(sg, state, healthy)
                steps.append(time.perf_counter() - t0)
            evals = []
            for i in range(max(1, draws) + 1):
                params = {n: p[0] for n, p in sg.params.items()}
                t0 = time.perf_counter()
                with eval_autocast(problem.device, cfg.probe_dtype):
                    runner._per_token(params, "sampling").double().mean().item()
                    runner._per_token(params, "probe").float().reshape(-1).cpu().numpy()
                if i:                                                  # the first one warms up
                    evals.append(time.perf_counter() - t0)
            with OpCount() as step_ops:                                # what a GPU would launch, one op a kernel
                runner._step(sg, state, healthy)
            with OpCount() as eval_ops, eval_autocast(problem.device, cfg.probe_dtype):
                runner._per_token(params, "sampling")
                runner._per_token(params, "probe")
            out[name] = {"setup_s": setup, "step_s": statistics.median(steps), "eval_s": statistics.median(evals),
                         "chains": len(chains), "threads": torch.get_num_threads(),
                         "step_ops": step_ops.n, "eval_ops": eval_ops.n}
            del runner, state, sg
    finally:
        torch.set_num_threads(threads)
    return out


def fit(calib: dict, work: dict) -> dict:
    """Rates from the calibrated components: step = F/r + u*g*S, eval = E/r_e + v, setup = t0 + cache/r_e."""
    names = list(calib)
    other = [n for n in names if n != "full"]
    ref = other[0] if other else names[0]
    c, f = work[ref], work.get("full", work[ref])
    tc, tf = calib[ref], calib.get("full", calib[ref])
    # steps: two equations in (1/r, u)
    a = np.array([[c["flops_per_step"], c["chains"] * c["sampled_entries"]],
                  [f["flops_per_step"], f["chains"] * f["sampled_entries"]]], dtype=float)
    b = np.array([tc["step_s"], tf["step_s"]])
    inv_r, u = (b[0] / a[0, 0], 0.0)
    if ref != "full" and abs(np.linalg.det(a)) > 1e-9 * abs(a[0, 0] * a[1, 1]):
        x = np.linalg.solve(a, b)
        if x[0] > 0 and x[1] >= 0:
            inv_r, u = float(x[0]), float(x[1])
    # evaluations: (1/r_e, v)
    inv_re, v = tc["eval_s"] / c["flops_per_eval"], 0.0
    if ref != "full" and abs(f["flops_per_eval"] - c["flops_per_eval"]) > 0.1 * f["flops_per_eval"]:
        slope = (tf["eval_s"] - tc["eval_s"]) / (f["flops_per_eval"] - c["flops_per_eval"])
        icpt = tc["eval_s"] - slope * c["flops_per_eval"]
        if slope > 0 and icpt >= 0:
            inv_re, v = float(slope), float(icpt)
    setup0 = tf["setup_s"] if "full" in calib else 0.0
    return {"step_flops_per_s": 1 / inv_r, "update_s_per_entry": u, "eval_flops_per_s": 1 / inv_re,
            "eval_overhead_s": v, "setup_s": setup0, "reference": ref}


def unit_seconds_cpu(w: dict, rates: dict, calib: dict, config) -> dict:
    """Predicted seconds of one unit on one actor of this machine."""
    s = config.sampler
    m = calib.get(w["component"])
    if m is not None and m["chains"] == w["chains"]:
        step, ev, setup = m["step_s"], m["eval_s"], m["setup_s"]
    else:
        step = w["flops_per_step"] / rates["step_flops_per_s"] + rates["update_s_per_entry"] * w["chains"] * \
            w["sampled_entries"]
        ev = w["flops_per_eval"] / rates["eval_flops_per_s"] + rates["eval_overhead_s"]
        setup = rates["setup_s"] + w["flops_cache"] / rates["eval_flops_per_s"]
    total = setup + w["steps"] * step + s.num_draws * w["chains"] * ev
    return {"setup": setup, "step": step, "eval": ev, "total": total}


def schedule(durations: list[float], actors: int, start: float = 0.0) -> float:
    """Makespan of units dealt in order to the first idle of `actors` actors (the service's queue)."""
    free = [start] * max(1, min(actors, len(durations)))
    for d in durations:
        i = int(np.argmin(free))
        free[i] += d
    return max(free) if durations else start


# ---------------------------------------------------------------- GPU


def fit_ops(calib: dict, work: dict, shape: Shape):
    """Eager ops per step and per chain evaluation of any unit, from the op counts of the calibrated
    components: step = a * layers run + b * sampled tensors, evaluation = c + d * layers run (layers from the
    unit's start layer). None without a calibration (then the per-layer constants of this module apply)."""
    if not calib or any("step_ops" not in v for v in calib.values()):
        return None
    names = list(calib)
    ref = ([n for n in names if n != "full"] or names)[0]
    pts = [(shape.layers - work[n]["start_layer"], len(work[n]["tensors"]), calib[n])
           for n in [ref] + (["full"] if ref != "full" and "full" in calib else [])]
    (l1, t1, c1), (l2, t2, c2) = pts[0], pts[-1]
    a = np.array([[l1, t1], [l2, t2]], dtype=float)
    if len(pts) == 2 and abs(np.linalg.det(a)) > 1e-9:
        x = np.linalg.solve(a, [c1["step_ops"], c2["step_ops"]])
        per_layer, per_tensor = (float(x[0]), float(x[1])) if x.min() >= 0 else (None, None)
    else:
        per_layer = per_tensor = None
    if per_layer is None:
        per_layer, per_tensor = 0.0, c1["step_ops"] / max(1, t1)
    if len(pts) == 2 and l1 != l2:
        d = (c1["eval_ops"] - c2["eval_ops"]) / (l1 - l2)
        c = c1["eval_ops"] - d * l1
        if d < 0 or c < 0:
            d, c = 0.0, float(c1["eval_ops"])
    else:
        d, c = 0.0, float(c1["eval_ops"])
    measured = {n: (v["step_ops"], v["eval_ops"]) for n, v in calib.items()}

    def ops(w: dict) -> tuple[float, float]:
        if w["component"] in measured and w["chains"] == calib[w["component"]]["chains"]:
            return measured[w["component"]]
        layers = shape.layers - w["start_layer"]
        return per_layer * layers + per_tensor * len(w["tensors"]), c + d * layers

    return ops


def unit_seconds_gpu(w: dict, gpu: GPU, config, shape: Shape, ops=None) -> float:
    s, d = config.sampler, config.data
    step_rate = (gpu.tf32 if s.tf32 else gpu.fp32) * 1e12 * EFFICIENCY
    eval_rate = (gpu.bf16 if s.probe_dtype == "bfloat16" else gpu.tf32 if s.tf32 else gpu.fp32) * 1e12 * EFFICIENCY
    layers = shape.layers - w["start_layer"]
    g = w["chains"]
    if ops is not None:
        ops_step, ops_eval = ops(w)
    else:
        n_tensors = max(1, len(w.get("tensors", ())))
        head_blocks = math.ceil(s.batch_size * d.seq_len / CE_ROWS)
        ops_step = layers * (OPS_PER_LAYER_FWD + OPS_PER_LAYER_BWD) + head_blocks * OPS_PER_HEAD_BLOCK + \
            n_tensors * (OPS_PER_TENSOR_UPDATE + g)
        eval_tokens = (d.n_sampling_contexts + d.n_probe_contexts) * d.seq_len
        chunks = math.ceil(d.n_sampling_contexts / max(1, BODY_ROWS // d.seq_len)) + \
            math.ceil(d.n_probe_contexts / max(1, BODY_ROWS // d.seq_len))
        ops_eval = chunks * layers * OPS_PER_LAYER_FWD + math.ceil(eval_tokens / CE_ROWS) * OPS_PER_HEAD_BLOCK
    update_bytes = 10 * g * w["sampled_entries"] * 4           # read w, w*, grad, noise; write noise, w', norms
    step = (w["flops_per_step"] / step_rate + update_bytes / (gpu.bandwidth * 1e12 * BW_EFFICIENCY)
            + ops_step * LAUNCH_S)
    ev = w["flops_per_eval"] / eval_rate + ops_eval * LAUNCH_S
    setup = w["flops_cache"] / eval_rate
    return setup + w["steps"] * step + s.num_draws * g * ev


# ---------------------------------------------------------------- the plan


def make_plan(config, prepared=None, calibrate_draws: Optional[int] = None) -> dict:
    """The plan of `config` (a validated SpectroConfig). Loads the model and data unless `prepared` is given;
    `calibrate_draws` (default `plan.calibration_draws`; 0: no calibration) sets the timed steps/evaluations."""
    from spectro import pipeline

    p = prepared or pipeline.prepare(config)
    s, d, pc = config.sampler, config.data, config.plan
    layout = pipeline.layout_for(p)
    shape = Shape.of(p.loaded.model, d.seq_len)
    by_name = {c.name: c for c in p.components}
    units = []
    for name, chains in layout.units():
        w = unit_work(by_name[name], len(chains), config, shape)
        w["chain_ids"] = list(chains)
        w["n_tokens"] = layout.n_tokens
        w["tensors"] = sorted(by_name[name].shapes)
        units.append(w)
    totals = {"units": len(units), "components": len(layout.components),
              "chain_draws": sum(u["chain_draws"] for u in units),
              "sgld_steps": sum(u["steps"] for u in units),
              "chain_steps": sum(u["steps"] * u["chains"] for u in units),
              "evaluations": sum(u["evaluations"] for u in units),
              "probe_tokens": layout.n_tokens,
              "flops_steps": sum(u["flops_steps"] for u in units),
              "flops_evals": sum(u["flops_evals"] for u in units),
              "flops_cache": sum(u["flops_cache"] for u in units)}
    totals["flops"] = totals["flops_steps"] + totals["flops_evals"] + totals["flops_cache"]
    store = store_arrays(layout, p.probe)
    moments = moments_arrays(layout, store)
    ckpt = sum(u["chains"] * (u["sampled_entries"] * 4 * (2 if s.precondition == "rmsprop" else 1)
                              + 2 * GENERATOR_STATE_BYTES) for u in units)
    plan = {
        "config": {"model": config.model.source, "components": list(layout.components),
                   "num_chains": s.num_chains, "chain_group": layout.chain_group, "antithetic": s.antithetic,
                   "num_draws": s.num_draws, "burnin": s.burnin, "steps_between_draws": s.steps_between_draws,
                   "batch_size": s.batch_size, "seq_len": d.seq_len, "n_sampling_contexts": d.n_sampling_contexts,
                   "n_probe_contexts": d.n_probe_contexts, "num_actors": config.ray.num_actors,
                   "threads_per_actor": _threads(config), "probe_dtype": s.probe_dtype, "tf32": s.tf32},
        "model": dataclasses.asdict(shape),
        "totals": totals,
        "store": {"mode": "draws", "arrays": store, "bytes": sum(a["bytes"] for a in store.values()),
                  "checkpoint_bytes": ckpt},
        "moments_store": {"mode": "moments (not implemented yet)", "arrays": moments,
                          "bytes": sum(a["bytes"] for a in moments.values())},
        "memory": actor_memory(config, shape, units),
        "units": [{k: v for k, v in u.items() if k != "tensors"} for u in units],
    }
    n_draws = pc.calibration_draws if calibrate_draws is None else calibrate_draws
    if n_draws > 0:
        ref = pc.calibrate_on or _median_component(units)
        if ref not in by_name:
            from spectro.errors import ConfigError
            raise ConfigError(f"plan.calibrate_on names {ref!r}, which is not a component of this run "
                              f"({', '.join(layout.components)}); pick one of those or null")
        names = ["full"] + ([ref] if ref != "full" else [])
        chains = tuple(layout.units()[0][1])
        t0 = time.perf_counter()
        with CpuLoad(_threads(config)) as load:
            calib = calibrate(p, names, n_draws, chains)
        work = {u["component"]: u for u in units if u["chain_ids"] == list(chains)}
        rates = fit(calib, work)
        per_unit = [unit_seconds_cpu(u, rates, calib, config) for u in units]
        cores = os.cpu_count() or 1
        stretch = load_stretch(config, load.cores, cores)
        durations = [x["total"] * stretch for x in per_unit]
        wall = schedule(durations, config.ray.num_actors, ACTOR_START_S)
        for u, x in zip(plan["units"], per_unit):
            u["predicted_s"] = round(x["total"] * stretch, 3)
        plan["cpu"] = {"calibration": calib, "calibration_seconds": round(time.perf_counter() - t0, 2),
                       "rates": rates, "cores": cores, "other_load_cores": round(load.cores, 2), "stretch": stretch,
                       "actor_seconds": sum(durations), "predicted_wall_s": wall}
    if pc.gpu:
        gpu = GPUS[pc.gpu]
        calib = plan.get("cpu", {}).get("calibration", {})
        work = {u["component"]: u for u in units if u["chain_ids"] == list(layout.units()[0][1])}
        ops = fit_ops(calib, work, shape)
        secs = [unit_seconds_gpu(u, gpu, config, shape, ops) for u in units]
        plan["gpu"] = {"name": pc.gpu, "part": gpu.name, "efficiency": EFFICIENCY, "bw_efficiency": BW_EFFICIENCY,
                       "launch_s": LAUNCH_S, "actors": config.ray.num_actors,
                       "op_counts": "counted in the calibration" if ops else "per-layer constants (no calibration)",
                       "actor_seconds": sum(secs),
                       "predicted_wall_s": schedule(secs, config.ray.num_actors, ACTOR_START_S),
                       "fits_memory": plan["memory"]["peak_bytes"] - RUNTIME_BYTES < gpu.memory_gb * 1e9}
    return plan


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
    rows = [("units (component x chain group)", f"{t['units']:,}"),
            ("chain-draws", f"{t['chain_draws']:,}"),
            ("SGLD steps (per unit: burn-in + draws x steps between)", f"{t['sgld_steps']:,} "
             f"({t['chain_steps']:,} chain-steps)"),
            ("chain evaluations (sampling set + probe set)",
             f"{t['evaluations']:,} x {t['probe_tokens']:,} probe tokens"),
            ("FLOPs: SGLD steps", f"{t['flops_steps'] / 1e12:,.2f} TFLOP"),
            ("FLOPs: evaluations", f"{t['flops_evals'] / 1e12:,.2f} TFLOP"),
            ("FLOPs: lower-layer caches", f"{t['flops_cache'] / 1e12:,.2f} TFLOP"),
            ("FLOPs: total", f"{t['flops'] / 1e12:,.2f} TFLOP")]
    for name, a in plan["store"]["arrays"].items():
        if a["bytes"] >= 1000 or name == "probe_loss":
            rows.append((f"store {name} {tuple(a['shape'])} {a['dtype']}", _b(a["bytes"])))
    rows += [("store, draws mode (logical, all arrays)", _b(plan["store"]["bytes"])),
             ("checkpoints", _b(plan["store"]["checkpoint_bytes"])),
             ("store, moments mode (not implemented yet)", _b(plan["moments_store"]["bytes"])),
             (f"peak memory per actor (largest unit: {m['component']})", _b(m["peak_bytes"]))]
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
