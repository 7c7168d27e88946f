"""Full-size TADiSR (random weights) on a CUDA GPU: wall time, FLOPs per tile, utilisation, peak VRAM.

    python benchmarks/bench_gpu_full.py                 # CUDA: everything below, bf16
    python benchmarks/bench_gpu_full.py --dry-run       # any machine: FLOPs per tile on the meta device

Measures
  * FLOPs of one tile (encode / denoise / decode) with torch.utils.flop_counter.FlopCounterMode;
  * the bf16 matmul rate of this GPU (8192^3 GEMMs) and the model's achieved fraction of it;
  * wall time of a 1024 -> 4096 upscale (tile 768, overlap 256, auto tile batch) and the summed
    model-forward time inside it (pipeline overhead = wall / model);
  * peak VRAM of one tile for tile sizes 512 / 768 / 1024 (weights excluded and included).
Random weights give meaningless images but the real compute and memory. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tadisr_core.devices import configure_model  # noqa: E402
from tadisr_core.model import build_model, random_prompt  # noqa: E402
from tadisr_core.pipeline import upscale  # noqa: E402
from tadisr_core.spec import full_spec  # noqa: E402


def tile_flops(model, tile: int, device, capture: bool | None = None) -> dict[str, int]:
    """FLOPs of one tile through encode, denoise and decode (counted by FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(1, 3, tile, tile, device=device, dtype=torch.float32) if device.type != "meta" else \
        torch.empty(1, 3, tile, tile, device=device, dtype=torch.float32)
    out = {}
    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            enc = model.encode(x)
        out["encode"] = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            den = model.denoise(enc.latents, capture=capture)
        out["denoise"] = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            model.decode(den.latents, enc.skips, den.attention if model.needs_attention else None)
        out["decode"] = fc.get_total_flops()
    out["total"] = sum(out.values())
    return out


def matmul_rate(device, dtype=torch.bfloat16, n: int = 8192, iters: int = 20) -> float:
    """Measured dense matmul FLOP/s at `dtype`."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n ** 3 * iters / (time.perf_counter() - t)


def timed_model(model, device):
    """Wrap encode/denoise/decode to sum their (synchronised) time; returns the accumulator."""
    acc = {"seconds": 0.0, "calls": 0}
    for name in ("encode", "denoise", "decode"):
        real = getattr(model, name)

        def wrapped(*a, _real=real, **k):
            torch.cuda.synchronize(device)
            t = time.perf_counter()
            r = _real(*a, **k)
            torch.cuda.synchronize(device)
            acc["seconds"] += time.perf_counter() - t
            acc["calls"] += 1
            return r

        setattr(model, name, wrapped)
    return acc


def peak_vram(model, tile: int, device) -> dict[str, float]:
    """Peak allocated bytes (GiB) of one tile's forward, beyond and including the weights."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    x = torch.rand(1, 3, tile, tile, device=device)
    with torch.no_grad():
        t = time.perf_counter()
        model(x)
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated(device)
    return {"tile": tile, "activations_gib": round((peak - base) / 2 ** 30, 3),
            "total_gib": round(peak / 2 ** 30, 3), "seconds_per_tile": round(seconds, 4)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="only count FLOPs on the meta device (no GPU needed)")
    p.add_argument("--variant", default="official-kolors", choices=("official-kolors", "paper"))
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--tiles", type=int, nargs="+", default=[512, 768, 1024])
    p.add_argument("--input", type=int, default=1024, help="LR side for the wall-time run (x4 output)")
    p.add_argument("--tile-batch", default="auto")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args(argv)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    spec = full_spec(args.variant)
    result: dict = {"variant": args.variant, "dtype": args.dtype, "date": time.strftime("%Y-%m-%d")}

    if args.dry_run or not torch.cuda.is_available():
        if not args.dry_run:
            print("no CUDA device: running --dry-run (FLOPs on the meta device only)", file=sys.stderr)
        device = torch.device("meta")
        model = build_model(spec, device=device, prompt=random_prompt(spec)).eval()
        configure_model(model, dtype)
        result["device"] = "meta (FLOP count only)"
        result["flops_per_tile"] = {t: tile_flops(model, t, device) for t in args.tiles}
        _emit(result, args.out)
        return 0

    device = torch.device("cuda")
    result["device"] = torch.cuda.get_device_name(device)
    result["torch"] = torch.__version__
    t = time.perf_counter()
    model = build_model(spec, device=device, prompt=random_prompt(spec), seed=0).eval().requires_grad_(False)
    configure_model(model, dtype)
    result["build_seconds"] = round(time.perf_counter() - t, 2)
    result["weights_gib"] = round(torch.cuda.memory_allocated(device) / 2 ** 30, 3)
    rate = matmul_rate(device, dtype)
    result["matmul_tflops"] = round(rate / 1e12, 1)
    result["flops_per_tile"] = {tile: tile_flops(model, tile, device) for tile in args.tiles}
    result["peak_vram"] = [peak_vram(model, tile, device) for tile in args.tiles]
    for row in result["peak_vram"]:
        flops = result["flops_per_tile"][row["tile"]]["total"]
        row["achieved_tflops"] = round(flops / row["seconds_per_tile"] / 1e12, 1)
        row["fraction_of_matmul_rate"] = round(flops / row["seconds_per_tile"] / rate, 3)

    lr = torch.rand(1, 3, args.input, args.input)
    upscale(model, lr[:, :, :64, :64], 4, tile=768, overlap=256, tile_batch=1)   # warm-up
    acc = timed_model(model, device)
    torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    tile_batch = args.tile_batch if args.tile_batch == "auto" else int(args.tile_batch)
    out = upscale(model, lr, 4, tile=768, overlap=256, tile_batch=tile_batch)
    torch.cuda.synchronize(device)
    wall = time.perf_counter() - t
    result["upscale"] = {"input": args.input, "output": list(out.image.shape[-2:]), "tiles": len(out.grid),
                         "wall_seconds": round(wall, 3), "model_seconds": round(acc["seconds"], 3),
                         "overhead": round(wall / acc["seconds"], 4),
                         "peak_vram_gib": round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 3)}
    _emit(result, args.out)
    return 0


def _emit(result: dict, out: Path | None) -> None:
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if out is not None:
        out.write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
