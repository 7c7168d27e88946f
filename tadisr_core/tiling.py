"""Overlapping tiles over an image and Hann-window blending of per-tile results.

Tile starts follow the release: range(0, L - tile + 1, stride), plus a last start at L - tile.
A side shorter than the tile gets one tile, replicate-padded up to a multiple of `multiple`
(or to the full tile with `shrink=False`) and cropped after, so every pixel has weight > 0
(the release padded both sides to the tile but still gridded the long side, leaving NaN).

The 2-D window is the outer product of two 1-D `hann_window(periodic=False)` clamped at 1e-3.
Because the grid is a product of row and column starts, the weight sum is separable too:
sum_w(y, x) = wy(y) * wx(x), so no full-size weight canvas is ever allocated.

A work unit is one (image, tile) pair; a batch stacks several units along dim 0.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .devices import is_oom, release_cached_memory

log = logging.getLogger("tadisr")

WINDOW_FLOOR = 1e-3

Progress = Callable[[int, int], None]
Cancel = Callable[[], bool]


class UpscaleCancelled(Exception):
    """Raised between tiles when the cancel callback returns True."""

    def __init__(self, done: int = 0, total: int = 0):
        super().__init__(f"cancelled after {done} of {total} tiles")
        self.done, self.total = done, total


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size `tile` covering `length` with at least `overlap` shared."""
    if tile <= 0 or overlap < 0 or overlap >= tile:
        raise ValueError(f"need 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, tile - overlap))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def _side(length: int, tile: int, overlap: int, multiple: int, shrink: bool) -> tuple[int, list[int]]:
    if length >= tile:
        return tile, tile_starts(length, tile, overlap)
    if not shrink:
        return tile, [0]
    return min(tile, -(-length // multiple) * multiple), [0]


def hann_1d(size: int, device=None) -> torch.Tensor:
    """Symmetric Hann window of `size` samples clamped at WINDOW_FLOOR (float32)."""
    return torch.hann_window(size, periodic=False, dtype=torch.float32, device=device).clamp_min(WINDOW_FLOOR)


@dataclass(frozen=True)
class TileGrid:
    """Where tiles sit on a `height` x `width` canvas; every tile is `tile_h` x `tile_w`."""

    height: int
    width: int
    tile_h: int
    tile_w: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)

    def box(self, index: int) -> tuple[int, int, int, int]:
        """(y, x, valid_h, valid_w) of tile `index` (row-major); valid = the part inside the canvas."""
        y, x = self.ys[index // len(self.xs)], self.xs[index % len(self.xs)]
        return y, x, min(self.tile_h, self.height - y), min(self.tile_w, self.width - x)

    def windows(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The 1-D row and column windows of one tile."""
        return hann_1d(self.tile_h, device), hann_1d(self.tile_w, device)

    def weight_sums(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Row sums wy [H] and column sums wx [W] of the window over all tiles."""
        wy_tile, wx_tile = self.windows(device)
        wy = torch.zeros(self.height, device=device)
        wx = torch.zeros(self.width, device=device)
        for y in self.ys:
            n = min(self.tile_h, self.height - y)
            wy[y:y + n] += wy_tile[:n]
        for x in self.xs:
            n = min(self.tile_w, self.width - x)
            wx[x:x + n] += wx_tile[:n]
        return wy, wx


def make_grid(height: int, width: int, tile: int, overlap: int, multiple: int = 1, shrink: bool = True) -> TileGrid:
    """Tile grid for a canvas. Short sides use one tile rounded up to `multiple` (or `tile` if not `shrink`)."""
    if tile % multiple:
        raise ValueError(f"tile {tile} must be a multiple of {multiple}")
    if height < 1 or width < 1:
        raise ValueError(f"empty canvas {height}x{width}")
    th, ys = _side(height, tile, overlap, multiple, shrink)
    tw, xs = _side(width, tile, overlap, multiple, shrink)
    return TileGrid(height, width, th, tw, tuple(ys), tuple(xs))


def extract_tile(image: torch.Tensor, grid: TileGrid, index: int, pad_mode: str = "replicate") -> torch.Tensor:
    """Tile `index` of `image` [B, C, H, W] as [B, C, tile_h, tile_w], padded where the canvas ends."""
    y, x, vh, vw = grid.box(index)
    t = image[:, :, y:y + vh, x:x + vw]
    if (vh, vw) != (grid.tile_h, grid.tile_w):
        t = F.pad(t, (0, grid.tile_w - vw, 0, grid.tile_h - vh), mode=pad_mode)
    return t


def extract_units(images: torch.Tensor, grid: TileGrid, units: Sequence[int],
                  pad_mode: str = "replicate") -> torch.Tensor:
    """Work units `units` (unit u = image u // len(grid), tile u % len(grid)) stacked as [n, C, tile_h, tile_w]."""
    n = len(grid)
    return torch.cat([extract_tile(images[u // n:u // n + 1], grid, u % n, pad_mode) for u in units])


class Blender:
    """Accumulates window-weighted tiles into canvases, then normalises them by the weight sums.

    `canvases` are float32 tensors [B, C_k, H, W] (zeroed here); results are added per unit
    (image b, tile i). Call `finish()` once to divide in place and get the canvases back.
    """

    def __init__(self, grid: TileGrid, canvases: Sequence[torch.Tensor]):
        self.grid = grid
        self.canvases = list(canvases)
        for c in self.canvases:
            if c.shape[-2:] != (grid.height, grid.width):
                raise ValueError(f"canvas {tuple(c.shape)} does not match the grid {grid.height}x{grid.width}")
            c.zero_()
        device = self.canvases[0].device if self.canvases else None
        wy, wx = grid.windows(device)
        self._window = wy[:, None] * wx[None, :]

    def add(self, image_index: int, tile_index: int, outputs: Sequence[torch.Tensor]) -> None:
        """Add one unit's outputs, each [C_k, tile_h, tile_w] (or [1, C_k, ...])."""
        if len(outputs) != len(self.canvases):
            raise ValueError(f"expected {len(self.canvases)} outputs per tile, got {len(outputs)}")
        y, x, vh, vw = self.grid.box(tile_index)
        for canvas, out in zip(self.canvases, outputs):
            out = out.reshape(out.shape[-3:]) if out.ndim == 4 else out
            if out.shape[-2:] != (self.grid.tile_h, self.grid.tile_w) or out.shape[0] != canvas.shape[1]:
                raise ValueError(f"tile output {tuple(out.shape)} does not match "
                                 f"({canvas.shape[1]}, {self.grid.tile_h}, {self.grid.tile_w})")
            out = out[:, :vh, :vw].to(canvas.device, torch.float32)
            canvas[image_index, :, y:y + vh, x:x + vw].addcmul_(out, self._window[:vh, :vw])

    def finish(self) -> list[torch.Tensor]:
        """Divide every canvas by the weight sum (in place) and return them."""
        if self.canvases:
            wy, wx = self.grid.weight_sums(self.canvases[0].device)
            for c in self.canvases:
                c.div_(wy[:, None]).div_(wx[None, :])
        return self.canvases


def run_batches(total: int, batch_size: int, work: Callable[[range], None], *,
                progress: Progress | None = None, cancel: Cancel | None = None) -> int:
    """Call `work(units)` over 0..total-1 in batches, checking `cancel` before each batch.

    On out-of-memory the batch is halved and retried (down to 1, then the error propagates), so `work`
    must leave no trace of a call that raised: keep results by unit index, not by appending.
    `progress(done, total)` is called once per finished unit. Returns the batch size that worked.
    """
    done, batch_size = 0, max(1, int(batch_size))
    while done < total:
        if cancel is not None and cancel():
            raise UpscaleCancelled(done, total)
        n = min(batch_size, total - done)
        failed = False
        try:
            work(range(done, done + n))
        except Exception as exc:  # noqa: BLE001 - only OOM is handled, everything else re-raised
            if not is_oom(exc) or n == 1:
                raise
            failed = True
        if failed:  # outside the except block, so the failed batch's tensors are already freed
            release_cached_memory()
            batch_size = max(1, n // 2)
            log.warning("out of memory with a batch of %d tiles; retrying with %d", n, batch_size)
            continue
        done += n
        if progress is not None:
            for k in range(done - n + 1, done + 1):
                progress(k, total)
    return batch_size


def blend_tiles(grid: TileGrid, batch: int, work: Callable[[range], Sequence[torch.Tensor]], batch_size: int = 1, *,
                canvases: Sequence[torch.Tensor] | None = None, device: torch.device | str | None = None,
                progress: Progress | None = None, cancel: Cancel | None = None) -> list[torch.Tensor]:
    """The one tile loop: run `work` over every (image, tile) unit of `batch` images and blend its outputs.

    `work(units)` gets a range of units (unit u = image u // len(grid), tile u % len(grid)) and returns
    tensors [n, C_k, tile_h, tile_w]. They are Hann-weighted into `canvases` (float32 [batch, C_k, H, W];
    when None, allocated on `device` from the first outputs), which come back normalised.
    Batching, out-of-memory halving, progress and cancel as in `run_batches`.
    """
    state: dict = {"blender": Blender(grid, canvases) if canvases is not None else None}

    def run(units: range) -> None:
        outs = list(work(units))
        if state["blender"] is None:
            state["blender"] = Blender(grid, [torch.empty(batch, o.shape[1], grid.height, grid.width, device=device)
                                              for o in outs])
        blender = state["blender"]
        # every copy is made before the first tile is added: a batch retried after out-of-memory must
        # find none of its tiles in the canvases
        outs = [o.to(c.device, torch.float32) for o, c in zip(outs, blender.canvases)]
        for k, u in enumerate(units):
            blender.add(u // len(grid), u % len(grid), [o[k] for o in outs])

    run_batches(batch * len(grid), batch_size, run, progress=progress, cancel=cancel)
    return state["blender"].finish()

