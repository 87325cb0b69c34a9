"""Datasheet figures of the GPUs a cost plan can be made for (`plan.gpu`): what the
config validates names against and what `spectro.plan` divides FLOPs and bytes by."""

from __future__ import annotations

from dataclasses import dataclass


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
