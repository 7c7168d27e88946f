"""What the model needs and supports, in one place: size rules, precisions, the fp16 VAE rule.

The CLI, the ComfyUI nodes and the pipeline read these instead of keeping their own constants
(as spandrel's ImageModelDescriptor / SizeRequirements describe a model to its callers).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

# Weight precisions: name -> (storage dtype, compute dtype or None = same as storage).
# fp8_e4m3fn stores the UNet's weights in fp8 and computes each layer in bf16 (ComfyUI's fp8 option).
WEIGHT_DTYPES: dict[str, tuple[torch.dtype, torch.dtype | None]] = {
    "fp32": (torch.float32, None),
    "bf16": (torch.bfloat16, None),
    "fp16": (torch.float16, None),
    "fp8_e4m3fn": (torch.float8_e4m3fn, torch.bfloat16),
}


@dataclass(frozen=True)
class SizeRules:
    """Tile and scale limits (tiles in output pixels)."""

    tile_multiple: int = 8          # the VAE's downsampling factor
    min_tile: int = 64              # smallest tile offered and the floor of the out-of-memory fallback
    max_tile: int = 4096
    default_tile: int = 768
    default_overlap: int = 256
    min_scale: float = 1.0
    max_scale: float = 8.0
    default_scale: float = 4.0


@dataclass(frozen=True)
class ModelDescriptor:
    """What a TADiSR model needs and supports."""

    size: SizeRules = SizeRules()
    dtype_choices: tuple[str, ...] = ("auto", *WEIGHT_DTYPES)
    input_channels: tuple[int, ...] = (1, 3, 4)      # gray, RGB, RGBA (alpha upscaled bicubic)
    offload_modes: tuple[str, ...] = ("none", "sequential")

    def channels_text(self) -> str:
        """The accepted channel counts for messages: "1, 3 or 4"."""
        *rest, last = map(str, self.input_channels)
        return f"{', '.join(rest)} or {last}" if rest else last

    def check_tile(self, tile: int, min_tile: int | None = None) -> None:
        """ValueError naming the tile rule when `tile` breaks it (`min_tile` overrides the offered floor:
        the library lets small test models run smaller tiles)."""
        check_pixels("tile", tile)
        s = self.size
        low = s.min_tile if min_tile is None else min_tile
        if not low <= tile <= s.max_tile or tile % s.tile_multiple:
            raise ValueError(f"tile must be a multiple of {s.tile_multiple} between {low} and {s.max_tile}, "
                             f"got {tile}")

    def check_scale(self, scale: float) -> None:
        """ValueError naming the scale range when `scale` is outside it (or is no real number)."""
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise ValueError(f"scale must be a number, got {scale!r}")
        if not self.size.min_scale <= scale <= self.size.max_scale:
            s = self.size
            raise ValueError(f"scale must be between {s.min_scale:g} and {s.max_scale:g}, got {scale:g}")


DESCRIPTOR = ModelDescriptor()


def is_whole(value) -> bool:
    """True for an int (numpy's too); False for bool, float (even 64.0), str and the rest."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_pixels(name: str, value) -> None:
    """ValueError naming the setting when `value` (a size in pixels) is no int."""
    if not is_whole(value):
        raise ValueError(f"{name} must be a whole number of pixels, got {value!r}")


def part_dtypes(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The one precision rule: the dtype each part computes in for a requested UNet dtype.

    Under fp16 the VAE and the mask decoder stay fp32 (the SDXL VAE overflows in fp16); fp8 weight
    storage computes in bf16 and keeps VAE and decoder in bf16.
    """
    compute = WEIGHT_DTYPES.get(dtype_name(dtype), (dtype, None))[1] or dtype
    wide = torch.float32 if compute == torch.float16 else compute
    return {"unet": compute, "vae": wide, "mi_decoder": wide}


def dtype_name(dtype: torch.dtype) -> str:
    """"bf16" for torch.bfloat16 and so on (the CLI / node spelling)."""
    for name, (storage, _) in WEIGHT_DTYPES.items():
        if storage == dtype:
            return name
    return str(dtype).removeprefix("torch.")
