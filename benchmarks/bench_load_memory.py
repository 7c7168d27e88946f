"""Peak host RAM of loading the Kolors UNet and VAE, before (diffusers from_pretrained in fp32, then
cast, as the loader did until now) and after (meta build + per-tensor streaming in the target dtype).

    python benchmarks/bench_load_memory.py [--workdir DIR] [--out results.json]

Files: a random UNet of the Kolors structure, widths 96/192/384 (about 0.24 B parameters), and the
full-size SDXL-type VAE, both saved as fp16 variant files as Kwai-Kolors/Kolors ships them, plus a
native TADiSR checkpoint and prompt cache for them ("tadisr": the whole `load_tadisr`).
Each load runs in a fresh process. Ratio = (peak RSS during the load - RSS after the imports)
/ bytes of the loaded tensors in their target dtype. Goal: <= 1.3.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WIDE = dict(block_out_channels=(96, 192, 384), attention_head_dim=(2, 3, 6), cross_attention_dim=768,
            encoder_hid_dim=1024, addition_time_embed_dim=128)


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _write(workdir: Path) -> Path:
    import dataclasses

    import torch

    from tadisr_core.backbone import build_unet, build_vae
    from tadisr_core.checkpoint import save_model
    from tadisr_core.model import TADiSRModel, random_prompt
    from tadisr_core.spec import UNetSpec, VAESpec, full_spec

    root = workdir / "kolors_wide"
    workdir.mkdir(parents=True, exist_ok=True)
    if (workdir / "prompt_cache.safetensors").is_file():
        return root
    torch.manual_seed(0)
    unet, vae = build_unet(UNetSpec(**WIDE)), build_vae(VAESpec())
    spec = dataclasses.replace(full_spec(), unet=unet_spec(), prompt_tokens=256, text_hidden=WIDE["encoder_hid_dim"])
    prompt = random_prompt(spec)
    unet.half().save_pretrained(root / "unet", variant="fp16")  # before TADiSRModel adds its LoRA layers
    vae.half().save_pretrained(root / "vae", variant="fp16")
    save_model(TADiSRModel(spec, unet.float(), vae.float(), prompt), workdir / "tadisr_wide.safetensors")
    prompt.save(workdir / "prompt_cache.safetensors")
    return root


def unet_spec():
    from tadisr_core.spec import UNetSpec

    return UNetSpec(**WIDE)


def _child(mode: str, part: str, dtype_name: str, root: str) -> dict:
    import gc

    import diffusers
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from tadisr_core import backbone
    from tadisr_core.devices import COMPUTE_DTYPES
    from tadisr_core.streaming import tensor_bytes

    diffusers.utils.logging.set_verbosity_error()
    dtype = COMPUTE_DTYPES[dtype_name]
    gc.collect()
    base = _status("VmRSS")
    work = Path(root).parent
    if part == "tadisr" and mode == "before":  # the old load_tadisr: fp32 backbone, checkpoint, then cast
        from tadisr_core.checkpoint import apply_checkpoint, load_checkpoint
        from tadisr_core.model import TADiSRModel
        from tadisr_core.prompt import PromptCache

        ckpt = load_checkpoint(work / "tadisr_wide.safetensors")
        prompt = PromptCache.load(work / "prompt_cache.safetensors")
        module = TADiSRModel(ckpt.spec, UNet2DConditionModel.from_pretrained(root, subfolder="unet", variant="fp16"),
                             AutoencoderKL.from_pretrained(root, subfolder="vae", variant="fp16"))
        apply_checkpoint(module, ckpt)
        del ckpt
        module.to(dtype)
        module.set_prompt(prompt)
    elif part == "tadisr":
        from tadisr_core.loading import load_tadisr

        module = load_tadisr(root, work / "tadisr_wide.safetensors", work / "prompt_cache.safetensors", dtype=dtype)
    elif mode == "before":
        cls = UNet2DConditionModel if part == "unet" else AutoencoderKL
        module = cls.from_pretrained(root, subfolder=part, variant="fp16", torch_dtype=torch.float32).to(dtype)
    else:
        module = (backbone.load_unet if part == "unet" else backbone.load_vae)(root, dtype)
    loaded = tensor_bytes(module)
    peak = _status("VmHWM")
    return {"mode": mode, "part": part, "dtype": dtype_name, "loaded_bytes": loaded,
            "peak_minus_base_bytes": peak - base, "ratio": round((peak - base) / loaded, 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "tadisr_bench_load"))
    p.add_argument("--out", default=None)
    p.add_argument("--child", nargs=4, metavar=("MODE", "PART", "DTYPE", "ROOT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(*args.child)))
        return 0
    root = _write(Path(args.workdir))
    rows = []
    for part in ("unet", "vae", "tadisr"):
        for dtype in ("fp32", "bf16", "fp16"):
            for mode in ("before", "after"):
                out = subprocess.run([sys.executable, __file__, "--child", mode, part, dtype, str(root)],
                                     capture_output=True, text=True, check=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"{part:4s} {dtype:4s} {mode:6s} loaded {row['loaded_bytes'] / 2**20:8.1f} MiB  "
                      f"peak-base {row['peak_minus_base_bytes'] / 2**20:8.1f} MiB  ratio {row['ratio']:.3f}")
    result = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
              "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
