"""How long the ComfyUI loader takes to list Kolors choices over a folder of non-Kolors checkpoints.

    python benchmarks/bench_kolors_listing.py [--files 50]

Writes `--files` safetensors files with an SDXL-like tensor table (about 2,550 keys in SGM / LDM /
text-encoder names, one-element tensors: only the header matters) into a temporary folder used as
models/checkpoints, then times `kolors_files.list_kolors_candidates` twice (the first listing, and a
refresh with nothing changed) and, for comparison, the full identity checks (`check_unet` and
`check_vae`) on each file. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tadisr_core.kolors_files import list_kolors_candidates  # noqa: E402
from tadisr_core.kolors_identity import check_unet, check_vae  # noqa: E402


def sdxl_like_tensors() -> dict[str, torch.Tensor]:
    """An SDXL-sized tensor table (names only matter): UNet, VAE and text-encoder sections."""
    keys = [f"model.diffusion_model.input_blocks.{i % 9}.1.transformer_blocks.{i}.attn1.to_q.weight"
            for i in range(1700)]
    keys += ["model.diffusion_model.input_blocks.0.0.weight"]
    keys += [f"first_stage_model.encoder.down.{i % 4}.block.{i}.conv1.weight" for i in range(250)]
    keys += [f"conditioner.embedders.0.transformer.text_model.encoder.layers.{i}.weight" for i in range(600)]
    return {k: torch.zeros(1) for k in keys}


def main(argv=None) -> int:
    """Run and print the timings (ms per file)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=50)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "checkpoints"
        folder.mkdir()
        tensors = sdxl_like_tensors()
        for i in range(args.files):
            save_file(tensors, folder / f"model_{i:03d}.safetensors")
        list_kolors_candidates([], [], [], [Path(tmp) / "empty"])  # imports out of the timing
        timings = {}
        for label in ("first_listing", "refresh"):
            t = time.perf_counter()
            assert list_kolors_candidates([], [], [], [folder]) == []
            timings[f"{label}_ms_per_file"] = round((time.perf_counter() - t) * 1000 / args.files, 3)
        t = time.perf_counter()
        for path in folder.iterdir():
            for check in (check_unet, check_vae):
                try:
                    check(path)
                except ValueError:
                    pass
        timings["full_checks_ms_per_file"] = round((time.perf_counter() - t) * 1000 / args.files, 3)
    print(json.dumps({"files": args.files, "keys_per_file": len(tensors), **timings}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
