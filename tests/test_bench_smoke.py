"""Benchmark scripts kept from rotting: the GPU benchmark's CPU smoke mode (the same code path on the tiny
model) and the Kolors listing benchmark."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGE_KEYS = {"median_s", "min_s", "max_s", "spread", "n", "peak_activation_gib", "flop", "achieved_tflops",
              "fraction_of_measured_matmul"}


def test_bench_gpu_full_smoke_mode(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_gpu_full.py"), "--smoke", "--repeats", "2",
           "--warmup", "1", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["schema"] == "tadisr-bench-gpu/2" and report["lora"] == "merged"
    stages = report["tiles"]["64"]["stages"]
    assert set(stages) == {"encode", "unet", "decode_joint", "decode_image_only", "tile_joint", "tile_image_only"}
    for row in stages.values():
        assert STAGE_KEYS <= set(row) and row["n"] == 2 and row["min_s"] <= row["median_s"] <= row["max_s"]
        assert row["flop"] > 0
    assert stages["decode_image_only"]["flop"] < stages["decode_joint"]["flop"]
    assert stages["tile_joint"]["output_mp_per_s"] > 0
    assert stages["tile_joint"]["flop"] == sum(stages[k]["flop"] for k in ("encode", "unet", "decode_joint"))


def test_bench_kolors_listing_runs():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_kolors_listing.py"), "--files", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["files"] == 2 and report["keys_per_file"] > 2500
    assert {"first_listing_ms_per_file", "refresh_ms_per_file", "full_checks_ms_per_file"} <= set(report)
