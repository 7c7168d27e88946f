"""One TADiSR training step at full size (random weights): seconds per step and peak GPU memory.

    python benchmarks/bench_train_step.py                    # CUDA: 768 px, batch 1, bf16, grad checkpointing
    python benchmarks/bench_train_step.py --no-gc --size 512 # variations
    python benchmarks/bench_train_step.py --tiny             # CPU smoke mode: tiny spec, 64 px, fp32
    python benchmarks/bench_train_step.py --demo             # CPU: the demo spec as demo.yaml trains it

The model is the full Kolors-size TADiSR built on the meta device and materialised directly on the
GPU with random weights (no CPU copy), trained exactly as `training/train.py` does: the same
trainable set, frozen weights stored in bf16, the paper loss (MSE + LPIPS-VGG + MFL, mask MSE +
focal + Dice) and AdamW with clipping. LPIPS gets random weights unless --lpips-weights is given
(same compute). `--demo` times the shipped demo model's training step on the CPU instead: demo spec,
every weight trained (backbone included), fp32, LPIPS-alex, no gradient checkpointing, a 256 px crop
unless --size says otherwise (the demo's issue asks for about a second per 256 px step on 2 cores).
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.builders import (  # noqa: E402
    build_loss,
    build_model_from_config,
    build_optimizer,
    cast_frozen_,
    configure_trainable,
    enable_gradient_checkpointing,
)
from training.config import Config  # noqa: E402


def random_lpips_weights(net: str, folder: Path) -> Path:
    """A weights file of the right shapes with random values (for timing only)."""
    from safetensors.torch import save_file

    from training.lpips import state_dict_keys, weights_filename

    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(shape, generator=g) * 0.02 for k, shape in state_dict_keys(net).items()}
    path = folder / weights_filename(net)
    save_file(tensors, str(path))
    return path


def bench(args) -> dict:
    """Build, run `args.steps` timed steps after `args.warmup` warm-up steps, return the measurements."""
    device = torch.device("cpu" if args.tiny or args.demo else "cuda")
    cfg = Config()
    cfg.model.variant, cfg.model.size = args.variant, "tiny" if args.tiny else "demo" if args.demo else "full"
    cfg.loss.lpips_net = args.lpips_net
    tmp = tempfile.TemporaryDirectory()
    if args.lpips_net != "none":
        cfg.loss.lpips_weights = args.lpips_weights or str(random_lpips_weights(args.lpips_net, Path(tmp.name)))
    t0 = time.perf_counter()
    if args.vae_widths:  # the demo spec with other VAE / joint-decoder widths (what a narrower demo would cost)
        from tadisr_core.model import build_model, random_prompt
        from tadisr_core.spec import spec_for_size

        spec = spec_for_size(cfg.model.size, args.variant)
        spec = dataclasses.replace(spec, vae=dataclasses.replace(spec.vae, block_out_channels=args.vae_widths))
        model = build_model(spec, prompt=random_prompt(spec), seed=cfg.model.init_seed)
    else:
        model = build_model_from_config(cfg, device)
    model.to(device)
    trainable = configure_trainable(model, backbone=args.demo)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}[args.precision]
    if dtype is not None and device.type == "cuda":  # as the trainer: CPU autocast keeps norms mixed-dtype
        cast_frozen_(model, dtype, (model.vae, model.mi_decoder) if dtype == torch.float16 else ())
    if args.gc:
        enable_gradient_checkpointing(model)
    model.train()
    loss_fn = build_loss(cfg, device)
    params = [p for _, p in trainable]
    opt = build_optimizer(cfg, params)
    build_s = time.perf_counter() - t0

    size = 64 if args.tiny else args.size
    g = torch.Generator(device=device).manual_seed(0)
    hr = torch.rand(args.batch, 3, size, size, generator=g, device=device)
    lr = F.interpolate(hr, scale_factor=0.25, mode="area")
    mask = (torch.rand(args.batch, 1, size, size, generator=g, device=device) > 0.9).float()

    def step() -> dict:
        up = F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            enc = model.encode(up)
            den = model.denoise(enc.latents)
            dec = model.decode(den.latents, enc.skips, den.attention)
        losses = loss_fn(dec.image, hr, dec.mask_logits, mask)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {k: float(v.detach()) for k, v in losses.items()}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(max(1, args.warmup)):
        warm = step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        last = step()
        sync()
        times.append(time.perf_counter() - t)
    out = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "spec": cfg.model.size,
        "variant": args.variant, "size": size, "batch": args.batch, "precision": args.precision,
        "vae_widths": list(model.spec.vae.block_out_channels),
        "gradient_checkpointing": args.gc, "lpips_net": args.lpips_net,
        "trainable_params": sum(p.numel() for p in params),
        "total_params": sum(p.numel() for p in model.parameters()),
        "build_s": round(build_s, 2), "s_per_step": round(statistics.median(times), 4),
        "s_per_step_min": round(min(times), 4), "s_per_step_max": round(max(times), 4),
        "s_per_step_spread": round((max(times) - min(times)) / statistics.median(times), 4),
        "steps_timed": len(times), "s_per_step_all": [round(t, 4) for t in times],
        "warmup_total": warm["total"], "last_losses": last,
    }
    if device.type == "cuda":
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    tmp.cleanup()
    return out


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, with the mode's defaults filled in (full size on CUDA, or --tiny / --demo on the CPU)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--tiny", action="store_true", help="tiny spec on the CPU (smoke test of this script)")
    mode.add_argument("--demo", action="store_true", help="the demo spec on the CPU, trained as demo.yaml does")
    p.add_argument("--variant", default="paper", choices=("paper", "release"))
    p.add_argument("--size", type=int, default=None, help="HR crop size, a multiple of 32 (default 768; --demo 256)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=10,
                   help="timed steps after the warm-up; reported as median, min, max and spread")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, autotuning)")
    p.add_argument("--precision", default=None, choices=("bf16", "fp16", "no"),
                   help="default: bf16 on CUDA, no (fp32) with --tiny or --demo")
    p.add_argument("--gc", action=argparse.BooleanOptionalAction, default=None,
                   help="gradient checkpointing (default on; off with --demo, as in demo.yaml)")
    p.add_argument("--lpips-net", default=None, choices=("vgg", "alex", "none"),
                   help="default: vgg (the paper's), alex with --tiny or --demo (as the CPU configs)")
    p.add_argument("--lpips-weights", help="converted LPIPS weights (default: random weights, same compute)")
    p.add_argument("--vae-widths", type=lambda v: tuple(int(c) for c in v.split(",")), default=None,
                   metavar="C0,C1,C2,C3", help="--demo only: other VAE block widths (the demo's are 16,32,48,48)")
    p.add_argument("--out", type=Path, help="also write the JSON here (on a failure: the error, the date and torch)")
    args = p.parse_args(argv)
    args.cpu = args.tiny or args.demo
    if args.vae_widths is not None and (not args.demo or len(args.vae_widths) != 4):
        p.error("--vae-widths takes four widths and goes with --demo")
    if args.precision is None:
        args.precision = "no" if args.cpu else "bf16"
    if args.size is None:
        args.size = 256 if args.demo else 768
    if args.gc is None:
        args.gc = not args.demo
    if args.lpips_net is None:
        args.lpips_net = "alex" if args.cpu else "vgg"
    return args


def main(argv=None) -> int:
    """Run the benchmark and print its JSON; exit code 2 without CUDA outside the CPU modes."""
    args = parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device: run with --tiny for the CPU smoke mode or --demo for the demo model", file=sys.stderr)
        return 2
    try:
        result = bench(args)
    except Exception as exc:
        if args.out is not None:
            args.out.write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:500], "date": time.strftime(
                "%Y-%m-%d"), "torch": torch.__version__, "size": args.size, "batch": args.batch}, indent=2) + "\n")
        raise
    result["date"], result["torch"] = time.strftime("%Y-%m-%d"), torch.__version__
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
