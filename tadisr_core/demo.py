"""`make demo`: upscale the bundled inputs with the shipped demo model and write comparison strips.

    python -m tadisr_core.demo [--model demo|demo-release] [-o out/MODEL] [--recursive] [INPUT ...]

For every input (default: tadisr_core/demo/inputs/*.png) it writes NAME_x4.png and
NAME_text_mask.png through the same CLI a user runs (`upscale --model MODEL`), then NAME_strip.png:
bicubic | TADiSR | text mask, side by side at the output size.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from .model_ref import DEMO_DIR, shipped_models

DEMO_INPUTS = DEMO_DIR / "inputs"
STRIP_GAP = 4  # white pixels between the panels


def comparison_strip(lr: torch.Tensor, sr: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[3, H, 3W + gaps]: bicubic upscale of `lr` | `sr` | `mask` as gray; [C, h, w] / [C, H, W] in 0..1."""
    from .pipeline import upscale_canvas

    rgb = lr[:3] if lr.shape[0] >= 3 else lr[:1].expand(3, -1, -1)
    bicubic = upscale_canvas(rgb[None], sr.shape[-2] / lr.shape[-2])[0]
    if bicubic.shape[-2:] != sr.shape[-2:]:
        raise ValueError(f"SR image {tuple(sr.shape[-2:])} is not an upscale of the input {tuple(lr.shape[-2:])}")
    gap = torch.ones(3, sr.shape[-2], STRIP_GAP)
    return torch.cat([bicubic, gap, sr[:3], gap, mask[:1].expand(3, -1, -1)], dim=-1)


def run_demo(out: Path, inputs: list[Path], model: str = "demo", recursive: bool = False) -> tuple[list[Path], int]:
    """Upscale `inputs` (files and folders; sub-folders too with `recursive`) with the shipped `model` into
    `out`; returns the strip paths and the upscale's exit code. When some inputs fail (exit 1, each named by
    the run), the others still get their strips; a setup error or Ctrl-C exits with its code."""
    from .batch import STRIP_SUFFIX, collect_inputs, plan_jobs
    from .cli import EXIT_FAILED, EXIT_OK
    from .cli import main as cli_main
    from .images import load_image, save_image

    started = time.time()
    code = cli_main(["upscale", *map(str, inputs), "-o", str(out), "--model", model, "--tile", "256",
                     "--overlap", "64", "--quiet", *(["--recursive"] if recursive else [])])
    if code not in (EXIT_OK, EXIT_FAILED):
        raise SystemExit(code)
    disabled = logging.root.manager.disable
    logging.disable(logging.WARNING)  # the run's walk said what it left out; walking again says it twice
    try:
        jobs = plan_jobs(collect_inputs(inputs, recursive, exclude=out), out, 4.0)  # the run's names (`a`, `a-2`)
    finally:
        logging.disable(disabled)
    strips = []
    for job in jobs:
        if not (job.image.is_file() and job.image.stat().st_mtime >= started - 1):
            continue  # a failed input: no output, or one from an earlier run
        sr, mask = load_image(job.image)[0], load_image(job.mask)[0]
        name = job.image.name.removesuffix(f"_x4{job.image.suffix}")
        strip = comparison_strip(load_image(job.input)[0], sr, mask)
        strips.append(save_image(strip, job.image.parent / f"{name}{STRIP_SUFFIX}"))
    return strips, code


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    p = argparse.ArgumentParser(prog="python -m tadisr_core.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="*", type=Path, help="images (default: the bundled demo inputs)")
    p.add_argument("-o", "--output", type=Path, default=None, help="output folder (default out/MODEL: out/demo)")
    p.add_argument("--model", choices=sorted(shipped_models()), default="demo",
                   help="which shipped model (default demo; demo-release: the release layout)")
    p.add_argument("--recursive", action="store_true", help="take the images in sub-folders of a folder too")
    args = p.parse_args(argv)
    args.output = args.output or Path("out") / args.model
    inputs = args.inputs or sorted(DEMO_INPUTS.glob("*.png"))
    strips, code = run_demo(args.output, inputs, args.model, args.recursive)
    print(f"{args.model} model: {len(strips)} inputs upscaled into {args.output}/")  # a folder counts its images
    for s in strips:
        print(f"  {s}   (bicubic | TADiSR {args.model} | text mask)")
    if code:
        print("some inputs failed (named above): they have no outputs and no strip", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
