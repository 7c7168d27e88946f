"""The tiled upscale: LR image -> bicubic x scale -> tiles -> model -> Hann blend -> SR image + text mask.

Two forms with identical numbers for the same tile batches:

* `upscale` runs encode -> denoise -> decode per batch of tiles and blends at once (fused). Its
  memory is the input and output canvases (float32: input C + output C + mask 1 [+ heat map 1]
  channels) plus one tile batch's activations on the model's device, whatever the image size.
  `canvas_device="auto"` keeps the canvases on the GPU when they take at most 20 % of its free
  memory (no host round trip per tile), else on the CPU; results are always returned on the CPU.
  `keep_attention=True` also returns every tile's TACA maps (for the heat-map view), no skips.
* `encode_tiles` -> `denoise_tiles` -> `decode_tiles` run the steps separately (the ComfyUI graph
  blocks). Between the steps they keep what is small: each tile's latents (and its TACA maps when
  the decoder reads them or the caller asks), plus the LR input. The encoder skip features (about
  184 values per output pixel, ~0.43 GB per 768 px tile in fp32) are kept only when all of them fit
  `SKIP_BUDGET_BYTES`; otherwise decode re-encodes each tile for them (about +13 % FLOPs).

`mask=False` (image only) skips the mask work the image does not read (see `TADiSRModel.decode`):
the same image, no text mask. Every form blends through `tiling.blend_tiles`, the one tile loop.
A work unit is one (image, tile) pair; `tile_batch` units go through the model together.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import Callable, TypeVar

import torch
import torch.nn.functional as F

from .color import apply_color_fix, resolve_color_fix
from .descriptor import DESCRIPTOR, check_pixels, is_whole
from .devices import (
    choose_canvas_device,
    choose_tile_batch,
    free_memory,
    host_available_memory,
    is_oom,
    release_cached_memory,
    resolve_device_setting,
)
from .finite import DAMAGED, check_finite, check_input_image
from .heatmap import AttentionTiles, channel_groups, reduce_heads, stretch, tile_heat
from .tiling import Cancel, Progress, TileGrid, UpscaleCancelled, blend_tiles, extract_units, make_grid, run_batches
from .wording import named

__all__ = ["UpscaleResult", "TileState", "TiledLatents", "UpscaleCancelled", "upscale", "encode_tiles",
           "denoise_tiles", "decode_tiles", "upscale_canvas", "output_size", "check_settings", "kept_state_bytes"]

log = logging.getLogger("tadisr")

MIN_TILE = DESCRIPTOR.size.min_tile          # the OOM fallback halves the tile down to this, then gives up
LATENT_FACTOR = DESCRIPTOR.size.tile_multiple
DEFAULT_SCALE = DESCRIPTOR.size.default_scale
DEFAULT_TILE = DESCRIPTOR.size.default_tile
DEFAULT_OVERLAP = DESCRIPTOR.size.default_overlap
SKIP_BUDGET_BYTES = 512 << 20   # the staged path keeps encoder skip features only when all fit this
LUMA = torch.tensor([0.299, 0.587, 0.114])  # BT.601, the weights of PIL's RGB -> L: a gray input's output


@dataclass
class UpscaleResult:
    """SR image [B, 3|4, H, W] (alpha re-attached), text mask [B, 1, H, W] (None when image-only),
    optional heat map [B, 1, H, W], all 0..1, and the per-tile maps when kept."""

    image: torch.Tensor
    mask: torch.Tensor | None
    attention: torch.Tensor | None = None
    grid: TileGrid | None = None      # the tiling actually used (after any out-of-memory fallback)
    attention_tiles: AttentionTiles | None = None


@dataclass
class TileState:
    """What the staged path keeps for one (image, tile) unit, each tensor with batch size 1."""

    latents: torch.Tensor
    skips: list[torch.Tensor] | None
    attention: torch.Tensor | None = None   # full TACA maps, when the decoder reads them or they are kept
    heatmap: torch.Tensor | None = None     # `reduce_heads` of the TACA maps at the latent grid

    def nbytes(self) -> int:
        tensors = [self.latents, self.attention, self.heatmap, *(self.skips or [])]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class TiledLatents:
    """Per-tile model state between the staged steps. Unit u is image u // len(grid), tile u % len(grid)."""

    grid: TileGrid
    batch: int
    tiles: list[TileState]
    scale: float
    channels: int                     # of the input image: 1, 3 or 4
    alpha: torch.Tensor | None        # upscaled alpha [B, 1, H, W], re-attached at decode
    stage: str = "encoded"            # "encoded" or "denoised"
    heatmap: bool = False
    source: torch.Tensor | None = None   # the LR input (float32): skips not kept are re-encoded from it, and
    #                                      the colour fix takes its colours from its bicubic upscale
    groups: dict[str, tuple[int, int]] | None = None   # TACA channel groups of the kept maps
    spec: object = None                  # the encoding model's TADiSRSpec and weights_id (`check_same_model`)
    weights_id: tuple | None = None

    @property
    def size(self) -> tuple[int, int]:
        return self.grid.height, self.grid.width

    def nbytes(self) -> int:
        """Bytes of kept state: per-tile tensors, the LR input and the alpha canvas."""
        extra = [t for t in (self.source, self.alpha) if t is not None]
        return sum(s.nbytes() for s in self.tiles if s is not None) + sum(t.numel() * t.element_size() for t in extra)

    def attention_tiles(self) -> AttentionTiles:
        """The kept per-tile TACA maps (denoise with keep_attention=True)."""
        maps = [t.attention for t in self.tiles]
        if self.stage != "denoised" or any(m is None for m in maps):
            raise ValueError("these latents carry no attention maps (denoise them with keep_attention=True)")
        return AttentionTiles(self.grid, self.batch, maps, self.groups or {})



def _weights_name(weights_id: tuple | None) -> str:
    """The checkpoint file a loaded model's weights_id ends with."""
    last = weights_id[-1] if weights_id else None
    return os.path.basename(last[0] if isinstance(last, tuple) else str(last)) if last else "?"


def check_same_model(model, tiled: TiledLatents) -> None:
    """ValueError when `tiled` was encoded by another model than `model`: another architecture, or
    weights read from other files (the same files in another dtype or on another device are the same
    model). Latents built by hand (no spec recorded) and hand-built models (no weights_id) pass."""
    weights_id = getattr(model, "weights_id", None)
    if tiled.spec is not None and tiled.spec != getattr(model, "spec", tiled.spec):
        why = "a model of another architecture"
    elif None not in (tiled.weights_id, weights_id) and tiled.weights_id != weights_id:
        why = f"the model of {_weights_name(tiled.weights_id)}, not this one ({_weights_name(weights_id)})"
        if _weights_name(tiled.weights_id) == _weights_name(weights_id):
            why += ": a file of that name elsewhere, changed since, or on another Kolors base"
    else:
        return
    raise ValueError(f"these latents were encoded by {why}: encode, denoise and decode with the same model")


def _nonfinite_cause(model) -> str:
    """The likely cause of a non-finite output: fp16's range when the UNet computes in fp16, else damage."""
    conv_in = getattr(getattr(model, "unet", None), "conv_in", None)
    if conv_in is not None and conv_in.weight.dtype == torch.float16:
        return ("the UNet computes in fp16 here, and this model's activations most likely exceed fp16's range "
                f"(65504): load it in bf16 or fp32 ({named('--dtype', 'dtype=')}, or the loader node's dtype input)")
    return DAMAGED


def output_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """Canvas size for an LR image: round(h * scale) x round(w * scale)."""
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def tile_grid(height: int, width: int, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP) -> TileGrid:
    """Where the model's tiles sit on an upscaled canvas of `height` x `width` (latent-aligned tiles,
    one smaller tile on a side shorter than `tile`)."""
    return make_grid(height, width, tile, overlap, multiple=LATENT_FACTOR)


def check_settings(scale: float, tile: int, overlap: int, min_tile: int = LATENT_FACTOR) -> None:
    """ValueError naming the setting when scale, tile or overlap cannot work or has the wrong type (tile and
    overlap are ints, scale a real number; the CLI and nodes ask too)."""
    DESCRIPTOR.check_scale(scale)
    DESCRIPTOR.check_tile(tile, min_tile)
    check_pixels("overlap", overlap)
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be at least 0 and smaller than tile ({tile}), got {overlap}")


def fill_transparent(image: torch.Tensor) -> torch.Tensor:
    """[B, 4, h, w] straight-alpha RGBA with the colour under fully transparent pixels (alpha 0) replaced
    by the alpha-weighted mean colour of the nearest visible pixels, so that no hidden colour bleeds into
    soft edges through the bicubic canvas or the model. Partly transparent pixels keep their colour (it is
    real); an image with no transparent pixel, or no visible one, and any other channel count come back
    as they are (the same tensor when nothing changes).

    Pull pyramid: colour * alpha and alpha are 2 x 2 average-pooled level by level; at each level a pixel
    takes the ratio of their 3 x 3 neighbourhood means where that neighbourhood has weight, else the colour
    of the next coarser level (each level works at its own size: about 4/3 of one full-size pass in all).
    """
    if image.shape[1] != 4:
        return image
    alpha = image[:, 3:]
    todo = (alpha == 0) & alpha.flatten(1).amax(1).gt(0).view(-1, 1, 1, 1)
    if not todo.any():
        return image
    rgb, alpha = image[:, :3].float(), alpha.float()  # fp16's coarse alpha means would underflow to 0 (black)
    level, nears = torch.cat([rgb * alpha, alpha], 1), []
    while True:
        nears.append(F.avg_pool2d(level, 3, stride=1, padding=1))
        if bool((nears[-1][:, 3:] > 0).all()) or max(level.shape[-2:]) == 1:
            break
        level = F.avg_pool2d(level, 2, ceil_mode=True)
    colour = None
    for near in reversed(nears):
        own = near[:, :3] / near[:, 3:].clamp_min(torch.finfo(near.dtype).tiny)
        if colour is not None:
            up = colour.repeat_interleave(2, -2).repeat_interleave(2, -1)[..., :near.shape[-2], :near.shape[-1]]
            own = torch.where(near[:, 3:] > 0, own, up)
        colour = own
    return torch.cat([torch.where(todo, colour, rgb), alpha], 1).to(image.dtype)


def upscale_canvas(image: torch.Tensor, scale: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bicubic x `scale` of [B, C, h, w], clamped to 0..1, float32 on `device` (alpha included; the colour
    under fully transparent pixels is first filled from the visible ones, `fill_transparent`)."""
    h, w = image.shape[-2:]
    size = output_size(h, w, scale)
    image = fill_transparent(image.to(device, torch.float32))
    if size == (h, w):
        return image.clone().clamp_(0, 1)
    return F.interpolate(image, size=size, mode="bicubic", align_corners=False).clamp_(0, 1)


def _resolve_batch(model, grid: TileGrid, units: int, tile_batch: int | str) -> int:
    if tile_batch == "auto" or tile_batch is None:
        n = choose_tile_batch(model, grid.tile_h, grid.tile_w, units)
        log.info("tile batch %d (auto, %dx%d tiles on %s)", n, grid.tile_h, grid.tile_w, model.device)
        return n
    if not is_whole(tile_batch) or tile_batch < 1:
        raise ValueError(f"tile_batch must be >= 1 or 'auto', got {tile_batch!r}")
    return int(tile_batch)


def _noise_seed(sample: bool, generator: torch.Generator | None, seed: int | None) -> int | None:
    """The seed of a run's sampled latent (`_unit_noise`); None when the latent mean is used. A given
    generator is drawn from once."""
    if not sample and (generator is not None or seed is not None):
        raise ValueError("seed and generator seed the sampled latent, but sample is False (the latent's mean "
                         "is used, which needs no seed): pass sample=True, or leave them out")
    if not sample:
        return None
    if generator is not None and seed is not None:
        raise ValueError("give seed or generator, not both: each seeds the sampled latent")
    if generator is not None:
        return int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=generator.device))
    if seed is None:
        return 0
    if isinstance(seed, bool) or not is_whole(seed) or not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed must be a whole number in 0 .. 2**63 - 1, got {seed!r}")
    return int(seed)


def _unit_noise(seed: int | None, units: int) -> Callable[[range], list[torch.Generator] | None]:
    """`generators(batch)` for `model.encode`: one CPU generator per work unit, each seeded by `seed` and the
    unit's number alone, so a tile's noise depends on neither the batch it runs in (`tile_batch`, an
    out-of-memory halving) nor an earlier failed attempt, only on the seed and this attempt's tiling
    (`units` in all). None for every batch when `seed` is None (the latent mean)."""
    if seed is None:
        return lambda batch: None
    seeds = torch.randint(0, 2 ** 62, (units,), generator=torch.Generator().manual_seed(seed)).tolist()
    return lambda batch: [torch.Generator().manual_seed(seeds[u]) for u in batch]


def _as_rgb(image: torch.Tensor) -> torch.Tensor:
    """A gray image [B, 1, H, W] as the RGB image the model sees (a view); RGB as it is."""
    return image.expand(-1, 3, -1, -1) if image.shape[1] == 1 else image


def _is_gray(image: torch.Tensor) -> bool:
    """A gray input: one channel, or gray with alpha (an LA file reads as RGBA of three equal channels)."""
    return image.shape[1] == 1 or (image.shape[1] == 4 and torch.equal(image[:, 0], image[:, 1])
                                   and torch.equal(image[:, 1], image[:, 2]))


def _finish_colours(image: torch.Tensor, canvas: torch.Tensor | None, color_fix: str, gray: bool) -> None:
    """In place on the blended `image`: the colour fix against the bicubic `canvas`, then, for a `gray` input,
    its luma in all three channels: the model's slight colour cast is dropped."""
    if color_fix != "none":
        image[:, :3] = apply_color_fix(image[:, :3], _as_rgb(canvas).to(image.device), color_fix)
    if gray:
        image[:, :3] = torch.einsum("bchw,c->bhw", image[:, :3], LUMA.to(image.device))[:, None]


def _gather(canvas: torch.Tensor, grid: TileGrid, units: range, model) -> torch.Tensor:
    """Model input for `units`: RGB tiles [n, 3, th, tw] on the model's device."""
    x = _as_rgb(extract_units(canvas, grid, units)).to(model.device, non_blocking=True)
    if model.vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _canvases(batch: int, grid: TileGrid, channels: int, mask: bool, heat: bool, device) -> list[torch.Tensor]:
    """Output canvases: image (3 or 4 channels) first, then the mask and heat map when wanted."""
    h, w = grid.height, grid.width
    out = [torch.empty(batch, 4 if channels == 4 else 3, h, w, dtype=torch.float32, device=device)]
    out += [torch.empty(batch, 1, h, w, dtype=torch.float32, device=device) for want in (mask, heat) if want]
    return out


def _canvas_bytes(batch: int, h: int, w: int, channels: int, mask: bool, heat: bool) -> int:
    """Bytes of a run's float32 canvases at h x w: the bicubic input, the image, the mask and heat map."""
    return batch * h * w * (channels + (4 if channels == 4 else 3) + int(mask) + int(heat)) * 4


def _resolve_canvas_device(model, canvas_device, batch: int, h: int, w: int, channels: int, mask: bool, heat: bool):
    if canvas_device != "auto":
        return resolve_device_setting(canvas_device, "canvas_device", "canvas_device")  # no CLI flag sets it
    return choose_canvas_device(model, _canvas_bytes(batch, h, w, channels, mask, heat))


def _warn_of_large_canvases(device: torch.device, canvas_bytes: int, h: int, w: int, tiles: int) -> None:
    """A warning when a run's canvases would take over half of the memory free on `device` (a 4096 px image
    at x4 is a 16384 px output: 8.6 GB of canvases), so that a slow, swapping run is understood."""
    free = free_memory(device) if device.type == "cuda" else host_available_memory()
    if free is not None and canvas_bytes > free / 2:  # unknown (no psutil on Windows): nothing said
        log.warning("the %dx%d output takes %.1f GB for its float32 canvases, more than half of the %.1f GB free on "
                    "%s, and runs %d tiles: it may swap or fail; lower the scale or split the image if that is not "
                    "what you meant", w, h, canvas_bytes / 1e9, free / 1e9, device, tiles)


def _blend(model, grid: TileGrid, batch: int, channels: int, work, tile_batch, *, mask: bool, heat: bool,
           canvas_device, alpha: torch.Tensor | None, progress, cancel) -> UpscaleResult:
    """Run `work(units) -> [image, mask?, heat?]` through the tile loop and finish the canvases."""
    device = _resolve_canvas_device(model, canvas_device, batch, grid.height, grid.width, channels, mask, heat)
    canvases = _canvases(batch, grid, channels, mask, heat, device)
    targets = [canvases[0][:, :3], *canvases[1:]]
    blend_tiles(grid, batch, work, _resolve_batch(model, grid, batch * len(grid), tile_batch), canvases=targets,
                progress=progress, cancel=cancel)
    image = canvases[0]
    image[:, :3].clamp_(0, 1)
    if alpha is not None:
        image[:, 3:].copy_(alpha.to(image.device))
    rest = iter(canvases[1:])
    mask_c = next(rest).sigmoid_().cpu() if mask else None
    heat_c = stretch(next(rest)).cpu() if heat else None
    return UpscaleResult(image.cpu(), mask_c, heat_c, grid)


T = TypeVar("T")


def _low_memory_weights() -> str:
    """The loader's lower-memory settings, in the caller's words (`wording.named`)."""
    offload = named("--offload sequential", "offload='sequential'")
    return f"fp8_e4m3fn weights or sequential offload ({offload}, or ComfyUI's --lowvram)"


def _hinted_oom(exc: BaseException, message: str) -> BaseException:
    """`exc`'s type with `message`: hosts such as ComfyUI act on the out-of-memory type."""
    try:
        return type(exc)(message)
    except TypeError:
        return RuntimeError(message)


def _staged_run(stage: str, grid: TileGrid, run: Callable[[], T]) -> T:
    """run() for a staged step after encode, whose tile size encode fixed: out-of-memory with one tile per
    model call says to encode again with a smaller tile (the all-in-one `upscale` does that itself)."""
    try:
        return run()
    except Exception as exc:  # noqa: BLE001 - only OOM is handled
        if not is_oom(exc):
            raise
        used = max(grid.tile_h, grid.tile_w)
        raise _hinted_oom(exc, f"out of memory in {stage} with one {used} px tile per model call ({exc}); the "
                               f"tile is set at encode: encode again with a smaller tile, or use "
                               f"{_low_memory_weights()}") from exc


def _with_tile_fallback(run: Callable[[int, int], object], tile: int, overlap: int, size: tuple[int, int]):
    """Call run(tile, overlap) on a canvas of `size`; on out-of-memory with one tile per batch, halve
    the tile actually used (a small canvas takes one tile smaller than `tile`) and retry, down to
    MIN_TILE; below that, the out-of-memory error says what else to try."""
    while True:
        try:
            return run(tile, overlap)
        except Exception as exc:  # noqa: BLE001 - only OOM is handled
            if not is_oom(exc):
                raise
            grid = tile_grid(*size, tile, overlap)
            used = max(grid.tile_h, grid.tile_w)
            if used <= MIN_TILE:
                raise _hinted_oom(exc, f"out of memory even with one {used} px tile per model call ({exc}); "
                                       f"use a lower-memory setting: {_low_memory_weights()}, no text mask, "
                                       f"or a smaller tile") from exc
        release_cached_memory()  # outside the except block: the failed attempt's frames are gone
        new_tile = max(MIN_TILE, used // 2 // LATENT_FACTOR * LATENT_FACTOR)
        new_overlap = min(new_tile - LATENT_FACTOR, overlap * new_tile // tile // LATENT_FACTOR * LATENT_FACTOR)
        log.warning("out of memory with one %d px tile; restarting with tile %d, overlap %d", used, new_tile,
                    new_overlap)
        tile, overlap = new_tile, new_overlap


def _split_alpha(hr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    return (hr[:, :3], hr[:, 3:]) if hr.shape[1] == 4 else (hr, None)


@torch.no_grad()
def upscale(model, image: torch.Tensor, scale: float = DEFAULT_SCALE, tile: int = DEFAULT_TILE,
            overlap: int = DEFAULT_OVERLAP, tile_batch: int | str = "auto", *, progress: Progress | None = None,
            cancel: Cancel | None = None,
            attention: bool = False, keep_attention: bool = False, mask: bool = True, sample: bool = False,
            generator: torch.Generator | None = None, seed: int | None = None,
            canvas_device: torch.device | str = "auto", color_fix: str = "auto") -> UpscaleResult:
    """Super-resolve `image` [B, C, h, w] (0..1; C = 1 gray, 3 RGB or 4 RGBA) by `scale`.

    Tiles of `tile` px overlapping by `overlap` go through the model `tile_batch` at a time ("auto":
    from free memory); out-of-memory halves the batch, then the tile. `progress(done, total)` is
    called per tile, `cancel()` is checked between batches (True raises `UpscaleCancelled`).
    `attention=True` also returns the TACA heat map (all layers, head mean of maps clamped to 1, then
    stretched to 0..1 per image: not comparable across images; `heatmap.heatmap(normalize=False)` of
    `attention_tiles` gives the unstretched map); `keep_attention=True`
    returns every tile's maps in `attention_tiles` (see `heatmap.heatmap`). `mask=False` gives the
    image alone, faster (no text mask). `sample` draws the latent like the release (seeded by
    `generator` or `seed`, which are refused without `sample`) instead of using its mean; each tile's
    noise follows from the seed, the tiling and the image's place in the batch alone (the same with any
    `tile_batch`, and after an out-of-memory retry the same as a direct run with the tile that worked;
    image k of a batch does not draw the noise it would draw alone). A gray input (C = 1, or C = 4 with
    three equal colour channels: gray with alpha) gives a gray image, as three equal channels.
    `color_fix="wavelet"` takes the low frequencies from the bicubic canvas, "none" leaves the output
    as it is, "auto" does what the model recommends (see `color.py`). `canvas_device`: where the output
    canvases are blended, "auto" (`devices.choose_canvas_device`: the model's GPU when they take at most a
    fifth of its free memory, else the CPU) or a device. Results are float32 on the CPU.
    """
    check_input_image(image)
    check_settings(scale, tile, overlap)
    color_fix = resolve_color_fix(color_fix, model)  # checked before any tile runs
    size = output_size(image.shape[2], image.shape[3], scale)
    canvas_device = _resolve_canvas_device(model, canvas_device, image.shape[0], *size, image.shape[1], mask,
                                           attention)
    _warn_of_large_canvases(canvas_device, _canvas_bytes(image.shape[0], *size, image.shape[1], mask, attention),
                            *size, image.shape[0] * len(tile_grid(*size, tile, overlap)))
    hr = upscale_canvas(image, scale, canvas_device)
    rgb, alpha = _split_alpha(hr)
    noise_seed = _noise_seed(sample, generator, seed)
    capture = attention or keep_attention or model.needs_capture(mask)
    reads = model.needs_capture(mask)
    cause = _nonfinite_cause(model)
    b = hr.shape[0]

    def run(tile: int, overlap: int) -> UpscaleResult:
        grid = tile_grid(hr.shape[2], hr.shape[3], tile, overlap)
        kept: list[torch.Tensor | None] = [None] * (b * len(grid))  # by unit: a retried batch writes its own again
        noise = _unit_noise(noise_seed, b * len(grid))

        def work(units: range) -> list[torch.Tensor]:
            enc = model.encode(_gather(rgb, grid, units, model), generator=noise(units), sample=sample)
            den = model.denoise(enc.latents, capture=capture)
            dec = model.decode(den.latents, enc.skips, den.attention if reads else None, mask=mask)
            if keep_attention:
                kept[units.start:units.stop] = den.attention.cpu().split(1)
            outs = [dec.image] + ([dec.mask_logits] if mask else [])
            check_finite(outs, f"model output of tiles {units.start + 1}-{units.stop}", cause)
            return outs + ([tile_heat(den.attention, grid)] if attention else [])

        res = _blend(model, grid, b, image.shape[1], work, tile_batch, mask=mask, heat=attention,
                     canvas_device=hr.device, alpha=alpha, progress=progress, cancel=cancel)
        _finish_colours(res.image, rgb, color_fix, gray=_is_gray(image))
        if keep_attention:
            res.attention_tiles = AttentionTiles(grid, b, kept, channel_groups(model))
        return res

    return _with_tile_fallback(run, tile, overlap, size)


def _store(t: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def skip_bytes_per_pixel(model) -> int:
    """Bytes of encoder skip features per tile pixel at the encoder's dtype (c0 + c0/4 + c1/16 + c2/64 values)."""
    c0, c1, c2, _ = model.spec.vae.block_out_channels
    elem = model.vae.encoder.conv_in.weight.element_size()
    return int((c0 + c0 / 4 + c1 / 16 + c2 / 64) * elem)


def kept_state_bytes(model, height: int, width: int, scale: float = DEFAULT_SCALE, tile: int = DEFAULT_TILE,
                     overlap: int = DEFAULT_OVERLAP, batch: int = 1, channels: int = 3, keep_attention: bool = True,
                     keep_skips: bool | str = "auto") -> int:
    """Bytes the staged path keeps for an LR image of `height` x `width` (what `TiledLatents.nbytes` reports)."""
    h, w = output_size(height, width, scale)
    grid = tile_grid(h, w, tile, overlap)
    units, cells = batch * len(grid), grid.tile_h * grid.tile_w
    latent_cells = cells // LATENT_FACTOR ** 2
    per_tile = 4 * latent_cells * model.unet.conv_in.weight.element_size()
    if keep_attention or model.needs_attention:
        from .attention import attention_channels

        per_tile += attention_channels(model.unet, model.spec.attention) * latent_cells * 4
    if _keep_skips(model, keep_skips, units, cells):
        per_tile += skip_bytes_per_pixel(model) * cells
    source = batch * channels * height * width * 4          # the LR input, float32
    alpha = batch * h * w * 4 if channels == 4 else 0
    return units * per_tile + source + alpha


def _keep_skips(model, keep_skips: bool | str, units: int, cells: int) -> bool:
    if not model.spec.skip_convs:
        return False
    if keep_skips == "auto":
        return units * cells * skip_bytes_per_pixel(model) <= SKIP_BUDGET_BYTES
    return bool(keep_skips)


@torch.no_grad()
def encode_tiles(model, image: torch.Tensor, scale: float = DEFAULT_SCALE, tile: int = DEFAULT_TILE,
                 overlap: int = DEFAULT_OVERLAP, tile_batch: int | str = "auto", *, progress: Progress | None = None,
                 cancel: Cancel | None = None,
                 sample: bool = False, generator: torch.Generator | None = None, seed: int | None = None,
                 store_device: torch.device | str = "cpu", keep_skips: bool | str = "auto") -> TiledLatents:
    """Staged step 1: upscale, tile and VAE-encode; keeps each tile's latents (see module doc).

    `scale`, `tile`, `overlap`, `tile_batch`, `progress`, `cancel`, `sample`, `generator` and `seed` are
    as in `upscale`. `store_device`: where the tiles' latents (and the upscaled canvas) are kept between
    the steps. `keep_skips`: True keeps the encoder skip features, False re-encodes at decode, "auto"
    keeps them when all fit SKIP_BUDGET_BYTES.
    """
    check_input_image(image)
    check_settings(scale, tile, overlap)
    hr = upscale_canvas(image, scale, store_device)
    rgb, alpha = _split_alpha(hr)
    alpha = None if alpha is None else alpha.clone()
    noise_seed = _noise_seed(sample, generator, seed)
    b, h, w = hr.shape[0], hr.shape[2], hr.shape[3]

    def run(tile: int, overlap: int) -> TiledLatents:
        grid = tile_grid(h, w, tile, overlap)
        units = b * len(grid)
        keep = _keep_skips(model, keep_skips, units, grid.tile_h * grid.tile_w)
        states: list[TileState | None] = [None] * units  # by unit: a retried batch writes its own again
        noise = _unit_noise(noise_seed, units)

        def work(units: range) -> None:
            enc = model.encode(_gather(rgb, grid, units, model), generator=noise(units), sample=sample)
            for k, u in enumerate(units):
                skips = [_store(s[k:k + 1], store_device) for s in enc.skips] if keep and enc.skips else None
                states[u] = TileState(_store(enc.latents[k:k + 1], store_device), skips)

        run_batches(units, _resolve_batch(model, grid, units, tile_batch), work, progress=progress, cancel=cancel)
        # a copy: the caller may change its tensor before decode_tiles reads this one
        source = image.detach().to(store_device, torch.float32, copy=True)
        return TiledLatents(grid, b, states, float(scale), image.shape[1], alpha,
                            source=source, spec=model.spec, weights_id=model.weights_id)

    return _with_tile_fallback(run, tile, overlap, (h, w))


def _stack(tensors: list[torch.Tensor], device) -> torch.Tensor:
    return torch.cat([t.to(device, non_blocking=True) for t in tensors])


@torch.no_grad()
def denoise_tiles(model, tiled: TiledLatents, capture: bool = False, tile_batch: int | str = "auto", *,
                  keep_attention: bool = False, progress: Progress | None = None,
                  cancel: Cancel | None = None) -> TiledLatents:
    """Staged step 2: the one-step UNet denoise of every tile.

    `capture` keeps the heat map's channel mean per tile; `keep_attention` keeps every tile's full
    TACA maps (for `TiledLatents.attention_tiles`); the maps the decoder reads are always kept.
    `tile_batch`, `progress` and `cancel` are as in `upscale`.
    """
    if tiled.stage != "encoded":
        raise ValueError(f"these tiles are already {tiled.stage}; denoise takes encoded tiles")
    check_same_model(model, tiled)
    keep_full = keep_attention or model.needs_attention
    grab = capture or keep_full
    states: list[TileState | None] = [None] * len(tiled.tiles)

    def work(units: range) -> None:
        den = model.denoise(_stack([tiled.tiles[u].latents for u in units], model.device), capture=grab)
        heat = reduce_heads(den.attention) if capture else None
        for k, u in enumerate(units):
            src = tiled.tiles[u]
            store = src.latents.device
            states[u] = TileState(_store(den.latents[k:k + 1], store), src.skips,
                                  _store(den.attention[k:k + 1], store) if keep_full else None,
                                  _store(heat[k:k + 1], store) if capture else None)

    batch = _resolve_batch(model, tiled.grid, len(tiled.tiles), tile_batch)
    _staged_run("denoise", tiled.grid, lambda: run_batches(len(tiled.tiles), batch, work, progress=progress,
                                                           cancel=cancel))
    groups = channel_groups(model) if keep_full else None
    return replace(tiled, tiles=states, stage="denoised", heatmap=capture, groups=groups)


@torch.no_grad()
def decode_tiles(model, tiled: TiledLatents, tile_batch: int | str = "auto", *, progress: Progress | None = None,
                 cancel: Cancel | None = None, canvas_device: torch.device | str = "auto",
                 mask: bool = True, color_fix: str = "auto") -> UpscaleResult:
    """Staged step 3: joint decode of every tile and the Hann blend into the SR image and text mask.

    Skip features that were not kept are re-encoded from the LR input. `mask=False`: image only.
    `tile_batch`, `progress`, `cancel`, `canvas_device` and `color_fix` are as in `upscale`.
    """
    if tiled.stage != "denoised":
        raise ValueError(f"these tiles are {tiled.stage}; decode takes denoised tiles")
    check_same_model(model, tiled)
    color_fix = resolve_color_fix(color_fix, model)
    grid = tiled.grid
    dev = model.device
    reads = model.needs_capture(mask)
    cause = _nonfinite_cause(model)
    reencode = model.spec.skip_convs and tiled.tiles[0].skips is None
    if (reencode or color_fix != "none") and tiled.source is None:
        raise ValueError("these latents carry no LR input (TiledLatents.source), which decode needs to "
                         f"{'re-encode the skip features' if reencode else 'fix the colours'}: encode with "
                         "encode_tiles, or decode with color_fix='none'")
    rgb = None
    if reencode or color_fix != "none":
        rgb = _split_alpha(upscale_canvas(tiled.source, tiled.scale, tiled.source.device))[0]

    def work(units: range) -> list[torch.Tensor]:
        states = [tiled.tiles[u] for u in units]
        if reencode:
            skips = model.encode(_gather(rgb, grid, units, model)).skips
        elif states[0].skips is not None:
            skips = [_stack([s.skips[j] for s in states], dev) for j in range(len(states[0].skips))]
        else:
            skips = None
        att = _stack([s.attention for s in states], dev) if reads else None
        dec = model.decode(_stack([s.latents for s in states], dev), skips, att, mask=mask)
        outs = [dec.image] + ([dec.mask_logits] if mask else [])
        check_finite(outs, f"model output of tiles {units.start + 1}-{units.stop}", cause)
        if tiled.heatmap:
            outs.append(tile_heat(_stack([s.heatmap for s in states], dev), grid))
        return outs

    res = _staged_run("decode", grid, lambda: _blend(
        model, grid, tiled.batch, tiled.channels, work, tile_batch, mask=mask, heat=tiled.heatmap,
        canvas_device=canvas_device, alpha=tiled.alpha, progress=progress, cancel=cancel))
    _finish_colours(res.image, rgb, color_fix, gray=tiled.channels == 1 or (
        tiled.source is not None and _is_gray(tiled.source)))
    return res
