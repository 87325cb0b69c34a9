"""benchmarks/gpu_check.py on the CPU: the quick config runs end to end (in-process draws in the three
precision settings and a one-actor service run) and writes real figures; --device cuda without CUDA
stops with one line and exit code 2. What it prints on a GPU is not checked here (no GPU)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_quick_cpu_run_writes_real_figures(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out)],
                          cwd=str(ROOT), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device_info"]["device"] == "cpu" and report["failed"] == []
    settings = report["in_process"]["settings"]
    assert set(settings) == {"float32", "tf32", "bf16"}
    assert settings["tf32"]["applied"]["tf32"].startswith("skipped")      # a CUDA setting, recorded as skipped
    for data in settings.values():
        assert set(data["components"]) == {"full", "l1h1", "l2.mlp"}
        for c in data["components"].values():
            assert c["median_s_per_draw"] > 0 and c["first_draw_s"] > 0
            assert c["flops_per_draw"] > 0 and math.isfinite(c["achieved_tflops"]) and c["achieved_tflops"] > 0
            assert c["of_datasheet"] is None and not c["diverged"]
    fused = report["fused_vs_float64"]
    assert fused["n"] > 0 and 0.0 <= fused["max"] < 1e-3       # whole model in float32 against float64
    diffs = report["in_process"]["differences"]
    # TF32 is off on a CPU: the same chains give the same numbers; bf16 observables round, but not far
    assert diffs["tf32"]["all_components_probe_loss"]["max"] == 0.0
    bf16 = diffs["bf16"]["all_components_probe_loss"]
    assert bf16["n"] > 0 and 0.0 < bf16["median"] <= bf16["max"] < 0.5
    for name in ("l1h1", "l2.mlp"):
        chi = diffs["bf16"]["per_component"][name]["chi"]
        assert math.isfinite(chi["max_abs_over_sd"]) and math.isfinite(chi["pearson_r"])
    svc = report["service"]
    assert svc["returncode"] == 0, svc
    assert svc["seconds"] > 0 and svc["draws_per_second"] > 0 and 0 < svc["actor_utilisation"] <= 1
    assert "not recorded" in svc["gpu_memory_per_actor"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_gpu_is_one_line_and_exit_2(tmp_path):
    out = tmp_path / "never.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda", "--out", str(out)],
                          cwd=str(ROOT), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0], proc.stderr
    assert proc.stdout == "" and not out.exists()
