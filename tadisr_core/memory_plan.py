"""How much GPU memory the full-size model needs, computed from the meta-device model.

    python -m tadisr_core.memory_plan            # prints the README's VRAM table

Method: weights = the bytes of the meta model stored as `devices.place_model` stores it (each part's
dtype by `descriptor.part_dtypes`; fp8 UNet weights at 1 byte), or under sequential offload only the
resident modules and the largest moving block of that stored model (`lowvram.offload_plan`).
Activations = one tile's estimate (`devices.estimate_tile_bytes`: the full-resolution joint decoder stage with the kept
encoder skips). Plus CONTEXT_BYTES for the CUDA context and allocator slack. Estimates, checked against
the peaks measured on an H200 (benchmarks/RESULTS.md, "peak memory of one tile per low-VRAM mode").
"""

from __future__ import annotations

import copy

import torch

from .descriptor import part_dtypes

CONTEXT_BYTES = 700 << 20
MODES = (("bf16", torch.bfloat16, "none"), ("fp8", torch.float8_e4m3fn, "none"),
         ("fp8 + offload", torch.float8_e4m3fn, "sequential"), ("bf16 + offload", torch.bfloat16, "sequential"))
# What --dtype auto runs on a GPU without bf16 (before Ampere): the VAE and the joint decoders stay fp32
# (`descriptor.part_dtypes`). Listed with the needs, never chosen for the GPU table, which assumes bf16.
NO_BF16_MODE = ("fp16 (auto before Ampere)", torch.float16, "none")


def _meta_model(variant: str = "release"):
    from .model import build_model
    from .spec import full_spec

    return build_model(full_spec(variant), "meta")


def placed_meta(model, dtype: torch.dtype):
    """A copy of the meta-device `model` stored as `devices.place_model` stores it in `dtype` (each
    part's dtype, fp8 UNet weights): what the weights take is then read off its tensors."""
    from .devices import place_model

    if any(not p.is_meta for p in model.parameters()):
        raise ValueError("placed_meta takes a model built on the meta device (a copy of real weights would "
                         "double them in RAM)")
    return place_model(copy.deepcopy(model), dtype=dtype)


def weight_bytes(model, offload: str = "none") -> int:
    """GPU bytes the weights of `model` take, stored as they are: all of them, or under sequential
    offload the resident modules and the largest moving block (`lowvram.offload_plan`)."""
    from .lowvram import offload_plan
    from .streaming import tensor_bytes

    if offload == "none":
        return model_bytes(model)
    moving, resident = offload_plan(model)
    size = {name: tensor_bytes(model.get_submodule(name)) for name in moving + resident}
    return sum(size[n] for n in resident) + max((size[n] for n in moving), default=0)


def needed_bytes(model, dtype: torch.dtype, tile: int, offload: str = "none", weights: int | None = None) -> int:
    """Estimated peak GPU bytes for one tile at a time, the meta-device `model` run in `dtype`
    (`weights`: its `weight_bytes` in that mode, when already known)."""
    from .devices import estimate_tile_bytes

    act_dtype = part_dtypes(dtype)["vae"]
    elem_ratio = (torch.finfo(act_dtype).bits // 8) / (torch.finfo(model.vae.decoder.conv_in.weight.dtype).bits // 8)
    if weights is None:
        weights = weight_bytes(placed_meta(model, dtype), offload)
    return int(weights + estimate_tile_bytes(model, tile, tile) * elem_ratio + CONTEXT_BYTES)


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
    """Rows of (GPU GB, {tile: the first of MODES that fits, or None}) plus the needed GiB per mode (and
    NO_BF16_MODE) and tile. MODES go from the most faithful and fastest (bf16) to the lightest (bf16 with offload:
    fp8 moves the mid block whole, bf16 splits it)."""
    model = _meta_model(variant)
    listed = (NO_BF16_MODE, *MODES)
    placed = {dtype: placed_meta(model, dtype) for dtype in dict.fromkeys(dtype for _, dtype, _ in listed)}
    weights = {label: weight_bytes(placed[dtype], offload) for label, dtype, offload in listed}
    need = {(label, tile): needed_bytes(model, dtype, tile, offload, weights[label])
            for label, dtype, offload in listed for tile in tiles}
    rows = []
    for gb in gpus_gb:
        cells = {}
        for tile in tiles:
            fit = [label for label, _, _ in MODES if need[(label, tile)] <= gb * 2**30 * 0.95]  # "12 GB": GiB
            cells[tile] = fit[0] if fit else None
        rows.append((gb, cells))
    return rows, {k: v / 2**30 for k, v in need.items()}


def main() -> int:
    """Print the README's VRAM tables (`python -m tadisr_core.memory_plan`)."""
    tiles = (512, 768, 1024)
    rows, need = vram_table(tiles=tiles)
    print("| mode | " + " | ".join(f"tile {t}" for t in tiles) + " |")
    print("|---|" + "---:|" * len(tiles))
    for label, _, _ in (NO_BF16_MODE, *MODES):
        print(f"| {label} | " + " | ".join(f"{need[(label, t)]:.1f} GiB" for t in tiles) + " |")
    print()
    print("| GPU | " + " | ".join(f"tile {t}" for t in tiles) + " |")
    print("|---|" + "---|" * len(tiles))
    for gb, cells in rows:
        print(f"| {gb} GB | " + " | ".join(cells[t] or "no" for t in tiles) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
