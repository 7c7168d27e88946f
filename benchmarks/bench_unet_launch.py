"""Is the UNet stage bound by kernel launches? Eager vs a CUDA graph vs torch.compile, full size, on a CUDA GPU.

    python benchmarks/bench_unet_launch.py --out unet_launch.json     # about 3 min on an H200 (compile: 2 min)
    python benchmarks/bench_unet_launch.py --no-compile               # eager and CUDA graph only (about 40 s)

The full-size `release` model with random weights is built as `bench_gpu_full.py` builds it (bf16, LoRA
merged). Then, for the one-step denoise (`model.denoise`, attention capture on, as the joint path runs it):
  * eager CUDA-event times at tiles 512, 768, 1024 (batch 1) and 768 (batch 4), with the wall time per call;
  * one profiled 768 px call: the number of CUDA kernels and the summed kernel time (`gpu_busy_s`), against
    its wall time: a GPU busy far less than the wall is launch-bound;
  * the same call captured whole in a CUDA graph (`torch.cuda.CUDAGraph`) and replayed, with and without
    attention capture, and the largest difference of its latents from an eager call;
  * `torch.compile` of the UNet module (default mode): the first call's time, then steady-state times.
A measurement, not a product path: nothing here is used by `tadisr_core`. Output: one JSON object, rewritten
after every row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gpu_full import Timer, build_on_device, error_text, summary, write_json  # noqa: E402

from tadisr_core.spec import full_spec  # noqa: E402


def timed(timer: Timer, fn: Callable[[], object], repeats: int = 10, warmup: int = 3) -> dict:
    """CUDA-event summary of `fn` after `warmup` calls, plus the wall time per call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    wall = time.perf_counter()
    rows = [timer(fn) for _ in range(repeats)]
    return {**summary(rows), "wall_per_call_s": round((time.perf_counter() - wall) / repeats, 5)}


def kernel_profile(fn: Callable[[], object]) -> dict:
    """Wall time, CUDA kernel count and summed kernel time of one call of `fn`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        torch.cuda.synchronize()
        wall = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - wall
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return {"wall_s": round(wall, 4), "cuda_kernels": len(kernels),
            "gpu_busy_s": round(sum(e.device_time for e in kernels) / 1e6, 4)}


def graph_replay(model, timer: Timer, latents: torch.Tensor, capture: bool) -> dict:
    """`model.denoise` captured whole in a CUDA graph: replay times and the largest difference from eager."""
    static = latents.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as graph capture needs
        for _ in range(3):
            model.denoise(static, capture=capture)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = model.denoise(static, capture=capture)
    eager = model.denoise(latents, capture=False).latents
    graph.replay()
    torch.cuda.synchronize()
    diff = float((out.latents.float() - eager.float()).abs().max())
    return {**timed(timer, graph.replay), "max_abs_diff_vs_eager": diff}


@torch.no_grad()
def run(compile_unet: bool, save: Callable[[dict], None]) -> dict:
    """The report (see the module docstring); `save(result)` after every row."""
    start = time.perf_counter()
    device = torch.device("cuda")
    result: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
                    "device": torch.cuda.get_device_name(device), "complete": False}
    model = build_on_device(full_spec("release"), device, torch.bfloat16)
    result["build_s"] = round(time.perf_counter() - start, 1)
    timer, capture = Timer(device), model.needs_capture(True)
    for tile, batch in ((512, 1), (768, 1), (1024, 1), (768, 4)):
        latents = model.encode(torch.rand(batch, 3, tile, tile, device=device)).latents
        result[f"eager_{tile}_b{batch}"] = timed(timer, lambda: model.denoise(latents, capture=capture))
        save(result)
    latents = model.encode(torch.rand(1, 3, 768, 768, device=device)).latents
    steps: dict[str, Callable[[], dict]] = {
        "profile_768": lambda: kernel_profile(lambda: model.denoise(latents, capture=capture)),
        "graph_denoise": lambda: graph_replay(model, timer, latents, capture),
        "graph_denoise_nocapture": lambda: graph_replay(model, timer, latents, False),
    }
    for name, step in steps.items():
        try:
            result[name] = step()
        except Exception as exc:  # recorded; the next row still runs
            result[name] = {"error": error_text(exc)}
        torch.cuda.empty_cache()
        save(result)
    if compile_unet:
        try:
            model.unet = torch.compile(model.unet)
            first = time.perf_counter()
            model.denoise(latents, capture=False)
            torch.cuda.synchronize()
            result["compile_first_call_s"] = round(time.perf_counter() - first, 1)
            result["compiled_768_nocapture"] = timed(timer, lambda: model.denoise(latents, capture=False))
            result["compiled_768_capture"] = timed(timer, lambda: model.denoise(latents, capture=capture))
        except Exception as exc:
            result["compiled"] = {"error": error_text(exc)}
    result["total_s"] = round(time.perf_counter() - start, 1)
    result["complete"] = True
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--no-compile", action="store_true", help="leave out torch.compile (about 2 min of compiling)")
    p.add_argument("--out", type=Path, help="also write the JSON here, rewritten after every row")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark measures GPU kernel launches", file=sys.stderr)
        return 2
    save = (lambda result: write_json(args.out, result)) if args.out is not None else (lambda result: None)
    result = run(not args.no_compile, save)
    save(result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
