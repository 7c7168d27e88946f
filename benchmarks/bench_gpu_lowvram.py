"""Peak GPU memory of one tile for each low-VRAM mode, full-size random weights (issue 9's table).

    python benchmarks/bench_gpu_lowvram.py [--tiles 512 768 1024] [--out results.json]
    python benchmarks/bench_gpu_lowvram.py --tiny --device cpu     # any machine: runs the code paths

For each mode of `memory_plan.MODES` (bf16; fp8_e4m3fn; fp8_e4m3fn + sequential offload; bf16 +
sequential offload) and the fp16 row of GPUs without bf16 (`memory_plan.NO_BF16_MODE`; `--no-fp16`
leaves it out) the model is placed with `devices.place_model` and one tile goes through encode ->
denoise -> decode; reported per mode and tile: peak `torch.cuda.max_memory_allocated` and
`max_memory_reserved`, whether the output is finite, and the `memory_plan` estimate beside it (which
includes 0.7 GiB for the CUDA context; `cuda_context_gib` is this process's, measured once). The
random weights are drawn on `--device` (a CPU thread takes minutes for the 2.7 B values) and kept on
the CPU in bf16, as a loaded model is before `place_model`. A mode or tile that fails (out of memory,
say) records its error and the next one runs; `--out` is rewritten after every row. Random weights
give meaningless images but the real memory. Replace the README's estimated table with these numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tadisr_core.devices import place_model  # noqa: E402
from tadisr_core.files import atomic_path  # noqa: E402
from tadisr_core.memory_plan import MODES, NO_BF16_MODE, needed_bytes, placed_meta, weight_bytes  # noqa: E402
from tadisr_core.model import build_model, random_prompt  # noqa: E402
from tadisr_core.spec import full_spec, tiny_spec  # noqa: E402

GIB = 2 ** 30


def _random_model(spec, dtype, draw_on: torch.device | str = "cpu"):
    """The model with random weights on the CPU in `dtype`, drawn on `draw_on`, without an fp32 copy of the whole."""
    model = build_model(spec, "meta")
    model.to_empty(device="cpu")
    g = torch.Generator(device=draw_on).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            value = torch.randn(p.shape, generator=g, device=draw_on) * 0.02
            p.data = value.to("cpu", dtype if p.is_floating_point() else p.dtype)
    model.set_prompt(random_prompt(spec))
    return model.eval().requires_grad_(False)


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


def run(spec, device: torch.device, tiles, plan_model, modes=MODES, on_row=lambda row: None) -> list[dict]:
    """One row per mode and tile; `on_row(row)` after each."""
    rows = []

    def add(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        on_row(row)

    for label, dtype, offload in modes:
        try:
            weights = weight_bytes(placed_meta(plan_model, dtype), offload)  # the estimate's part of every tile
            model = place_model(_random_model(spec, torch.bfloat16, device), device, dtype, offload=offload)
        except Exception as exc:  # this mode could not be placed; the next one still runs
            add({"mode": label, "tile": None, "error": _error(exc)})
            continue
        for tile in tiles:
            row = {"mode": label, "tile": tile}
            try:
                est = needed_bytes(plan_model, dtype, tile, offload, weights)
                row["estimate_gib"] = round(est / GIB, 3)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                x = torch.rand(1, 3, tile, tile, device=model.device)
                t = time.perf_counter()
                with torch.no_grad():
                    out = model(x)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                row["seconds"] = round(time.perf_counter() - t, 3)  # one cold tile: not a timing benchmark
                if device.type == "cuda":
                    row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / GIB, 3)
                    row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / GIB, 3)
                else:
                    row["peak_gib"] = None  # no allocator statistics off CUDA
                row["finite"] = bool(torch.isfinite(out.image).all()) and (
                    out.mask_logits is None or bool(torch.isfinite(out.mask_logits).all()))
                del out, x
            except Exception as exc:  # recorded (out of memory, say); the next tile still runs
                row["error"] = _error(exc)
            add(row)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def write_json(path: Path, report: dict) -> None:
    """Write through a temporary file (`files.atomic_path`), so a kill mid-write leaves the last whole report."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tiles", type=int, nargs="+", default=[512, 768, 1024])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny spec (checks the code paths anywhere)")
    p.add_argument("--no-fp16", dest="fp16", action="store_false", help="leave out the fp16 row (GPUs without bf16)")
    p.add_argument("--out", default=None, help="write the JSON report here, rewritten after every row")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --tiny --device cpu to check the code paths", file=sys.stderr)
        return 2
    spec = tiny_spec() if args.tiny else full_spec()
    report: dict = {"schema": "tadisr-bench-lowvram/2", "spec": "tiny" if args.tiny else "full",
                    "device": args.device, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                    "complete": False, "rows": []}
    if device.type == "cuda":
        torch.cuda.init()
        free, total = torch.cuda.mem_get_info(device)
        report.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                      gpu_memory_gib=round(total / GIB, 1),
                      cuda_context_gib=round((total - free - torch.cuda.memory_reserved(device)) / GIB, 3))
    out = Path(args.out) if args.out else None
    save = (lambda: write_json(out, report)) if out else (lambda: None)
    save()
    modes = MODES + ((NO_BF16_MODE,) if args.fp16 else ())

    def on_row(row: dict) -> None:
        report["rows"].append(row)
        save()

    run(spec, device, [64] if args.tiny else args.tiles, build_model(spec, "meta"), modes, on_row)
    report["complete"] = True
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
