"""The plan's clock: a calibration of SGLD steps and evaluations on this machine (and the load
other processes put on it), the fit that turns it into per-unit times, the actors' schedule, and
the GPU model (models in `spectro.plan`)."""

from __future__ import annotations

import math
import os
import statistics
import time
from typing import Optional

import numpy as np

from spectro.gpus import GPU
from spectro.plan.work import BODY_ROWS, CE_ROWS, Shape
from spectro.probes import probe_context_count

EFFICIENCY = 0.35              # share of the dense datasheet rate our matmuls reach (docs/performance.md, "Cost plan")
BW_EFFICIENCY = 0.7            # share of the datasheet bandwidth an elementwise update streams at
LAUNCH_S = 10e-6               # per eager op: launch + PyTorch dispatch
OPS_PER_LAYER_FWD = 30         # eager ops per transformer layer, forward
OPS_PER_LAYER_BWD = 45         # ... backward (autograd + vmap)
OPS_PER_HEAD_BLOCK = 6         # ops per 128-row head block (matmul, softmax in place, gather, sums)
OPS_PER_TENSOR_UPDATE = 14     # ops per sampled tensor per step in SGLD.update, plus one randn per chain


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
    if m is not None and m["chains"] == w["chains"] and w["probe_contexts"] == probe_context_count(config.data):
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
        eval_tokens = (d.n_sampling_contexts + probe_context_count(d)) * d.seq_len
        chunks = math.ceil(d.n_sampling_contexts / max(1, BODY_ROWS // d.seq_len)) + \
            math.ceil(probe_context_count(d) / max(1, BODY_ROWS // d.seq_len))
        ops_eval = chunks * layers * OPS_PER_LAYER_FWD + math.ceil(eval_tokens / CE_ROWS) * OPS_PER_HEAD_BLOCK
    update_bytes = 10 * g * w["sampled_entries"] * 4           # read w, w*, grad, noise; write noise, w', norms
    step = (w["flops_per_step"] / step_rate + update_bytes / (gpu.bandwidth * 1e12 * BW_EFFICIENCY)
            + ops_step * LAUNCH_S)
    ev = w["flops_per_eval"] / eval_rate + ops_eval * LAUNCH_S
    setup = w["flops_cache"] / eval_rate
    return setup + w["steps"] * step + s.num_draws * g * ev
