"""The GPU path on CPUs: GPU requests, per-actor settings (TF32, memory cap),
bf16 evaluation, and a Ray cluster that declares GPUs (Ray schedules on the
declared resource; torch then sees no CUDA, which is exactly what a CPU test
of this logic can check). Nothing here has run on a real GPU."""

import numpy as np
import pytest
import torch

from spectro.config import SamplerConfig, to_config
from spectro.device import HeapTrimmer, apply_settings, eval_autocast, gpu_request, resolve_device
from spectro.errors import ConfigError
from spectro.estimator import susceptibility_from_arrays
from tests.helpers import make_store, tiny_config, tiny_problem

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA branch")


def test_gpu_request_auto_explicit_and_too_many():
    assert gpu_request(None, 0.0, 2) == 0.0               # no GPUs: CPU actors
    assert gpu_request(None, 8.0, 2) == 1.0               # enough: one each
    assert gpu_request(None, 1.0, 4) == 0.25              # fewer GPUs than actors: an equal share
    assert gpu_request(0.5, 1.0, 2) == 0.5
    assert gpu_request(0, 4.0, 2) == 0.0                  # explicit CPU run on a GPU cluster
    with pytest.raises(ConfigError, match=r"num_gpus_per_actor=1 but the Ray cluster has 0 GPUs"):
        gpu_request(1, 0.0, 2)


@no_cuda
def test_cpu_settings_are_skipped_not_faked():
    before = torch.backends.cuda.matmul.fp32_precision
    done = apply_settings("cpu", tf32=True, memory_fraction=0.5)
    assert done == {"device": "cpu", "tf32": "skipped (not a CUDA device)",
                    "memory_fraction": "skipped (not a CUDA device)"}
    assert torch.backends.cuda.matmul.fp32_precision == before      # nothing global changed
    assert resolve_device("auto") == "cpu"
    with pytest.raises(ConfigError, match=r"device=cuda but torch sees no CUDA device.*use device=auto or device=cpu"):
        resolve_device("cuda")


def test_config_ranges_for_gpu_options():
    with pytest.raises(ConfigError, match=r"ray.gpu_memory_fraction must be in \[0, 1\] \(got 1.5\)"):
        to_config({"ray": {"gpu_memory_fraction": 1.5}})
    with pytest.raises(ConfigError, match=r"sampler.probe_dtype must be float32 or bfloat16 \(got 'float16'\)"):
        to_config({"sampler": {"probe_dtype": "float16"}})
    with pytest.raises(ConfigError, match=r"ray.num_gpus_per_actor must be >= 0 or null"):
        to_config({"ray": {"num_gpus_per_actor": -1}})


def test_eval_autocast_selects_bf16_matmuls_only_when_asked():
    a = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    with eval_autocast("cpu", "float32"):
        assert (a @ a).dtype == torch.float32
    with eval_autocast("cpu", "bfloat16"):
        assert (a @ a).dtype == torch.bfloat16


def _chi(config: SamplerConfig, problem):
    """Peer-form chi (tokens,) of one component from one unit, plus the SGLD distance traces."""
    from spectro.sampling import UnitRunner

    comp = problem.components(problem.model, ["l1.mlp"])[0]
    runner = UnitRunner(problem, comp, range(config.num_chains), config, run_seed=0)
    state, probe, sampling, dist = runner.start(), [], [], []
    for _ in range(config.num_draws):
        state, d = runner.next_draw(state)
        probe.append(d.probe_loss)
        sampling.append(d.sampling_loss)
        dist.append(d.traces["distance"])
    probe = np.stack(probe, 1).astype(np.float64)          # (chains, draws, tokens)
    sampling = np.stack(sampling, 1)                        # (chains, draws)
    chi = susceptibility_from_arrays(sampling, probe, problem.init_loss, sampling, probe, form="covariance").chi
    return chi, np.stack(dist, 1), probe


def test_bf16_evaluation_moves_chi_by_rounding_only():
    """Same chains (the SGLD steps are float32 in both), observables in bf16: the effect on chi
    is the rounding of the losses. Measured here on a tiny model; benchmarks/bench_precision.py
    measures it on the embedded model (README)."""
    problem = tiny_problem()
    base = tiny_config(num_draws=8).sampler
    chi32, dist32, probe32 = _chi(base, problem)
    chi16, dist16, probe16 = _chi(SamplerConfig(**{**base.__dict__, "probe_dtype": "bfloat16"}), problem)
    np.testing.assert_array_equal(dist32, dist16)           # identical trajectories
    assert np.abs(probe16 - probe32).max() < 0.1            # bf16 rounding of ~4-nat losses
    assert np.abs(probe16 - probe32).max() > 0              # and it is really bf16
    r = np.corrcoef(chi32, chi16)[0, 1]
    assert r > 0.9, r


@pytest.fixture(scope="module")
def ray_with_declared_gpus():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_actors_take_declared_gpus_and_refuse_cuda_without_it(ray_with_declared_gpus, tmp_path):
    ray = ray_with_declared_gpus
    from spectro.service import SamplerActor, make_payload
    from spectro.service.scheduler import _creation_error


    problem = tiny_problem()
    cfg = tiny_config()
    make_store(tmp_path / "samples.zarr", problem, cfg)
    payload = ray.put(make_payload(problem, cfg.sampler, 0, tmp_path / "samples.zarr", tmp_path))
    gpus = gpu_request(None, ray.cluster_resources()["GPU"], 2)
    assert gpus == 1.0
    actors = [SamplerActor.options(num_cpus=0.5, num_gpus=gpus).remote(payload, 1, "auto", 0.4) for _ in range(2)]
    try:
        seen = ray.get([a.describe.remote() for a in actors], timeout=120)
    finally:
        for a in actors:
            ray.kill(a)
    if not torch.cuda.is_available():
        assert [s["device"] for s in seen] == ["cpu", "cpu"]
        assert all(s["memory_fraction"] == "skipped (not a CUDA device)" for s in seen)
    assert sorted(s["gpu_ids"][0] for s in seen) == ["0", "1"]      # one declared GPU each, not shared
    assert all(s["threads"] == 1 for s in seen)
    if not torch.cuda.is_available():
        bad = SamplerActor.options(num_cpus=0.5, num_gpus=1).remote(payload, 1, "cuda", 0.0)
        with pytest.raises(ray.exceptions.RayActorError,
                           match="ConfigError: device=cuda but torch sees no CUDA device") as info:
            ray.get(bad.describe.remote(), timeout=120)
        reason = _creation_error(info.value)
        assert reason and reason.startswith("ConfigError: device=cuda but torch sees no CUDA device"), reason


_FRAGMENTED_HEAP = """
import json, psutil, torch
from spectro.device import release_host_memory
if not release_host_memory():
    print(json.dumps(None)); raise SystemExit
proc = psutil.Process()
big = torch.ones(2 << 20)                    # 8 MB, mmapped; freeing it raises glibc's mmap threshold to 8 MB
del big
blocks, pins = [], []
for _ in range(50):                          # 4 MB blocks on the heap, each followed by a live 256 KB tensor
    blocks.append(torch.ones(1 << 20))
    pins.append(torch.ones(1 << 16))
del blocks                                   # 200 MB free but resident: the pins keep the heap from shrinking
held = proc.memory_info().rss
trimmed = release_host_memory()
print(json.dumps({"trimmed": trimmed, "released": held - proc.memory_info().rss, "pins": len(pins)}))
"""


def test_release_host_memory_returns_a_fragmented_heap_to_the_os():
    """What the service calls after every draw: freed heap blocks that glibc keeps resident (a live block above
    each pins the heap, as the fused cross-entropy's small outputs did) go back to the OS. Run in a fresh
    interpreter: in a long-lived process (the test session) the small pins land in older holes of the heap, the
    big blocks end up adjacent, coalesce and are trimmed on free, and the premise does not hold (seen: 72 MB)."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _FRAGMENTED_HEAP], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result is None:
        pytest.skip("this C library has no malloc_trim (not glibc)")
    assert result["trimmed"] and result["pins"] == 50
    assert result["released"] > 150 * 2**20, f"released {result['released'] / 2**20:.0f} MB of 200"


def test_heap_trimmer_trims_only_past_the_slack_above_where_draws_settled():
    """The policy alone, on a given sequence of resident sizes (MB): the first draw after a trim sets the
    reference; a draw ending more than `slack` above it trims and clears the reference."""
    sizes = iter([500, 520, 510, 627, 629, 700, 690, 820, 640])
    trimmer = HeapTrimmer(slack_bytes=128, rss=lambda: next(sizes))
    decisions = [trimmer.after_draw() for _ in range(9)]
    #  500 ref, 520 / 510 / 627 within 500 + 128, 629 trims; 700 new ref, 690, 820 within 828, 640
    assert decisions == [False, False, False, False, True, False, False, False, False]
    assert trimmer.reference == 700
    nothing = HeapTrimmer(slack_bytes=0, rss=lambda: None)           # no /proc: never trims
    assert [nothing.after_draw() for _ in range(3)] == [False] * 3 and nothing.trims == 0
    with pytest.raises(ValueError, match="slack_bytes must be >= 0"):
        HeapTrimmer(slack_bytes=-1)


_DRAWS = """
import json, sys, torch
from spectro.device import HeapTrimmer, release_host_memory, resident_bytes
if not release_host_memory() or resident_bytes() is None:
    print(json.dumps(None)); raise SystemExit
MB = 1 << 20
trimmer = HeapTrimmer(slack_bytes=int(sys.argv[1]) * MB)
big = torch.ones(2 << 20)                    # 8 MB, mmapped; freeing it raises glibc's mmap threshold to 8 MB
del big
for _ in range(8):                           # steady draws: the same 40 MB of blocks, freed at the end of each
    blocks = [torch.ones(1 << 20) for _ in range(10)]
    del blocks
    trimmer.after_draw()
steady_trims, start = trimmer.trims, resident_bytes()
pins, peak = [], 0
for i in range(12):                          # growing draws: blocks a little larger than the last draw's holes,
    blocks = []                              # each followed by a small tensor that stays live (pins the hole)
    for _ in range(10):
        blocks.append(torch.ones((1 << 20) + (i + 1) * (1 << 15)))
        pins.append(torch.ones(1 << 12))
    del blocks
    peak = max(peak, resident_bytes())
    trimmer.after_draw()
print(json.dumps({"steady_trims": steady_trims, "growing_trims": trimmer.trims - steady_trims,
                  "growth_mb": (peak - start) / MB}))
"""


def _draws(slack_mb: int) -> dict:
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _DRAWS, str(slack_mb)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result is None:
        pytest.skip("this C library has no malloc_trim, or there is no /proc/self/statm")
    return result


def test_heap_trimmer_leaves_a_steady_heap_alone_and_bounds_a_growing_one():
    """What the service does after each draw, on a real glibc heap in a fresh interpreter. Draws that reuse
    their blocks are never trimmed (trimming them would only make the next draw fault the pages back in).
    Draws whose freed blocks cannot be reused grow the process ~42 MB each: with no trimming (slack 10 GB) by
    over 400 MB in 12 draws, with a 64 MB slack by no more than the slack plus one draw's growth."""
    control = _draws(10_000)
    assert control["steady_trims"] == 0 and control["growing_trims"] == 0
    assert control["growth_mb"] > 400, control
    bounded = _draws(64)
    assert bounded["steady_trims"] == 0
    assert bounded["growing_trims"] >= 3, bounded
    assert bounded["growth_mb"] < 64 + 2 * 42, bounded
