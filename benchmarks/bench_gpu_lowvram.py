"""Peak GPU memory of one tile for each low-VRAM mode, full-size random weights (issue 9's table).

    python benchmarks/bench_gpu_lowvram.py [--tiles 512 768 1024] [--out results.json]
    python benchmarks/bench_gpu_lowvram.py --tiny --device cpu     # any machine: runs the code paths

For each mode (bf16; fp8_e4m3fn; fp8_e4m3fn + sequential offload) the model is placed with
`devices.place_model` and one tile goes through encode -> denoise -> decode; reported: peak
`torch.cuda.max_memory_allocated` and the `memory_plan` estimate beside it. Random weights give
meaningless images but the real memory. Replace the README's estimated table with these numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tadisr_core.devices import place_model  # noqa: E402
from tadisr_core.memory_plan import MODES, needed_bytes  # noqa: E402
from tadisr_core.model import build_model, random_prompt  # noqa: E402
from tadisr_core.spec import full_spec, tiny_spec  # noqa: E402


def _random_model(spec, dtype):
    """The model with random weights, materialised on the CPU in `dtype` without an fp32 copy."""
    model = build_model(spec, "meta")
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.data = (torch.randn(p.shape, generator=g) * 0.02).to(dtype if p.is_floating_point() else p.dtype)
    model.set_prompt(random_prompt(spec))
    return model.eval().requires_grad_(False)


def run(spec, device: torch.device, tiles, plan_model) -> list[dict]:
    rows = []
    for label, dtype, offload in MODES:
        model = place_model(_random_model(spec, torch.bfloat16), device, dtype, offload=offload)
        for tile in tiles:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            x = torch.rand(1, 3, tile, tile, device=model.device)
            with torch.no_grad():
                out = model(x)
            assert torch.isfinite(out.image).all()
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
            est = needed_bytes(plan_model, dtype, tile, offload)
            rows.append({"mode": label, "tile": tile, "peak_gib": round(peak / 2**30, 3),
                         "estimate_gib": round(est / 2**30, 3)})
            print(json.dumps(rows[-1]), flush=True)
        del model
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tiles", type=int, nargs="+", default=[512, 768, 1024])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny spec (checks the code paths anywhere)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    spec = tiny_spec() if args.tiny else full_spec()
    rows = run(spec, torch.device(args.device), [64] if args.tiny else args.tiles, build_model(spec, "meta"))
    if args.out:
        Path(args.out).write_text(json.dumps({"device": args.device, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
