"""GPU check: does each GPU path work, and what does it cost? Prints medians and ratios, asserts no speed.

    python benchmarks/gpu_check.py [--device cuda] [--out gpu_check.json] [--draws 8] [--chains 4]
                                   [--components l2h1,l5.mlp,unembed] [--skip-service]
                                   [--tokenizer /path/to/gpt-neox-20b.json]
    python benchmarks/gpu_check.py --device cpu --quick --out /tmp/g.json        # the CPU smoke (the test)

1. The device: torch.cuda's name, memory and compute capability, torch and CUDA versions, and the
   datasheet figures of the part (spectro.gpus) when its name matches one of them.
2. In this process: SGLD draws (`UnitRunner.next_draw`: `steps_between_draws` steps + the evaluation of
   the sampling set and the probe tokens) of the Pythia-14M-shape workload of benchmarks/bench_w2.py
   (random fp16 weights under the hub's key names, the GPT-NeoX-20B tokenizer; 65-token contexts, 32
   sampling and 32 probe contexts, minibatch 16, one step between draws) for a few components and
   `full`, under three settings on the same chains (same seeds): float32, TF32 (`sampler.tf32=true`,
   set with `device.apply_settings`) and bf16 observables (`sampler.probe_dtype=bfloat16`). Per
   setting and component: the median seconds per draw (the first draw excluded: warm-up), the FLOP/s
   achieved under bench_w2's FLOP model, the fraction of the datasheet's dense limit (the time the
   step FLOPs take at the setting's matmul rate plus the time the evaluation FLOPs take at its
   evaluation rate, over the measured time: fp32/fp32, tf32/tf32, fp32/bf16), and the peak CUDA memory
   (`torch.cuda.max_memory_allocated`). Against float32 on the same chains: the max and median
   relative difference of the per-token probe losses, and of chi (peer form, per component: max
   |chi - chi_fp32| over the token sd of chi_fp32, and the Pearson r). Before them, once: the fused,
   chunked per-token losses at w* (float32) against a float64 reference on the same device (on CUDA,
   the check docs/performance.md asks for of the in-place softmax kernels).
3. Through the service: a short real run of the Hydra app (`jobs/run.py experiment=pythia14m`, with
   overrides that make it small, the local checkpoint of step 2, `stage=sample`, 2 actors sharing
   one GPU: `ray.num_gpus_per_actor=0.5 ray.gpu_memory_fraction=0.45`), and its summary.json
   (sample.seconds, draws_per_second, actor_utilisation). The service does not record GPU memory per
   actor; where nvidia-smi exists the script polls it for the actors' processes (that includes the CUDA
   context) and says so, and the in-process peak of step 2 stands in for the tensors' own share.
4. A final table, and every figure in the JSON file given by --out. Exit 0 on success; 2 with one line
   on stderr when --device cuda is asked for on a machine where torch sees no CUDA device; 1 when a part
   raised (each part runs whatever the others did; its error and traceback go into the JSON).

--quick: the embedded model (4 layers, vocab 4096), 2 components + full, 2 chains, 3 draws, 16-token
contexts; the service part runs experiment=smoke-sized (1 component, 2 chains, 2 draws, 1 actor) unless
--skip-service. With --device cpu the TF32 setting is recorded as skipped by apply_settings (TF32 is a
CUDA setting) and runs as float32; bf16 autocast runs on the CPU. Not yet run on a GPU (docs/performance.md).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

SETTINGS = {                    # name -> (sampler.tf32, sampler.probe_dtype)
    "float32": (False, "float32"),
    "tf32": (True, "float32"),
    "bf16": (False, "bfloat16"),
}
QUICK_COMPONENTS = "l1h1,l2.mlp"
FULL_COMPONENTS = "l2h1,l5.mlp,unembed"


class NoCuda(Exception):
    """--device cuda on a machine where torch sees no CUDA device."""


# ---------------------------------------------------------------- 1. the device

def check_device(device: str) -> str:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise NoCuda(f"gpu_check: --device {device} but torch sees no CUDA device (torch {torch.__version__}, "
                     f"CUDA build {torch.version.cuda}); use --device cpu to exercise the script on the CPU")
    return device


def datasheet(name: str):
    """The spectro.gpus entry whose key appears in the CUDA device name (H100, H200, A100, L4), or None."""
    from spectro.gpus import GPUS

    upper = name.upper()
    for key in ("h200", "h100", "a100", "l4"):       # H200 before H100; L4 last ("L40" is not an L4)
        if key.upper() in upper and not (key == "l4" and "L40" in upper):
            return key, GPUS[key]
    return None


def describe_device(device: str) -> dict:
    info = {"device": device, "torch": torch.__version__, "cuda_build": torch.version.cuda,
            "python": platform.python_version(), "host": platform.node(), "cpu_count": os.cpu_count()}
    if device.startswith("cuda"):
        idx = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(idx)
        info.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 2),
                    capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                    cudnn=torch.backends.cudnn.version(), device_count=torch.cuda.device_count())
        sheet = datasheet(props.name)
        if sheet is not None:
            key, gpu = sheet
            info["datasheet"] = {"key": key, "name": gpu.name, "fp32_tflops": gpu.fp32, "tf32_tflops": gpu.tf32,
                                 "bf16_tflops": gpu.bf16, "bandwidth_tbs": gpu.bandwidth, "memory_gb": gpu.memory_gb}
        else:
            info["datasheet"] = None
    else:
        info.update(name=platform.processor() or platform.machine(), datasheet=None)
    return info


# ---------------------------------------------------------------- 2. in-process draws

def workload_config(model_source: str, components: list[str], chains: int, draws: int, device: str, quick: bool):
    from spectro.config import to_config

    seq = 16 if quick else 65
    n_ctx = 8 if quick else 32
    return to_config({
        "model": {"source": model_source, "revision": None, "allow_download": False},
        "components": components,
        "stage": "sample",
        "device": device,
        "data": {"seq_len": seq, "n_train_contexts": 64 if quick else 512, "n_sampling_contexts": n_ctx,
                 "n_probe_contexts": n_ctx},
        "sampler": {"step_size": 1e-4, "nbeta": 30.0, "gamma": 100.0, "batch_size": 4 if quick else 16,
                    "num_chains": chains, "num_draws": draws, "burnin": 0, "steps_between_draws": 1,
                    "chain_group": chains, "checkpoint_every": draws, "seed": 0,
                    "antithetic": chains % 2 == 0 and chains >= 4},
    })


@contextlib.contextmanager
def precision(device: str, tf32: bool):
    """Apply the sampler's TF32 setting the way an actor does (device.apply_settings), restore it after."""
    from spectro.device import apply_settings

    saved = {}
    for name, backend in (("matmul", torch.backends.cuda.matmul), ("cudnn", torch.backends.cudnn)):
        if hasattr(backend, "fp32_precision"):
            saved[name] = (backend, backend.fp32_precision)
    try:
        yield apply_settings(device, tf32, 0.0)
    finally:
        for backend, value in saved.values():
            backend.fp32_precision = value


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_chains(prepared, comp, sampler, device: str) -> dict:
    """Every draw of one component's chains under `sampler`: seconds per draw, losses, peak CUDA memory."""
    from spectro.sampling import UnitRunner

    problem = prepared.problem
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    runner = UnitRunner(problem, comp, range(sampler.num_chains), sampler, sampler.seed)
    state = runner.start()
    seconds, sampling, probe, diverged = [], [], [], []
    for _ in range(sampler.num_draws):
        sync(device)
        t0 = time.perf_counter()
        state, draw = runner.next_draw(state)
        sync(device)
        seconds.append(time.perf_counter() - t0)
        sampling.append(draw.sampling_loss)
        probe.append(draw.probe_loss)
        diverged.append(draw.diverged)
    return {"seconds": seconds, "cached_from": comp.layer if runner.cached else 0,
            "sampling": np.stack(sampling, 1), "probe": np.stack(probe, 1),        # (chains, draws[, tokens])
            "diverged": bool(np.any(diverged)),
            "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None}


def draw_flops(prepared, comp, sampler, cached_from: int) -> dict:
    """bench_w2's FLOP model (common.unit_flops) for one draw of `num_chains` chains: the steps and the evaluation."""
    from common import dense_sampled, unit_flops

    problem = prepared.problem
    config, seq = problem.model.config, problem.probe_ids.shape[1]
    f = unit_flops(config, seq, cached_from, comp.layer, dense_sampled(comp, config),
                   sampler.num_chains * sampler.batch_size * seq,
                   sampler.num_chains * (problem.sampling_ids.numel() + problem.probe_ids.numel()))
    return {"step": f["step"] * sampler.steps_between_draws, "eval": f["eval"]}


def limit_seconds(flops: dict, setting: str, sheet: dict | None):
    """Seconds the draw's FLOPs take at the datasheet's dense rates for this setting (None off the table)."""
    if not sheet:
        return None
    step_rate = sheet["tf32_tflops"] if setting == "tf32" else sheet["fp32_tflops"]
    eval_rate = {"tf32": sheet["tf32_tflops"], "bf16": sheet["bf16_tflops"]}.get(setting, sheet["fp32_tflops"])
    return flops["step"] / (step_rate * 1e12) + flops["eval"] / (eval_rate * 1e12)


def relative(a: np.ndarray, ref: np.ndarray) -> dict:
    """Max and median of |a - ref| / |ref| over the entries finite in both."""
    ok = np.isfinite(a) & np.isfinite(ref) & (ref != 0)
    if not ok.any():
        return {"max": None, "median": None, "n": 0}
    r = np.abs(a[ok].astype(np.float64) - ref[ok]) / np.abs(ref[ok].astype(np.float64))
    return {"max": float(r.max()), "median": float(np.median(r)), "n": int(ok.sum())}


def chi_of(runs: dict, name: str, init: float) -> np.ndarray | None:
    """Peer-form chi (tokens,) of one component from in-memory draws, as spectro.estimator computes it."""
    from spectro.estimator import ChainMoments, susceptibility, units_of

    def moments(r):
        s, p = r["sampling"], r["probe"]
        return [ChainMoments(p.shape[-1]).add(s[k], p[k], init) for k in range(s.shape[0])]

    if runs[name]["diverged"] or runs["full"]["diverged"]:
        return None
    comp, full = moments(runs[name]), moments(runs["full"])
    paired = len(full) % 2 == 0
    units = units_of(len(full), paired)
    return np.asarray(susceptibility(comp, full, "peer", units, units).chi, dtype=np.float64)


def in_process(prepared, device: str, sheet: dict | None) -> dict:
    base = prepared.config.sampler
    init = prepared.problem.init_loss
    comps = prepared.components
    results = {"settings": {}, "differences": {}}
    losses = {}
    for setting, (tf32, probe_dtype) in SETTINGS.items():
        sampler = dataclasses.replace(base, tf32=tf32, probe_dtype=probe_dtype)
        with precision(device, tf32) as applied:
            per, runs = {}, {}
            for comp in comps:
                r = run_chains(prepared, comp, sampler, device)
                runs[comp.name] = r
                flops = draw_flops(prepared, comp, sampler, r["cached_from"])
                timed = r["seconds"][1:] or r["seconds"]
                med = statistics.median(timed)
                limit = limit_seconds(flops, setting, sheet)
                per[comp.name] = {
                    "median_s_per_draw": med, "first_draw_s": r["seconds"][0], "draws_timed": len(timed),
                    "cached_from_layer": r["cached_from"], "flops_per_draw": flops["step"] + flops["eval"],
                    "step_flops": flops["step"], "eval_flops": flops["eval"],
                    "achieved_tflops": (flops["step"] + flops["eval"]) / med / 1e12,
                    "of_datasheet": None if limit is None else limit / med,
                    "peak_cuda_mib": None if r["peak_bytes"] is None else r["peak_bytes"] / 2**20,
                    "diverged": r["diverged"],
                }
                line = (f"  {setting:8s} {comp.name:10s} {med * 1e3:9.2f} ms/draw  "
                        f"{per[comp.name]['achieved_tflops'] * 1e3:9.3f} GFLOP/s  "
                        + (f"{per[comp.name]['of_datasheet']:.2%} of datasheet" if limit else "no datasheet rate")
                        + (f"  peak {per[comp.name]['peak_cuda_mib']:.0f} MiB" if r["peak_bytes"] else ""))
                print(line, flush=True)
            losses[setting] = runs
        results["settings"][setting] = {"applied": {k: str(v) for k, v in applied.items()},
                                        "probe_dtype": probe_dtype, "components": per}
    ref = losses["float32"]
    for setting in ("tf32", "bf16"):
        diff = {}
        for comp in comps:
            name = comp.name
            entry = {"probe_loss": relative(losses[setting][name]["probe"], ref[name]["probe"]),
                     "sampling_loss": relative(losses[setting][name]["sampling"], ref[name]["sampling"])}
            if name != "full":
                a, b = chi_of(losses[setting], name, init), chi_of(ref, name, init)
                if a is not None and b is not None and np.all(np.isfinite(a)) and np.all(np.isfinite(b)):
                    sd = float(b.std())
                    entry["chi"] = {"max_abs_over_sd": float(np.abs(a - b).max() / sd) if sd > 0 else None,
                                    "pearson_r": float(np.corrcoef(a, b)[0, 1]) if sd > 0 and a.std() > 0 else None}
                else:
                    entry["chi"] = None
            diff[name] = entry
        probe_all = relative(np.concatenate([losses[setting][c.name]["probe"].ravel() for c in comps]),
                             np.concatenate([ref[c.name]["probe"].ravel() for c in comps]))
        results["differences"][setting] = {"all_components_probe_loss": probe_all, "per_component": diff}
        print(f"  {setting} vs float32, per-token probe losses on the same chains: max rel diff "
              f"{probe_all['max']:.3e}, median {probe_all['median']:.3e} ({probe_all['n']} values)", flush=True)
    return results


def fused_against_float64(prepared, n_contexts: int = 8) -> dict:
    """The fused, chunked per-token losses (float32, TF32 off: the sampler's evaluation path) at w* against a
    float64 reference (the model's plain logits and F.cross_entropy, on the same device): on CUDA this is
    the check that the in-place softmax kernels give the CPU tests' numbers."""
    import copy

    import torch.nn.functional as F

    from spectro.observables import logits

    problem = prepared.problem
    ids = problem.probe_ids[:n_contexts]
    with torch.no_grad():
        got = problem.per_token(problem.model, {}, ids).double()
        ref_model = copy.deepcopy(problem.model).double()
        z = logits(ref_model, {}, ids)[:, :-1]
        ref = F.cross_entropy(z.reshape(-1, z.shape[-1]), ids[:, 1:].reshape(-1), reduction="none").view_as(got)
        del ref_model, z
    out = relative(got.cpu().numpy(), ref.cpu().numpy())
    print(f"  fused float32 per-token losses at w* vs a float64 reference ({out['n']} tokens): max rel diff "
          f"{out['max']:.2e}, median {out['median']:.2e}", flush=True)
    return out


# ---------------------------------------------------------------- 3. through the service

class GpuProcessMemory:
    """Peak GPU memory per process (nvidia-smi --query-compute-apps), polled in a thread; off without nvidia-smi."""

    def __init__(self, every_s: float = 0.5):
        self.exe = shutil.which("nvidia-smi")
        self.peak: dict[int, float] = {}
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                query = [self.exe, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
                out = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout
                for line in out.strip().splitlines():
                    pid, mib = (x.strip() for x in line.split(","))
                    self.peak[int(pid)] = max(self.peak.get(int(pid), 0.0), float(mib))
            except (OSError, ValueError, subprocess.SubprocessError):
                pass
            self._stop.wait(self.every_s)

    def __enter__(self):
        if self.exe:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.exe:
            self._thread.join()


def service_run(model_dir: str, device: str, quick: bool, draws: int, components: list[str]) -> dict:
    cuda, work = device.startswith("cuda"), Path(tempfile.mkdtemp(prefix="gpu-check-run-"))
    if quick:
        overrides = ["experiment=smoke", f"components=[{components[0]}]", "sampler.num_chains=2",
                     "sampler.chain_group=2", "sampler.antithetic=false", "sampler.num_draws=2", "sampler.burnin=0",
                     "sampler.checkpoint_every=2", "ray.num_actors=1"]
    else:
        overrides = ["experiment=pythia14m", f"model.source={model_dir}", "model.revision=null",
                     "model.allow_download=false", f"components=[{','.join(components)}]", "data.seq_len=65",
                     "data.n_train_contexts=512", "data.n_sampling_contexts=32", "data.n_probe_contexts=32",
                     "sampler.num_chains=4", "sampler.chain_group=2", f"sampler.num_draws={draws}",
                     "sampler.burnin=0", "sampler.steps_between_draws=1", f"sampler.checkpoint_every={draws}",
                     "ray.num_actors=2", "ray.num_cpus_per_actor=1"]
    overrides += [f"ray.num_gpus_per_actor={0.5 if cuda else 0}", f"ray.gpu_memory_fraction={0.45 if cuda else 0.0}",
                  f"device={device}", "stage=sample", "wandb.mode=disabled", f"hydra.run.dir={work}"]
    cmd = [sys.executable, str(ROOT / "jobs" / "run.py"), *overrides]
    print("  " + " ".join(cmd[1:]), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with GpuProcessMemory() as mem:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
    out = {"command": overrides, "returncode": proc.returncode, "wall_s": wall, "run_dir": str(work)}
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        out["error_tail"] = tail
        print("  service run failed (exit %d):\n    %s" % (proc.returncode, "\n    ".join(tail)), flush=True)
        return out
    summary = json.loads((work / "summary.json").read_text())
    s = summary.get("sample", {})
    out.update({k: s.get(k) for k in ("seconds", "draws_per_second", "actor_utilisation", "units_run",
                                      "diverged_chains", "driver_cpu_seconds")})
    out["gpu_memory_per_actor"] = "not recorded in summary.json by the service"
    if cuda and mem.exe:
        me = os.getpid()
        out["nvidia_smi_peak_mib_per_process"] = {str(k): v for k, v in sorted(mem.peak.items()) if k != me}
        out["gpu_memory_note"] = ("nvidia-smi peaks per GPU process during the run (the actors and the driver's "
                                  "init_loss evaluation; CUDA context included)")
    elif cuda:
        out["gpu_memory_note"] = "nvidia-smi not found: see the in-process peak_cuda_mib instead"
    print(f"  summary.json: sample.seconds {out['seconds']}, draws_per_second {out['draws_per_second']}, "
          f"actor_utilisation {out['actor_utilisation']} (wall with Ray start-up {wall:.1f} s)", flush=True)
    return out


# ---------------------------------------------------------------- driver

def final_table(report: dict) -> None:
    print("\n| setting | component | ms/draw (median) | GFLOP/s | of datasheet | peak CUDA MiB | "
          "max rel diff vs fp32 | median rel diff |")
    print("|---|---|---|---|---|---|---|---|")
    ip = report["in_process"]
    if "error" in ip:
        ip = {"settings": {}, "differences": {}}
    for setting, data in ip["settings"].items():
        for name, c in data["components"].items():
            d = ip["differences"].get(setting, {}).get("per_component", {}).get(name, {}).get("probe_loss")
            print(f"| {setting} | {name} | {c['median_s_per_draw'] * 1e3:.2f} | {c['achieved_tflops'] * 1e3:.2f} | "
                  f"{'-' if c['of_datasheet'] is None else format(c['of_datasheet'], '.2%')} | "
                  f"{'-' if c['peak_cuda_mib'] is None else format(c['peak_cuda_mib'], '.0f')} | "
                  f"{'-' if not d or d['max'] is None else format(d['max'], '.2e')} | "
                  f"{'-' if not d or d['median'] is None else format(d['median'], '.2e')} |")
    fp = ip["settings"].get("float32", {}).get("components", {})
    for setting in ("tf32", "bf16") if fp else ():
        ratios = [fp[n]["median_s_per_draw"] / c["median_s_per_draw"]
                  for n, c in ip["settings"][setting]["components"].items()]
        print(f"{setting}: speed-up over float32 per draw, median over components {statistics.median(ratios):.2f}x")
    fused = report["fused_vs_float64"]
    if "error" not in fused:
        print(f"fused float32 losses vs float64 reference: max rel diff {fused['max']:.2e}, "
              f"median {fused['median']:.2e}")
    svc = report.get("service")
    if svc and svc.get("returncode") == 0 and "error" not in svc:
        print(f"service: {svc['seconds']} s sampling, {svc['draws_per_second']} chain-draws/s, "
              f"actor utilisation {svc['actor_utilisation']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    ap.add_argument("--quick", action="store_true", help="tiny config: embedded model, 2 chains, 3 draws")
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--draws", type=int, default=None, help="draws per chain (default 8; 3 with --quick)")
    ap.add_argument("--chains", type=int, default=None, help="chains per component (default 4; 2 with --quick)")
    ap.add_argument("--components", default=None, help=f"comma-separated (default {FULL_COMPONENTS}; "
                                                        f"{QUICK_COMPONENTS} with --quick); full is always added")
    ap.add_argument("--skip-service", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in this process (default: 1 on cpu, "
                                                                "torch's own on cuda; a shared CPU times steadier)")
    ap.add_argument("--tokenizer", default=None, help="gpt-neox-20b.json (default: $SPECTRO_TOKENIZER_DIR, "
                                                      "else shared/tokenizers beside the repository)")
    args = ap.parse_args(argv)
    try:
        device = check_device(args.device)
    except NoCuda as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.threads or device == "cpu":
        torch.set_num_threads(args.threads or 1)
    draws, chains = args.draws or (3 if args.quick else 8), args.chains or (2 if args.quick else 4)
    components = (args.components or (QUICK_COMPONENTS if args.quick else FULL_COMPONENTS)).split(",")
    t_start = time.perf_counter()
    report = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "quick": args.quick,
              "torch_threads": torch.get_num_threads(),
              "device_info": describe_device(device)}
    print("device: " + json.dumps(report["device_info"]), flush=True)

    from spectro import pipeline

    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    if args.quick:
        model_source = "embedded"
    else:
        from common import TOKENIZER, write_pythia14m_checkpoint

        tokenizer = Path(args.tokenizer) if args.tokenizer else TOKENIZER
        if not tokenizer.is_file():
            print(f"gpu_check: the GPT-NeoX-20B tokenizer is not at {tokenizer}; pass "
                  f"--tokenizer or set SPECTRO_TOKENIZER_DIR (or use --quick for the embedded model)", file=sys.stderr)
            return 2
        model_source = str(write_pythia14m_checkpoint(work / "pythia14m", tokenizer))
    config = workload_config(model_source, components, chains, draws, device, args.quick)
    prepared = pipeline.prepare(config)
    p = prepared.problem
    report["workload"] = {"model": "embedded" if args.quick else "pythia-14m shape (random fp16 weights)",
                          "components": [c.name for c in prepared.components], "chains": chains, "draws": draws,
                          "seq_len": int(p.probe_ids.shape[1]), "probe_tokens": p.n_probe_tokens,
                          "batch_size": config.sampler.batch_size, "init_loss": p.init_loss,
                          "problem_device": str(p.device)}
    print(f"\nin-process: {len(prepared.components)} components x {chains} chains x {draws} draws, "
          f"{p.n_probe_tokens} probe tokens, on {p.device}", flush=True)
    sheet = report["device_info"].get("datasheet")
    failed = []

    def part(name, fn, *a):
        """One part of the check; a failure is recorded (type, message, traceback) and the next part runs."""
        try:
            report[name] = fn(*a)
        except Exception as exc:                 # noqa: BLE001 - a GPU run should report every part it can
            import traceback

            failed.append(name)
            report[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            print(f"  {name} FAILED: {type(exc).__name__}: {exc}", flush=True)

    with precision(device, False):
        part("fused_vs_float64", fused_against_float64, prepared)
    part("in_process", in_process, prepared, device, sheet)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()             # the actors get the GPU's memory, not this process's cache
    if args.skip_service:
        report["service"] = None
    else:
        print("\nservice:", flush=True)
        part("service", service_run, model_source, device, args.quick, draws,
             [c.name for c in prepared.components if c.name != "full"])
    if report["service"] is not None and report["service"].get("returncode", 0) != 0:
        failed.append("service")
    report["failed"] = failed
    report["total_s"] = time.perf_counter() - t_start
    final_table(report)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nwrote {args.out} ({report['total_s']:.1f} s)")
    shutil.rmtree(work, ignore_errors=True)
    if args.quick and report["service"] and "run_dir" in report["service"]:
        shutil.rmtree(report["service"]["run_dir"], ignore_errors=True)
    if failed:
        print(f"gpu_check: failed: {', '.join(failed)} (errors in {args.out})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
