"""How much GPU memory the full-size model needs, computed from the meta-device model.

    python -m tadisr_core.memory_plan            # prints the README's VRAM table

Method: weights = the meta model's parameter bytes in each part's dtype (`descriptor.part_dtypes`;
fp8 stores every UNet Linear / Conv2d weight in 1 byte), plus, under sequential offload, only the
resident modules and the largest moving block (`lowvram.offload_plan`). Activations = one tile's
estimate (`devices.estimate_tile_bytes`: the full-resolution joint decoder stage with the kept
encoder skips). Plus CONTEXT_BYTES for the CUDA context and allocator slack. Estimates, to be
replaced by measurements on GPUs.
"""

from __future__ import annotations

import torch
from torch import nn

from .descriptor import part_dtypes

CONTEXT_BYTES = 700 << 20
MODES = (("bf16", torch.bfloat16, "none"), ("fp8", torch.float8_e4m3fn, "none"),
         ("fp8 + offload", torch.float8_e4m3fn, "sequential"))


def _meta_model(variant: str = "release"):
    from .model import build_model
    from .spec import full_spec

    return build_model(full_spec(variant), "meta")


def _part_bytes(module: nn.Module, dtype: torch.dtype, fp8: bool) -> int:
    total = 0
    for name, p in module.named_parameters():
        owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
        weight_fp8 = fp8 and name.endswith("weight") and ".lora_" not in f".{name}" and isinstance(
            owner, (nn.Linear, nn.Conv2d))
        total += p.numel() * (1 if weight_fp8 else torch.finfo(dtype).bits // 8)
    return total


def weight_bytes(model, dtype: torch.dtype, offload: str = "none") -> int:
    """GPU bytes the weights take in `dtype` (and offload mode)."""
    from .lowvram import offload_plan

    dtypes = part_dtypes(dtype)
    fp8 = dtype == torch.float8_e4m3fn
    if offload == "none":
        return sum(_part_bytes(getattr(model, part), dt, fp8 and part == "unet") for part, dt in dtypes.items())
    moving, resident = offload_plan(model)
    sizes = []
    for name in moving + resident:
        part = name.split(".")[0]
        sizes.append((name in moving, _part_bytes(model.get_submodule(name), dtypes.get(part, dtype),
                                                  fp8 and part == "unet")))
    return sum(s for mov, s in sizes if not mov) + max((s for mov, s in sizes if mov), default=0)


def needed_bytes(model, dtype: torch.dtype, tile: int, offload: str = "none") -> int:
    """Estimated peak GPU bytes for one tile at a time."""
    from .devices import estimate_tile_bytes

    act_dtype = part_dtypes(dtype)["vae"]
    elem_ratio = (torch.finfo(act_dtype).bits // 8) / (torch.finfo(model.vae.decoder.conv_in.weight.dtype).bits // 8)
    return int(weight_bytes(model, dtype, offload) + estimate_tile_bytes(model, tile, tile) * elem_ratio
               + CONTEXT_BYTES)


def model_bytes(model) -> int:
    """The model's true size in bytes (fp8 weights at 1 byte, tied tensors once): what a host's
    model manager should be told (ComfyUI: `ModelPatcher(..., size=model_bytes(model))`)."""
    from .streaming import tensor_bytes

    return tensor_bytes(model)


def choose_offload(model_size: int, tile_bytes: int, free_bytes: int, host_low_vram: bool = False,
                   headroom: float = 0.9) -> str:
    """"sequential" when the weights plus one tile's activations do not fit `headroom` of the free
    device memory, or the host runs in a low-VRAM mode (ComfyUI --lowvram / --novram); else "none"."""
    if host_low_vram or model_size + tile_bytes > headroom * free_bytes:
        return "sequential"
    return "none"


def vram_table(gpus_gb=(6, 8, 12, 16, 24), tiles=(512, 768, 1024), variant: str = "release"):
    """Rows of (GPU GB, {tile: the first of MODES that fits, or None}) plus the needed GiB per mode and
    tile. MODES go from the most faithful and fastest (bf16) to the lightest (fp8 with offload)."""
    model = _meta_model(variant)
    need = {(label, tile): needed_bytes(model, dtype, tile, offload)
            for label, dtype, offload in MODES for tile in tiles}
    rows = []
    for gb in gpus_gb:
        cells = {}
        for tile in tiles:
            fit = [label for label, _, _ in MODES if need[(label, tile)] <= gb * 1e9 * 0.95]
            cells[tile] = fit[0] if fit else None
        rows.append((gb, cells))
    return rows, {k: v / 2**30 for k, v in need.items()}


def main() -> int:
    tiles = (512, 768, 1024)
    rows, need = vram_table(tiles=tiles)
    print("| mode | " + " | ".join(f"tile {t}" for t in tiles) + " |")
    print("|---|" + "---:|" * len(tiles))
    for label, _, _ in MODES:
        print(f"| {label} | " + " | ".join(f"{need[(label, t)]:.1f} GiB" for t in tiles) + " |")
    print()
    print("| GPU | " + " | ".join(f"tile {t}" for t in tiles) + " |")
    print("|---|" + "---|" * len(tiles))
    for gb, cells in rows:
        print(f"| {gb} GB | " + " | ".join(cells[t] or "no" for t in tiles) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
