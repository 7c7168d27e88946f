"""Benchmark scripts kept from rotting: the GPU benchmark's CPU smoke mode (the same code path on the tiny
model) with its step-by-step JSON, the Kolors listing benchmark, and the device script's rehearsal."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGE_KEYS = {"median_s", "min_s", "max_s", "spread", "n", "peak_activation_gib", "flop", "achieved_tflops",
              "fraction_of_measured_matmul"}
STAGES = ("encode", "unet", "decode_joint", "decode_image_only", "tile_joint", "tile_image_only")


def test_bench_gpu_full_smoke_mode(tmp_path, capsys):
    """The command line as the device script runs it (in this process: a new one would add ten seconds of
    imports), its report written to --out and printed."""
    out = tmp_path / "bench.json"
    bench = _load_bench("bench_gpu_full")
    assert bench.main(["--smoke", "--repeats", "2", "--warmup", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert report["schema"] == "tadisr-bench-gpu/3" and report["lora"] == "merged" and report["complete"]
    stages = report["tiles"]["64"]["stages"]
    assert set(stages) == set(STAGES)
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


def _load_bench(name: str):
    """A benchmarks/ script imported as a module (they are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}_under_test", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_gpu_full_saves_each_step_and_records_failures(monkeypatch):
    """--out is rewritten after every step, a failing tile size records its error and the next one runs, and each
    stage's output is checked for NaN / inf."""
    import torch

    from tadisr_core.model import Decoded

    bench = _load_bench("bench_gpu_full")
    assert bench.all_finite(Decoded(image=torch.zeros(1, 3, 2, 2), mask_logits=None))
    assert not bench.all_finite([torch.ones(2), Decoded(image=torch.ones(1), mask_logits=torch.tensor([float("nan")]))])
    real = bench.stage_times

    def flaky(model, tile, *args, **kwargs):
        if tile == 32:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(model, tile, *args, **kwargs)

    monkeypatch.setattr(bench, "stage_times", flaky)
    # the FLOP count on the meta model is test_bench_gpu_full_smoke_mode's; here only the order of saves and errors
    monkeypatch.setattr(bench, "stage_flops", lambda model, tile: dict.fromkeys(STAGES, 1))
    snapshots = []
    ns = argparse.Namespace(smoke=True, flops_only=False, variant="release", dtype="fp32", tiles=[64, 32], tile_batch=1,
                            repeats=1, warmup=0, keep_lora=False, peak_tflops=None, job=False, input=32,
                            job_repeats=1)
    result = bench.run(ns, lambda r: snapshots.append(json.loads(json.dumps(r, default=str))))
    assert result["complete"] and result["schema"] == "tadisr-bench-gpu/3"
    assert result["tiles"]["32"]["error"].startswith("RuntimeError: CUDA out of memory")
    assert all(row["finite"] is True for row in result["tiles"]["64"]["stages"].values())
    # saved before the build, after the matmul rate and after each tile size; never complete before the end
    assert len(snapshots) == 4 and not any(s["complete"] for s in snapshots)
    assert list(snapshots[2]["tiles"]) == ["64"] and "error" in snapshots[3]["tiles"]["32"]

    # one failing stage: recorded in its row, the other stages measured
    from tadisr_core.spec import tiny_spec

    model = bench.build_on_device(tiny_spec(), torch.device("cpu"), torch.float32)
    decode = model.decode

    def joint_only(*args, mask=True, **kwargs):
        if not mask:
            raise RuntimeError("image-only failed (simulated)")
        return decode(*args, mask=mask, **kwargs)

    model.decode = joint_only
    rows = real(model, 32, repeats=1, warmup=0)
    assert {name for name, row in rows.items() if "error" in row} == {"decode_image_only", "tile_image_only"}
    assert rows["tile_joint"]["finite"] and rows["tile_joint"]["n"] == 1


def _dummy_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel (what pip needs to install it offline)."""
    import zipfile

    folder.mkdir(parents=True)
    path = folder / "tadisr_dummy-0.1-py3-none-any.whl"
    info = "tadisr_dummy-0.1.dist-info"
    files = {"tadisr_dummy/__init__.py": "",
             f"{info}/METADATA": "Metadata-Version: 2.1\nName: tadisr-dummy\nVersion: 0.1\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


@pytest.mark.slow
def test_device_bench_dry_run(tmp_path):
    """scripts/device_bench.sh's rehearsal: the wheels install offline into SITE, an unknown part is recorded and
    the next one runs (its GPU arguments parse, its CPU settings write JSON), an extra that no longer fits the
    budget is skipped, and the exit status says a part failed."""
    _dummy_wheel(tmp_path / "wheels")
    out, site = tmp_path / "out", tmp_path / "site"
    env = dict(os.environ, TADISR_BENCH_DRY="1", OUT=str(out), WHEELS=str(tmp_path / "wheels"), SITE=str(site),
               PY=sys.executable, PARTS="nosuch train_step", EXTRAS="keep_lora", BUDGET_S="100",
               OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "device_bench.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["dry"] and run["setup"]["rc"] == 0 and run["setup"]["installed"] == ["tadisr_dummy-0.1.dist-info"]
    assert (site / "tadisr_dummy" / "__init__.py").exists()
    assert run["imports"]["tadisr_core.model"].keys() == {"version", "from"}
    assert run["parts"]["nosuch"]["rc"] == 127
    assert run["parts"]["train_step"] == {"rc": 0, "seconds": run["parts"]["train_step"]["seconds"],
                                          "limit_s": run["parts"]["train_step"]["limit_s"], "timed_out": False,
                                          "device_args_parse": True}
    assert run["parts"]["keep_lora"]["skipped"]
    step = json.loads((out / "train_step.json").read_text())  # bench_train_step.py --tiny, random LPIPS weights
    assert step["s_per_step"] > 0 and step["trainable_params"] > 0
    assert step["spec"] == "tiny" and step["gradient_checkpointing"]
    assert "== done in" in (out / "device_bench.log").read_text()
