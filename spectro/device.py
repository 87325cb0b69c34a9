"""Where a replica runs and at what precision: device, GPU requests, TF32,
bf16 probe evaluation and CUDA memory caps. Plain torch, no Ray.

The sampling service calls `gpu_request` when it creates actors and
`apply_settings` in each actor's `__init__`; `UnitRunner` wraps its loss
evaluations in `eval_autocast`. Every function here is the whole of that GPU
path, so the CPU tests exercise the same logic a GPU run takes (what differs
is only which branch a flag selects; see README: not verified on a GPU).

Non-obvious choices:
- `num_gpus_per_actor: null` (auto) asks for GPUs only when the cluster has
  them: one per actor, or an equal share when there are fewer GPUs than
  actors (Ray packs fractional requests onto one device).
- TF32 is a CUDA setting only; on a CPU replica it is recorded as skipped
  rather than set (the CPU equivalent, reduced-precision fp32 matmuls, would
  silently change numbers on CPU).
- bf16 is applied with `torch.autocast` to the *evaluation* of losses at a
  draw (sampling set and probe tokens), never to SGLD steps: the chain's
  trajectory is the same in both settings, so the effect on chi is exactly
  the rounding of the observables (measured by benchmarks/bench_precision.py).
  Losses come out as float32 and are accumulated in float64 downstream.
- A memory cap (`torch.cuda.set_per_process_memory_fraction`) lets several
  actors share a GPU without one starving the others; an allocation beyond
  it raises CUDA OOM in that actor, which the driver treats like any actor
  death (its unit resumes from its checkpoint elsewhere).
- Host memory: torch's CPU tensors come from glibc malloc, which
  keeps freed heap pages resident; large blocks freed and reallocated many
  times per draw (the fused cross-entropy's (rows, vocab) blocks, before
  they were reused within a call) left the heap far above what is live.
  `release_host_memory` (malloc_trim) hands those pages back. Trimming is
  not free: the next draw faults the same pages back in (its cost is
  measured in docs/performance.md), so the service trims after a draw only when
  `HeapTrimmer` sees the process grow more than `slack` above where the
  unit's draws settled, and once at the end of every unit. A steady heap is
  never trimmed; a growing one is cut back before it grows by more than
  the slack. A no-op where the C library has no malloc_trim (macOS, musl)
  or /proc/self/statm is missing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
from typing import Callable, Optional

import torch

from spectro.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when this process sees a GPU, else 'cpu'; an explicit CUDA
    device on a machine without one is a ConfigError (said before any work)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device} but torch sees no CUDA device (torch {torch.__version__}, "
                          f"cuda build: {torch.version.cuda}); use device=auto or device=cpu")
    return device


def gpu_request(setting: Optional[float], cluster_gpus: float, num_actors: int) -> float:
    """GPUs each actor asks Ray for. `setting` None means: use the cluster's GPUs if it has any."""
    if setting is not None:
        if setting > 0 and cluster_gpus < setting:
            raise ConfigError(f"ray.num_gpus_per_actor={setting} but the Ray cluster has {cluster_gpus:g} GPUs; "
                              f"set ray.num_gpus_per_actor=0 (or null) to run on CPUs")
        return float(setting)
    if cluster_gpus <= 0:
        return 0.0
    return min(1.0, cluster_gpus / num_actors)


def apply_settings(device: str, tf32: bool, memory_fraction: float) -> dict:
    """Set this process's precision flags and memory cap for `device`; returns what was done."""
    done = {"device": device}
    cuda = device.startswith("cuda")
    if tf32:
        if cuda:
            torch.backends.cuda.matmul.fp32_precision = "tf32"
            torch.backends.cudnn.fp32_precision = "tf32"
            done["tf32"] = "on"
        else:
            done["tf32"] = "skipped (not a CUDA device)"
    else:
        done["tf32"] = "off"
    if memory_fraction > 0:
        if cuda:
            index = torch.device(device).index
            torch.cuda.set_per_process_memory_fraction(memory_fraction, index if index is not None else 0)
            done["memory_fraction"] = memory_fraction
        else:
            done["memory_fraction"] = "skipped (not a CUDA device)"
    return done


def eval_autocast(device: torch.device | str, dtype: str):
    """Context for evaluating losses at a draw: autocast to bf16, or nothing for float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[dtype])


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def release_host_memory() -> bool:
    """Return the C heap's free pages to the OS (glibc `malloc_trim(0)`); False where unavailable."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def resident_bytes() -> Optional[int]:
    """This process's resident set size from /proc/self/statm (a few microseconds); None off Linux."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class HeapTrimmer:
    """After each draw: trim the C heap only if the process has grown more than `slack_bytes` above its
    reference, the resident size after the first draw since the last trim (where a steady unit settles).

    `after_draw()` returns True when it trimmed. `reset()` trims unconditionally and forgets the
    reference (the service calls it when a unit ends: the next unit allocates differently)."""

    def __init__(self, slack_bytes: int = 128 << 20, rss: Callable[[], Optional[int]] = resident_bytes):
        if slack_bytes < 0:
            raise ValueError(f"slack_bytes must be >= 0, got {slack_bytes}")
        self.slack = int(slack_bytes)
        self._rss = rss
        self.reference: Optional[int] = None
        self.trims = 0

    def after_draw(self) -> bool:
        now = self._rss()
        if now is None:
            return False
        if self.reference is None:
            self.reference = now
            return False
        if now <= self.reference + self.slack:
            return False
        self.reset()
        return True

    def reset(self) -> None:
        if release_host_memory():
            self.trims += 1
        self.reference = None
