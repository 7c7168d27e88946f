"""The tiled upscale: LR image -> bicubic x scale -> tiles -> model -> Hann blend -> SR image + text mask.

Two forms with identical numbers for the same tile batches:

* `upscale` runs encode -> denoise -> decode per batch of tiles and blends at once (fused). Its
  memory is the input and output canvases (float32: input C + output C + mask 1 [+ heat map 1]
  channels) plus one tile batch's activations on the model's device, whatever the image size.
  `canvas_device="auto"` keeps the canvases on the GPU when they take at most 20 % of its free
  memory (no host round trip per tile), else on the CPU; results are always returned on the CPU.
* `encode_tiles` -> `denoise_tiles` -> `decode_tiles` run the steps separately (the ComfyUI graph
  blocks). They must keep every tile's latents *and encoder skip features* between steps on
  `store_device` (CPU by default): about 184 values per output pixel (c0 * 1.25 + c1 / 16 + c2 / 64
  for the Kolors VAE), i.e. ~0.43 GB per 768 px tile in fp32 (half in bf16/fp16), ~14 GB for a
  4096 px fp32 output. Prefer `upscale` unless the steps must be separate.

A work unit is one (image, tile) pair; `tile_batch` units go through the model together.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from .color import apply_color_fix
from .devices import choose_canvas_device, choose_tile_batch, is_oom, release_cached_memory
from .tiling import Blender, Cancel, Progress, TileGrid, UpscaleCancelled, extract_units, make_grid, run_batches

__all__ = ["UpscaleResult", "TileState", "TiledLatents", "UpscaleCancelled", "upscale", "encode_tiles",
           "denoise_tiles", "decode_tiles", "upscale_canvas", "output_size", "check_settings"]

log = logging.getLogger("tadisr")

MIN_TILE = 64          # the OOM fallback halves the tile down to this, then gives up
LATENT_FACTOR = 8
MAX_SCALE = 8.0


@dataclass
class UpscaleResult:
    """SR image [B, 3|4, H, W] (alpha re-attached), text mask [B, 1, H, W] and optional heat map, all 0..1."""

    image: torch.Tensor
    mask: torch.Tensor
    attention: torch.Tensor | None = None
    grid: TileGrid | None = None      # the tiling actually used (after any out-of-memory fallback)


@dataclass
class TileState:
    """What the staged path keeps for one (image, tile) unit, each tensor with batch size 1."""

    latents: torch.Tensor
    skips: list[torch.Tensor] | None
    attention: torch.Tensor | None = None   # full TACA maps, only when the decoder reads them
    heatmap: torch.Tensor | None = None     # channel mean of the TACA maps at the latent grid


@dataclass
class TiledLatents:
    """Per-tile model state between the staged steps. Unit u is image u // len(grid), tile u % len(grid)."""

    grid: TileGrid
    batch: int
    tiles: list[TileState]
    source_size: tuple[int, int]
    scale: float
    channels: int                     # of the input image: 1, 3 or 4
    alpha: torch.Tensor | None        # upscaled alpha [B, 1, H, W], re-attached at decode
    stage: str = "encoded"            # "encoded" or "denoised"
    heatmap: bool = False

    @property
    def size(self) -> tuple[int, int]:
        return self.grid.height, self.grid.width


def output_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """Canvas size for an LR image: round(h * scale) x round(w * scale)."""
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def _check_input(image: torch.Tensor) -> None:
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[1] not in (1, 3, 4):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"expected an image [B, C, H, W] with C in 1, 3, 4 (gray, RGB, RGBA), got {shape}")
    if not image.is_floating_point():
        raise ValueError(f"expected a float image in 0..1, got dtype {image.dtype}")


def check_settings(scale: float, tile: int, overlap: int, min_tile: int = LATENT_FACTOR) -> None:
    """ValueError naming the setting when scale, tile or overlap cannot work (the CLI and nodes ask too)."""
    if not 1 <= scale <= MAX_SCALE:
        raise ValueError(f"scale must be between 1 and {MAX_SCALE:g}, got {scale:g}")
    if tile < min_tile or tile % LATENT_FACTOR:
        raise ValueError(f"tile must be a multiple of {LATENT_FACTOR} and at least {min_tile}, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be at least 0 and smaller than tile ({tile}), got {overlap}")


def upscale_canvas(image: torch.Tensor, scale: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bicubic x `scale` of [B, C, h, w], clamped to 0..1, float32 on `device` (alpha included)."""
    h, w = image.shape[-2:]
    size = output_size(h, w, scale)
    image = image.to(device, torch.float32)
    if size == (h, w):
        return image.clone().clamp_(0, 1)
    return F.interpolate(image, size=size, mode="bicubic", align_corners=False).clamp_(0, 1)


def _resolve_batch(model, grid: TileGrid, units: int, tile_batch: int | str) -> int:
    if tile_batch == "auto" or tile_batch is None:
        n = choose_tile_batch(model, grid.tile_h, grid.tile_w, units)
        log.info("tile batch %d (auto, %dx%d tiles on %s)", n, grid.tile_h, grid.tile_w, model.device)
        return n
    n = int(tile_batch)
    if n < 1:
        raise ValueError(f"tile_batch must be >= 1 or 'auto', got {tile_batch}")
    return n


def _generator(model, sample: bool, generator: torch.Generator | None, seed: int | None):
    if not sample or generator is not None:
        return generator
    return torch.Generator(model.device).manual_seed(0 if seed is None else int(seed))


def _gather(canvas: torch.Tensor, grid: TileGrid, units: range, model) -> torch.Tensor:
    """Model input for `units`: RGB tiles [n, 3, th, tw] on the model's device."""
    tiles = extract_units(canvas, grid, units)
    if tiles.shape[1] == 1:
        tiles = tiles.expand(-1, 3, -1, -1)
    x = tiles.to(model.device, non_blocking=True)
    if model.vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _heat_tile(heat: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """Latent-grid heat map [n, 1, h, w] -> tile size, bilinear."""
    return F.interpolate(heat.float(), size=(grid.tile_h, grid.tile_w), mode="bilinear", align_corners=False)


def _channel_mean(attention: torch.Tensor) -> torch.Tensor:
    return attention.float().mean(dim=1, keepdim=True)


def _canvases(batch: int, grid: TileGrid, channels: int, heat: bool, device) -> tuple[torch.Tensor, ...]:
    h, w = grid.height, grid.width
    image = torch.empty(batch, 4 if channels == 4 else 3, h, w, device=device)
    mask = torch.empty(batch, 1, h, w, device=device)
    attention = torch.empty(batch, 1, h, w, device=device) if heat else None
    return image, mask, attention


def _resolve_canvas_device(model, canvas_device, batch: int, h: int, w: int, channels: int, heat: bool):
    if canvas_device != "auto":
        return torch.device(canvas_device)
    per_pixel = channels + (4 if channels == 4 else 3) + 1 + (1 if heat else 0)
    return choose_canvas_device(model, batch * h * w * per_pixel * 4)


def _finish(image, mask, attention, alpha, grid: TileGrid) -> UpscaleResult:
    image[:, :3].clamp_(0, 1)
    if alpha is not None:
        image[:, 3:].copy_(alpha)
    mask.sigmoid_()
    if attention is not None:
        flat = attention.flatten(1)
        lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
        attention.sub_(lo.view(-1, 1, 1, 1)).div_((hi - lo).clamp_min(1e-12).view(-1, 1, 1, 1))
    image, mask = image.cpu(), mask.cpu()
    return UpscaleResult(image, mask, None if attention is None else attention.cpu(), grid)


def _with_tile_fallback(run: Callable[[int, int], object], tile: int, overlap: int):
    """Call run(tile, overlap); on out-of-memory with one tile per batch, halve the tile and retry."""
    while True:
        failed = False
        try:
            return run(tile, overlap)
        except Exception as exc:  # noqa: BLE001 - only OOM is handled
            if not is_oom(exc) or tile // 2 < MIN_TILE:
                raise
            failed = True
        if failed:
            release_cached_memory()
            new_tile = max(MIN_TILE, tile // 2 // LATENT_FACTOR * LATENT_FACTOR)
            new_overlap = min(new_tile - LATENT_FACTOR, overlap * new_tile // tile // LATENT_FACTOR * LATENT_FACTOR)
            log.warning("out of memory with one %d px tile; restarting with tile %d, overlap %d",
                        tile, new_tile, new_overlap)
            tile, overlap = new_tile, new_overlap


@torch.no_grad()
def upscale(model, image: torch.Tensor, scale: float = 4, tile: int = 768, overlap: int = 256,
            tile_batch: int | str = "auto", *, progress: Progress | None = None, cancel: Cancel | None = None,
            attention: bool = False, sample: bool = False, generator: torch.Generator | None = None,
            seed: int | None = None, canvas_device: torch.device | str = "auto",
            color_fix: str = "none") -> UpscaleResult:
    """Super-resolve `image` [B, C, h, w] (0..1; C = 1 gray, 3 RGB or 4 RGBA) by `scale`.

    Tiles of `tile` px overlapping by `overlap` go through the model `tile_batch` at a time ("auto":
    from free memory); out-of-memory halves the batch, then the tile. `progress(done, total)` is
    called per tile, `cancel()` is checked between batches (True raises `UpscaleCancelled`).
    `attention=True` also returns the TACA heat map. `sample` draws the latent like the release
    (seeded by `generator` or `seed`) instead of using its mean. `color_fix="wavelet"` takes the
    low frequencies from the bicubic canvas (see `color.py`). Results are float32 on the CPU.
    """
    _check_input(image)
    check_settings(scale, tile, overlap)
    size = output_size(image.shape[2], image.shape[3], scale)
    canvas_device = _resolve_canvas_device(model, canvas_device, image.shape[0], *size, image.shape[1], attention)
    hr = upscale_canvas(image, scale, canvas_device)
    rgb = hr[:, :3] if hr.shape[1] == 4 else hr
    alpha = hr[:, 3:] if hr.shape[1] == 4 else None
    gen = _generator(model, sample, generator, seed)
    capture = attention or model.needs_attention
    b, h, w = hr.shape[0], hr.shape[2], hr.shape[3]

    def run(tile: int, overlap: int) -> UpscaleResult:
        grid = make_grid(h, w, tile, overlap, multiple=LATENT_FACTOR)
        img_c, mask_c, heat_c = _canvases(b, grid, image.shape[1], attention, hr.device)
        blender = Blender(grid, [img_c[:, :3], mask_c] + ([heat_c] if attention else []))

        def work(units: range) -> None:
            enc = model.encode(_gather(rgb, grid, units, model), generator=gen, sample=sample)
            den = model.denoise(enc.latents, capture=capture)
            dec = model.decode(den.latents, enc.skips, den.attention if model.needs_attention else None)
            outs = [dec.image, dec.mask_logits]
            if attention:
                outs.append(_heat_tile(_channel_mean(den.attention), grid))
            for k, u in enumerate(units):
                blender.add(u // len(grid), u % len(grid), [o[k] for o in outs])

        units = b * len(grid)
        run_batches(units, _resolve_batch(model, grid, units, tile_batch), work, progress=progress, cancel=cancel)
        blender.finish()
        if color_fix != "none":
            img_c[:, :3] = apply_color_fix(img_c[:, :3].clamp(0, 1), rgb, color_fix)
        return _finish(img_c, mask_c, heat_c, alpha, grid)

    return _with_tile_fallback(run, tile, overlap)


def _store(t: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


@torch.no_grad()
def encode_tiles(model, image: torch.Tensor, scale: float = 4, tile: int = 768, overlap: int = 256,
                 tile_batch: int | str = "auto", *, progress: Progress | None = None, cancel: Cancel | None = None,
                 sample: bool = False, generator: torch.Generator | None = None, seed: int | None = None,
                 store_device: torch.device | str = "cpu") -> TiledLatents:
    """Staged step 1: upscale, tile and VAE-encode; keeps latents and skip features per tile (see module doc)."""
    _check_input(image)
    check_settings(scale, tile, overlap)
    hr = upscale_canvas(image, scale, store_device)
    rgb = hr[:, :3] if hr.shape[1] == 4 else hr
    alpha = hr[:, 3:].clone() if hr.shape[1] == 4 else None
    gen = _generator(model, sample, generator, seed)
    b, h, w = hr.shape[0], hr.shape[2], hr.shape[3]

    def run(tile: int, overlap: int) -> TiledLatents:
        grid = make_grid(h, w, tile, overlap, multiple=LATENT_FACTOR)
        states: list[TileState] = []

        def work(units: range) -> None:
            enc = model.encode(_gather(rgb, grid, units, model), generator=gen, sample=sample)
            for k in range(len(units)):
                skips = None if enc.skips is None else [_store(s[k:k + 1], store_device) for s in enc.skips]
                states.append(TileState(_store(enc.latents[k:k + 1], store_device), skips))

        units = b * len(grid)
        run_batches(units, _resolve_batch(model, grid, units, tile_batch), work, progress=progress, cancel=cancel)
        return TiledLatents(grid, b, states, tuple(image.shape[-2:]), float(scale), image.shape[1], alpha)

    return _with_tile_fallback(run, tile, overlap)


def _stack(tensors: list[torch.Tensor], device) -> torch.Tensor:
    return torch.cat([t.to(device, non_blocking=True) for t in tensors])


@torch.no_grad()
def denoise_tiles(model, tiled: TiledLatents, capture: bool = False, tile_batch: int | str = "auto", *,
                  progress: Progress | None = None, cancel: Cancel | None = None) -> TiledLatents:
    """Staged step 2: the one-step UNet denoise of every tile. `capture` also keeps the TACA heat map."""
    if tiled.stage != "encoded":
        raise ValueError(f"these tiles are already {tiled.stage}; denoise takes encoded tiles")
    need_full = model.needs_attention
    grab = capture or need_full
    states: list[TileState | None] = [None] * len(tiled.tiles)

    def work(units: range) -> None:
        den = model.denoise(_stack([tiled.tiles[u].latents for u in units], model.device), capture=grab)
        heat = _channel_mean(den.attention) if capture else None
        for k, u in enumerate(units):
            src = tiled.tiles[u]
            store = src.latents.device
            states[u] = TileState(_store(den.latents[k:k + 1], store), src.skips,
                                  _store(den.attention[k:k + 1], store) if need_full else None,
                                  _store(heat[k:k + 1], store) if capture else None)

    batch = _resolve_batch(model, tiled.grid, len(tiled.tiles), tile_batch)
    run_batches(len(tiled.tiles), batch, work, progress=progress, cancel=cancel)
    return replace(tiled, tiles=states, stage="denoised", heatmap=capture)


@torch.no_grad()
def decode_tiles(model, tiled: TiledLatents, tile_batch: int | str = "auto", *, progress: Progress | None = None,
                 cancel: Cancel | None = None, canvas_device: torch.device | str = "auto") -> UpscaleResult:
    """Staged step 3: joint decode of every tile and the Hann blend into the SR image and text mask."""
    grid = tiled.grid
    heat = tiled.heatmap
    canvas_device = _resolve_canvas_device(model, canvas_device, tiled.batch, grid.height, grid.width, 0, heat)
    img_c, mask_c, heat_c = _canvases(tiled.batch, grid, tiled.channels, heat, canvas_device)
    blender = Blender(grid, [img_c[:, :3], mask_c] + ([heat_c] if heat else []))
    dev = model.device

    def work(units: range) -> None:
        states = [tiled.tiles[u] for u in units]
        skips = None
        if states[0].skips is not None:
            skips = [_stack([s.skips[j] for s in states], dev) for j in range(len(states[0].skips))]
        att = _stack([s.attention for s in states], dev) if states[0].attention is not None else None
        dec = model.decode(_stack([s.latents for s in states], dev), skips, att)
        outs = [dec.image, dec.mask_logits]
        if heat:
            outs.append(_heat_tile(_stack([s.heatmap for s in states], dev), grid))
        for k, u in enumerate(units):
            blender.add(u // len(grid), u % len(grid), [o[k] for o in outs])

    batch = _resolve_batch(model, grid, len(tiled.tiles), tile_batch)
    run_batches(len(tiled.tiles), batch, work, progress=progress, cancel=cancel)
    blender.finish()
    alpha = None if tiled.alpha is None else tiled.alpha.to(img_c.device)
    return _finish(img_c, mask_c, heat_c, alpha, grid)
