"""CPU benchmark of the tiled pipeline on the tiny random model (no weights needed).

    python benchmarks/bench_pipeline_cpu.py [--threads 2] [--quick] [--out results.json]

1. Overhead: wall time of `upscale` / summed model-forward time (encode + denoise + decode).
   Goal <= 1.05: tiling, padding, blending and canvases must cost next to nothing.
2. Time versus output area at tile 256 / overlap 64: seconds per output megapixel and per
   tile megapixel (tiles x tile area, the work actually done). Goal: linear.
3. Peak RSS for 256 and 1024 px inputs (x4, tile 768 / overlap 256), each in a fresh process:
   growth during the upscale versus the canvases (input 3 ch + SR 3 ch + mask 1 ch, float32).
   Goal: bounded by the canvases plus one tile's activations. Run twice: with the tiny model, and
   with a stand-in model of negligible activations (`--stub`: pooling / nearest upsampling with
   the model's interface), which isolates what the pipeline itself holds.
4. Modes (`modes`): process CPU time of one 256 / 768 px tile, joint (image + text mask) vs
   image-only (`mask=False`), both variants, 1 thread, LoRA active and merged.

Wall times on a shared machine are noisy; `cpu_s` (process CPU time) is reported beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _setup(threads: int):
    import torch

    torch.set_num_threads(threads)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    from tadisr_core.model import build_model, random_prompt
    from tadisr_core.spec import tiny_spec

    spec = tiny_spec("release")
    return build_model(spec, prompt=random_prompt(spec), seed=0).eval().requires_grad_(False)


class StubModel:
    """The model interface with next to no compute or activations (pipeline-only measurements)."""

    needs_attention = False
    image_reads_mask = False

    def needs_capture(self, mask=True):
        return False

    def __init__(self):
        import torch

        from tadisr_core.model import Decoded, Denoised, Encoded

        self._types = (Encoded, Denoised, Decoded)
        self.device = torch.device("cpu")
        self.vae = type("V", (), {})()
        self.vae.encoder = type("E", (), {})()
        self.vae.encoder.conv_in = type("C", (), {"weight": torch.zeros(1, 1, 1, 1)})()

    def encode(self, x, generator=None, sample=False):
        import torch.nn.functional as F

        z = F.avg_pool2d(x, 8)
        return self._types[0](_cat(z, z[:, :1]), None)

    def denoise(self, latents, capture=None):
        return self._types[1](latents, None)

    def decode(self, latents, skips, attention=None, mask=True):
        import torch.nn.functional as F

        up = F.interpolate(latents, scale_factor=8, mode="nearest")
        return self._types[2](up[:, :3], up[:, 3:4] if mask else None)


def _cat(a, b):
    import torch

    return torch.cat([a, b], dim=1)


def _instrument(model) -> dict:
    acc = {"seconds": 0.0}
    for name in ("encode", "denoise", "decode"):
        real = getattr(model, name)

        def wrapped(*a, _real=real, **k):
            t = time.perf_counter()
            r = _real(*a, **k)
            acc["seconds"] += time.perf_counter() - t
            return r

        setattr(model, name, wrapped)
    return acc


def _run(model, acc, side: int, tile: int, overlap: int, tile_batch=1) -> dict:
    import torch

    from tadisr_core.pipeline import upscale

    x = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(side))
    acc["seconds"] = 0.0
    t, c = time.perf_counter(), time.process_time()
    out = upscale(model, x, 4, tile=tile, overlap=overlap, tile_batch=tile_batch)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    grid = out.grid
    tile_mp = len(grid) * grid.tile_h * grid.tile_w / 1e6
    return {"input": side, "output": 4 * side, "tiles": len(grid), "tile": [grid.tile_h, grid.tile_w],
            "wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "cpu_s_per_tile_mp": round(cpu / tile_mp, 3),
            "model_s": round(acc["seconds"], 3),
            "overhead": round(wall / acc["seconds"], 4),
            "s_per_output_mp": round(wall / (16 * side * side / 1e6), 3),
            "s_per_tile_mp": round(wall / (len(grid) * grid.tile_h * grid.tile_w / 1e6), 3)}


def _tile_modes(threads: int, tile: int, repeats: int) -> dict:
    """Process CPU time of one `tile` px tile, joint vs image-only, per variant (LoRA active and merged)."""
    import statistics

    import torch

    from tadisr_core.model import build_model, random_prompt
    from tadisr_core.pipeline import upscale
    from tadisr_core.spec import tiny_spec

    torch.set_num_threads(threads)
    out = {"tile": tile, "repeats": repeats}
    for variant in ("release", "paper"):
        spec = tiny_spec(variant)
        model = build_model(spec, prompt=random_prompt(spec, seed=3), seed=11)
        g = torch.Generator().manual_seed(12)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_B." in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        model.for_inference()
        x = torch.rand(1, 3, tile // 4, tile // 4, generator=torch.Generator().manual_seed(1))
        for mode, mask in (("joint", True), ("image_only", False)):
            upscale(model, x, 4, tile=tile, overlap=0, tile_batch=1, mask=mask)      # warm-up at the tile
            cpu = []
            for _ in range(repeats):
                c = time.process_time()
                upscale(model, x, 4, tile=tile, overlap=0, tile_batch=1, mask=mask)
                cpu.append(time.process_time() - c)
            out[f"{variant}/{mode}"] = {"median_cpu_s": round(statistics.median(cpu), 4),
                                        "min_cpu_s": round(min(cpu), 4), "max_cpu_s": round(max(cpu), 4)}
    return out


def _rss_child(side: int, threads: int, stub: bool) -> None:
    """Run in a fresh process: print peak RSS growth of one upscale (Linux /proc)."""
    import torch

    from tadisr_core.pipeline import upscale

    torch.set_num_threads(threads)
    model = StubModel() if stub else _setup(threads)
    upscale(model, torch.rand(1, 3, 16, 16), 4, tile=768, overlap=256, tile_batch=1)   # warm-up
    x = torch.rand(1, 3, side, side)
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")        # reset the VmHWM high-water mark
    t = time.perf_counter()
    out = upscale(model, x, 4, tile=768, overlap=256, tile_batch=1)
    wall = time.perf_counter() - t
    peak = _status("VmHWM")
    h, w = out.image.shape[-2:]
    canvases = (3 + 3 + 1) * h * w * 4
    mb = 2 ** 20
    print(json.dumps({"model": "stub" if stub else "tiny", "input": side, "output": [h, w], "tiles": len(out.grid),
                      "wall_s": round(wall, 2), "rss_before_mb": round(before / mb, 1),
                      "peak_growth_mb": round((peak - before) / mb, 1), "canvases_mb": round(canvases / mb, 1)}))


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--quick", action="store_true", help="smaller sizes, no 1024 px RSS run")
    p.add_argument("--sections", default="overhead,scaling,rss,rss-stub,modes",
                   help="comma-separated subset of overhead, scaling, rss, rss-stub, modes (joint vs image-only)")
    p.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--stub", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.rss_child:
        _rss_child(args.rss_child, args.threads, args.stub)
        return 0
    sections = set(args.sections.split(","))

    import torch

    model = _setup(args.threads)
    acc = _instrument(model)
    _run(model, acc, 16, 64, 16)                               # warm-up
    report = {"cpu": _cpu_name(), "cores": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "load_average_start": os.getloadavg()}

    sides = [48, 96, 144] if args.quick else [64, 96, 128, 160, 192]
    if "overhead" in sections:
        report["overhead"] = [_run(model, acc, s, 768, 256) for s in ([64, 128] if args.quick else [128, 256])]
    if "modes" in sections:
        report["tile_modes"] = [_tile_modes(1, t, 3 if t > 256 else 5) for t in ([256] if args.quick else [256, 768])]
    if "scaling" in sections:
        report["scaling_tile256"] = [_run(model, acc, s, 256, 64) for s in sides]
    for name, stub, rss_sides in (("rss", False, [64, 128] if args.quick else [256, 1024]),
                                  ("rss-stub", True, [256, 512, 1024] if args.quick else [256, 512, 1024, 2048])):
        if name not in sections:
            continue
        report[name] = []
        for side in rss_sides:
            cmd = [sys.executable, __file__, "--rss-child", str(side), "--threads", str(args.threads)]
            proc = subprocess.run(cmd + (["--stub"] if stub else []), capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(proc.stderr)
            report[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    report["load_average_end"] = os.getloadavg()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
