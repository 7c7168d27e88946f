"""Shared plumbing of the nodes that run the model: inputs, device placement, progress, interrupt."""

from __future__ import annotations

import contextlib
from typing import Iterator

from . import host
from .model_cache import TADiSRHandle


def model_input(tooltip: str = "The model from Load TADiSR Model.") -> tuple:
    from .types import TADISR_MODEL

    return (TADISR_MODEL, {"tooltip": tooltip})


def tiling_inputs() -> dict:
    """scale / tile / overlap / tile_batch widgets shared by Upscale and Encode."""
    from tadisr_core.pipeline import MAX_SCALE, MIN_TILE

    return {
        "scale": ("FLOAT", {"default": 4.0, "min": 1.0, "max": MAX_SCALE, "step": 0.5, "tooltip": (
            "Upscale factor. TADiSR is trained for 4x; the image is resized bicubically by this factor, then restored.")}),
        "tile": ("INT", {"default": 768, "min": MIN_TILE, "max": 4096, "step": 8, "tooltip": (
            "Tile size in output pixels (multiple of 8). 768 is what the model was trained for; lower it if VRAM "
            "is short (out-of-memory also halves it automatically).")}),
        "overlap": ("INT", {"default": 256, "min": 0, "max": 4088, "step": 8, "tooltip": (
            "Overlap of neighbouring tiles in output pixels (< tile). Tiles are blended with a Hann window; "
            "more overlap hides seams, costs more tiles.")}),
        "tile_batch": ("INT", {"default": 0, "min": 0, "max": 64, "tooltip": (
            "Tiles per model call. 0 = auto (from free memory). Halved automatically on out-of-memory.")}),
    }


def tile_batch_arg(value: int) -> int | str:
    """The node's 0-means-auto widget value as the pipeline's argument."""
    return "auto" if int(value) <= 0 else int(value)


def check_tiling(scale: float, tile: int, overlap: int) -> None:
    """ValueError naming the input when scale / tile / overlap cannot work."""
    from tadisr_core.pipeline import MIN_TILE, check_settings

    try:
        check_settings(float(scale), int(tile), int(overlap), min_tile=MIN_TILE)
    except ValueError as exc:
        raise ValueError(f"TADiSR: {exc}") from None


def memory_estimate(model, tile: int, tile_batch: int | str) -> int:
    """Bytes of activations to reserve beside the weights (at least one tile)."""
    from tadisr_core.devices import estimate_tile_bytes

    n = tile_batch if isinstance(tile_batch, int) else 1
    return n * estimate_tile_bytes(model, tile, tile)


@contextlib.contextmanager
def running(handle: TADiSRHandle, tile: int = 768, tile_batch: int | str = "auto") -> Iterator[tuple]:
    """`(model, progress, cancel)` with the model on its device; interrupt checked before starting."""
    if not isinstance(handle, TADiSRHandle):
        raise ValueError(f"TADiSR: 'model' must come from Load TADiSR Model, got {type(handle).__name__}")
    host.check_interrupt()
    with handle.running(memory_estimate(handle.model, tile, tile_batch)) as model:
        yield model, host.progress_reporter(1), host.cancel_callback()

