"""Full-size TADiSR (random weights) on a CUDA GPU: per-stage times, peak VRAM, MP/s and FLOP utilisation.

    python benchmarks/bench_gpu_full.py                     # CUDA, bf16, tile 768: the full report (JSON)
    python benchmarks/bench_gpu_full.py --flops-only        # any machine: FLOPs per tile / job on the meta device
    python benchmarks/bench_gpu_full.py --smoke             # CPU: the same code path on the tiny model (tests)

How it measures (so the first GPU run is right):
  * the model is built on the meta device, cast there to the target dtype and materialised straight on
    the GPU (`to_empty`, then seeded random values in place): no fp32 copy on the GPU or the host;
  * the LoRA is merged as loading does by default (`--keep-lora` keeps it separate);
  * every measurement is warmed up at the measured tile size, then repeated `--repeats` times and
    reported as median, min, max and relative spread ((max - min) / median);
  * stages are timed separately with CUDA events: encode, UNet (one-step denoise), decode with the
    mask (joint) and decode image-only; a whole tile both ways; peak VRAM of each; output MP/s;
  * FLOPs come from `torch.utils.flop_counter` on a meta copy of the same model, and the fraction of
    the bf16 peak is FLOPs / time / peak, for the measured dense-matmul rate (8192^3 GEMMs) and, with
    `--peak-tflops`, the datasheet number;
  * `--job` adds a whole 1024 -> 4096 upscale (64 tiles), with and without the mask;
  * each stage's output is checked once for NaN / inf (on its untimed peak-memory run: `finite`);
  * `--out` is rewritten after every step (build, matmul rate, each tile size, each job mode), and a
    stage, tile size or job that fails records its error and the run goes on, so a late failure or a
    timeout keeps what was measured before it (`"complete": false` until the end).
Random weights give meaningless images but the real compute and memory. Output schema: RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tadisr_core.devices import COMPUTE_DTYPES, place_model  # noqa: E402
from tadisr_core.files import atomic_path  # noqa: E402
from tadisr_core.model import build_model, random_prompt  # noqa: E402
from tadisr_core.pipeline import upscale  # noqa: E402
from tadisr_core.spec import full_spec, tiny_spec  # noqa: E402


# -- building ------------------------------------------------------------------------------------
def build_on_device(spec, device: torch.device, dtype: torch.dtype, merge_lora: bool = True, seed: int = 0):
    """Meta build -> dtype -> materialised on `device` with seeded random values; LoRA merged by default."""
    model = build_model(spec, device="meta")
    place_model(model, None, dtype)                    # fp16 keeps the VAE in fp32, as loading does
    model.to_empty(device=device)
    _random_fill_(model, seed)
    model.set_prompt(random_prompt(spec, seed=seed))  # buffers are not kept by to_empty
    return model.for_inference(merge_lora=merge_lora)


@torch.no_grad()
def _random_fill_(model, seed: int) -> None:
    """Fan-in-scaled normal weights, zero biases, unit norm weights: finite activations in bf16."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim >= 2:
            fan_in = p[0].numel()
            p.normal_(0.0, fan_in ** -0.5, generator=g)
        elif leaf == "weight":           # 1-D weights are norm scales
            p.fill_(1.0)
        elif leaf in ("a_l", "a_r", "b_l", "b_r"):
            p.normal_(0.0, 0.1, generator=g)
        else:
            p.zero_()


# -- FLOPs ---------------------------------------------------------------------------------------
@torch.no_grad()
def stage_flops(model, tile: int) -> dict[str, int]:
    """FLOPs of one tile per stage (steady state: the prompt's K/V cache filled), on any device."""
    from torch.utils.flop_counter import FlopCounterMode

    device = model.device
    x = torch.empty(1, 3, tile, tile, device=device) if device.type == "meta" else torch.rand(1, 3, tile, tile,
                                                                                               device=device)
    model.denoise(model.encode(x[..., :64, :64]).latents, capture=model.needs_capture(True))  # fill the K/V cache

    def count(fn: Callable[[], object]) -> tuple[int, object]:
        with FlopCounterMode(display=False) as fc:
            out = fn()
        return fc.get_total_flops(), out

    out: dict[str, int] = {}
    out["encode"], enc = count(lambda: model.encode(x))
    out["unet"], den = count(lambda: model.denoise(enc.latents, capture=model.needs_capture(True)))
    att = den.attention if model.needs_attention else None
    out["decode_joint"], _ = count(lambda: model.decode(den.latents, enc.skips, att))
    out["decode_image_only"], _ = count(lambda: model.decode(den.latents, enc.skips, att, mask=False))
    out["tile_joint"] = out["encode"] + out["unet"] + out["decode_joint"]
    out["tile_image_only"] = out["encode"] + out["unet"] + out["decode_image_only"]
    return out


def job_tiles(lr: int = 1024, scale: float = 4, tile: int = 768, overlap: int = 256) -> int:
    """Tiles of one LR `lr` x `lr` -> x`scale` job."""
    from tadisr_core.tiling import make_grid

    side = int(round(lr * scale))
    return len(make_grid(side, side, tile, overlap, multiple=8))


def flops_report(variant: str, dtype: torch.dtype, tiles: list[int], merge_lora: bool = True) -> dict:
    """FLOPs per tile (per stage) and per 1024 -> 4096 job, counted on the meta device."""
    model = build_model(full_spec(variant), device="meta", prompt=random_prompt(full_spec(variant)))
    place_model(model, None, dtype)
    model.for_inference(merge_lora=merge_lora)
    per_tile = {t: stage_flops(model, t) for t in tiles}
    report = {"per_tile_tflop": {t: {k: round(v / 1e12, 3) for k, v in f.items()} for t, f in per_tile.items()}}
    if 768 in per_tile:
        n = job_tiles()
        report["job_1024_to_4096"] = {"tiles": n, **{k: round(n * per_tile[768][k] / 1e15, 3) for k in
                                                     ("tile_joint", "tile_image_only")}, "unit": "PFLOP"}
    return report


# -- timing --------------------------------------------------------------------------------------
class Timer:
    """Synchronised wall time of a callable on `device` (CUDA events on GPUs)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(self.device)
            return start.elapsed_time(end) / 1e3
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t


def summary(seconds: list[float]) -> dict:
    """Median, min, max and relative spread of repeated timings."""
    med = statistics.median(seconds)
    return {"median_s": round(med, 5), "min_s": round(min(seconds), 5), "max_s": round(max(seconds), 5),
            "spread": round((max(seconds) - min(seconds)) / med, 4) if med > 0 else 0.0, "n": len(seconds)}


def _peak_bytes(device: torch.device, fn: Callable[[], object]) -> tuple[int | None, object]:
    """Peak allocated bytes of one run of `fn` beyond what was allocated before it (None off CUDA), and its output."""
    if device.type != "cuda":
        return None, fn()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base, out


def all_finite(out) -> bool:
    """Whether every floating tensor in a stage's output (tensors, dataclasses, lists, tuples, dicts) is finite."""
    if isinstance(out, torch.Tensor):
        return not out.is_floating_point() or bool(torch.isfinite(out).all())
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return all(all_finite(getattr(out, f.name)) for f in dataclasses.fields(out))
    if isinstance(out, (list, tuple)):
        return all(all_finite(o) for o in out)
    if isinstance(out, dict):
        return all(all_finite(o) for o in out.values())
    return True


def error_text(exc: BaseException) -> str:
    """`Type: message`, cut to 500 characters, for the report."""
    return f"{type(exc).__name__}: {exc}"[:500]


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


@torch.no_grad()
def stage_times(model, tile: int, repeats: int, warmup: int, batch: int = 1) -> dict[str, dict]:
    """Per-stage timings of `batch` tiles of `tile` px: warm-up at that size, then `repeats` runs each."""
    device, timer = model.device, Timer(model.device)
    x = torch.rand(batch, 3, tile, tile, device=device)
    capture = model.needs_capture(True)
    enc = model.encode(x)
    den = model.denoise(enc.latents, capture=capture)
    att = den.attention if model.needs_attention else None
    runs: dict[str, Callable[[], object]] = {
        "encode": lambda: model.encode(x),
        "unet": lambda: model.denoise(enc.latents, capture=capture),
        "decode_joint": lambda: model.decode(den.latents, enc.skips, att),
        "decode_image_only": lambda: model.decode(den.latents, enc.skips, att, mask=False),
        "tile_joint": lambda: model(x),
        "tile_image_only": lambda: model(x, mask=False),
    }
    out = {}
    for name, fn in runs.items():
        try:
            for _ in range(warmup):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            peak, result = _peak_bytes(device, fn)
            finite = all_finite(result)  # once per stage, outside the timed runs
            del result
            row = summary([timer(fn) for _ in range(repeats)])
        except Exception as exc:  # a failed stage (out of memory, say) is recorded, the rest run
            out[name] = {"error": error_text(exc)}
            _free(device)
            continue
        row["finite"] = finite
        row["peak_activation_gib"] = None if peak is None else round(peak / 2 ** 30, 3)
        if name.startswith("tile_"):
            row["output_mp_per_s"] = round(batch * tile * tile / 1e6 / row["median_s"], 3)
        out[name] = row
    return out


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 8192, iters: int = 20) -> float:
    """Measured dense matmul FLOP/s at `dtype` (median of 3 runs)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    timer = Timer(device)
    for _ in range(3):
        a @ b
    rates = []
    for _ in range(3):
        rates.append(2 * n ** 3 * iters / timer(lambda: [a @ b for _ in range(iters)]))
    return statistics.median(rates)


@torch.no_grad()
def job_times(model, lr: int, repeats: int, on_row: Callable[[str, dict], None] | None = None) -> dict:
    """A whole lr -> 4 lr upscale (tile 768 / overlap 256, auto batch), joint and image-only; `on_row(mode, row)`
    after each mode."""
    device, timer = model.device, Timer(model.device)
    x = torch.rand(1, 3, lr, lr)
    out = {}
    for name, mask in (("joint", True), ("image_only", False)):
        try:
            upscale(model, x[..., :192, :192], 4, tile=768, overlap=256, mask=mask)   # warm-up at the tile size
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            job = functools.partial(upscale, model, x, 4, tile=768, overlap=256, mask=mask)
            row = summary([timer(job) for _ in range(repeats)])
        except Exception as exc:  # recorded; the other mode still runs
            out[name] = {"error": error_text(exc)}
            _free(device)
            if on_row is not None:
                on_row(name, out[name])
            continue
        cuda = device.type == "cuda"
        row["peak_vram_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 3) if cuda else None
        row["output_mp_per_s"] = round(16 * lr * lr / 1e6 / row["median_s"], 3)
        out[name] = row
        if on_row is not None:
            on_row(name, row)
    return out


def run(args, save: Callable[[dict], None] = lambda result: None) -> dict:
    """The whole report as a dict (see RESULTS.md for the schema); `save(result)` after every step."""
    dtype = COMPUTE_DTYPES[args.dtype]
    result: dict = {"schema": "tadisr-bench-gpu/3", "variant": args.variant, "dtype": args.dtype,
                    "lora": "separate" if args.keep_lora else "merged", "date": time.strftime("%Y-%m-%d"),
                    "torch": torch.__version__, "complete": False}
    if args.flops_only:
        result["device"] = "meta (FLOP count only)"
        result["flops"] = flops_report(args.variant, dtype, args.tiles, not args.keep_lora)
        result["complete"] = True
        return result
    smoke = args.smoke
    device = torch.device("cpu" if smoke else "cuda")
    spec = tiny_spec(args.variant) if smoke else full_spec(args.variant)
    result["device"] = "cpu (smoke: tiny model)" if smoke else torch.cuda.get_device_name(device)
    if device.type == "cuda":
        result["cuda"] = torch.version.cuda
        result["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2 ** 30, 1)
    save(result)
    t = time.perf_counter()
    model = build_on_device(spec, device, dtype, merge_lora=not args.keep_lora)
    result["build_s"] = round(time.perf_counter() - t, 2)
    if device.type == "cuda":
        result["weights_gib"] = round(torch.cuda.memory_allocated(device) / 2 ** 30, 3)
    flops_model = build_model(spec, device="meta", prompt=random_prompt(spec))
    place_model(flops_model, None, dtype)
    flops_model.for_inference(merge_lora=not args.keep_lora)
    rate = matmul_rate(device, dtype, n=256 if smoke else 8192, iters=2 if smoke else 20)
    result["matmul_tflops_measured"] = round(rate / 1e12, 3)
    if args.peak_tflops:
        result["peak_tflops_datasheet"] = args.peak_tflops
    result["tiles"] = {}
    save(result)
    for tile in args.tiles:
        try:
            flops = stage_flops(flops_model, tile)
            times = stage_times(model, tile, args.repeats, args.warmup, args.tile_batch)
        except Exception as exc:  # this tile size failed as a whole; the next one still runs
            result["tiles"][str(tile)] = {"batch": args.tile_batch, "error": error_text(exc)}
            _free(device)
            save(result)
            continue
        for name, row in times.items():
            if "error" in row:
                continue
            achieved = args.tile_batch * flops[name] / row["median_s"]
            row["flop"] = args.tile_batch * flops[name]
            row["achieved_tflops"] = round(achieved / 1e12, 4)
            row["fraction_of_measured_matmul"] = round(achieved / rate, 4)
            if args.peak_tflops:
                row["fraction_of_datasheet_peak"] = round(achieved / (args.peak_tflops * 1e12), 4)
        result["tiles"][str(tile)] = {"batch": args.tile_batch, "stages": times}
        save(result)
    if args.job:
        result["job"] = {"input": args.input, "output": 4 * args.input}

        def on_row(name: str, row: dict) -> None:
            result["job"][name] = row
            save(result)

        job_times(model, args.input, args.job_repeats, on_row)
    result["complete"] = True
    return result


def write_json(path: Path, result: dict) -> None:
    """Write `result` to `path` through a temporary file (`files.atomic_path`), so a kill mid-write leaves the
    last whole report."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, tile 64: the same code path, in seconds")
    p.add_argument("--flops-only", action="store_true", help="only count FLOPs on the meta device (no GPU needed)")
    p.add_argument("--variant", default="release", choices=("release", "paper"))
    p.add_argument("--dtype", default=None, choices=tuple(COMPUTE_DTYPES), help="default bf16 (fp32 with --smoke)")
    p.add_argument("--tiles", type=int, nargs="+", default=None, help="tile sizes (default 768; 64 with --smoke)")
    p.add_argument("--tile-batch", type=int, default=1, help="tiles per forward in the stage timings")
    p.add_argument("--repeats", type=int, default=10, help="timed repeats per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs at the measured tile before timing")
    p.add_argument("--keep-lora", action="store_true", help="keep the LoRA separate (default: merged)")
    p.add_argument("--peak-tflops", type=float, help="datasheet dense bf16 TFLOP/s of this GPU, for the fraction")
    p.add_argument("--job", action="store_true", help="also time a whole upscale (--input px, x4)")
    p.add_argument("--input", type=int, default=1024, help="LR side of the --job upscale")
    p.add_argument("--job-repeats", type=int, default=3)
    p.add_argument("--out", type=Path, help="also write the JSON here, rewritten after every step")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("fp32" if args.smoke else "bf16")
    args.tiles = args.tiles or ([64] if args.smoke else [768])
    if not (args.smoke or args.flops_only or torch.cuda.is_available()):
        print("no CUDA device: use --smoke (CPU, tiny model) or --flops-only (meta device)", file=sys.stderr)
        return 2
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    save = (lambda result: write_json(args.out, result)) if args.out is not None else (lambda result: None)
    result = run(args, save)
    save(result)
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
