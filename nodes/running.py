"""Shared plumbing of the nodes that run the model: settings checks, device placement, progress, interrupt."""

from __future__ import annotations

import contextlib
from typing import Iterator

from . import host
from .model_cache import TADiSRHandle


def tile_batch_arg(value: int) -> int | str:
    """The node's 0-means-auto widget value as the pipeline's argument."""
    return "auto" if int(value) <= 0 else int(value)


def check_tiling(scale: float, tile: int, overlap: int) -> None:
    """ValueError naming the input when scale / tile / overlap cannot work (the limits of
    `descriptor.DESCRIPTOR`, which the CLI and the pipeline read too)."""
    from tadisr_core.descriptor import DESCRIPTOR
    from tadisr_core.pipeline import check_settings

    check_settings(float(scale), int(tile), int(overlap), min_tile=DESCRIPTOR.size.min_tile)


def image_grid(image, scale: float, tile: int, overlap: int):
    """The tile grid the model will run for `image` (core layout [B, C, h, w]) at these settings."""
    from tadisr_core.pipeline import output_size, tile_grid

    return tile_grid(*output_size(image.shape[-2], image.shape[-1], float(scale)), int(tile), int(overlap))


def memory_estimate(model, grid, tile_batch: int | str, images: int = 1) -> int:
    """Bytes of activations to reserve beside the weights: `tile_batch` tiles of `grid` (one for auto),
    never more tiles than the run has (`images` x the grid's tiles: a small image's one small tile is
    all it reserves)."""
    from tadisr_core.devices import estimate_tile_bytes

    n = min(tile_batch, images * len(grid)) if isinstance(tile_batch, int) else 1
    return n * estimate_tile_bytes(model, grid.tile_h, grid.tile_w)


@contextlib.contextmanager
def running(handle: TADiSRHandle, grid, tile_batch: int | str = "auto", images: int = 1) -> Iterator[tuple]:
    """`(model, progress, cancel)` with the model on its device, memory made for `grid`'s tiles
    (a `tadisr_core.tiling.TileGrid`) of `images` images; interrupt checked before starting."""
    if not isinstance(handle, TADiSRHandle):
        raise ValueError(f"TADiSR: 'model' must come from Load TADiSR Model, got {type(handle).__name__}")
    host.check_interrupt()
    with handle.running(memory_estimate(handle.model, grid, tile_batch, images)) as model:
        yield model, host.progress_reporter(1), host.cancel_callback()

