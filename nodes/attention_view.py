"""TADiSR Text Attention, the logic: the captured "text"-token cross-attention as a heat map and an overlay."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import convert, host

LAYER_GROUPS = ("all", "down", "mid", "up")
REDUCTIONS = ("mean", "max")
# Colour maps as evenly spaced RGB anchors, linearly interpolated.
COLORMAPS = {
    "jet": ((0, 0, .5), (0, 0, 1), (0, .5, 1), (0, 1, 1), (.5, 1, .5), (1, 1, 0), (1, .5, 0), (1, 0, 0), (.5, 0, 0)),
    "inferno": ((0, 0, .016), (.258, .039, .406), (.578, .148, .404), (.865, .317, .226), (.988, .645, .040),
                (.988, 1, .645)),
    "gray": ((0, 0, 0), (1, 1, 1)),
}


@dataclass
class CapturedAttention:
    """Per-tile TACA maps of one image batch and where each tile sits on the output canvas.

    `maps[u]` is [1, C, h, w] on the latent grid of unit u (image u // len(grid), tile u % len(grid));
    channels are the kept heads of every hooked attn2 layer, down blocks first, then mid, then up;
    `groups` maps "down" / "mid" / "up" to their channel range.
    """

    grid: object                         # tadisr_core.tiling.TileGrid
    batch: int
    maps: list[torch.Tensor]
    groups: dict[str, tuple[int, int]]

    @property
    def size(self) -> tuple[int, int]:
        return self.grid.height, self.grid.width


def channel_groups(model) -> dict[str, tuple[int, int]]:
    """Channel range of each UNet part in the captured maps (parts without hooked layers absent)."""
    from tadisr_core.attention import cross_attention_layers

    spec = model.spec.attention
    part_names = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}
    groups: dict[str, tuple[int, int]] = {}
    start = 0
    for name, module in cross_attention_layers(model.unet, spec):
        n = len(range(module.heads)[spec.head_slice(module.heads)])
        part = part_names[name.split(".")[0]]
        groups[part] = (groups.get(part, (start, start))[0], start + n)
        start += n
    return groups


def from_tiles(tiled, groups: dict[str, tuple[int, int]]) -> CapturedAttention:
    """CapturedAttention from denoised TiledLatents that kept their per-tile maps."""
    maps = [t.attention for t in tiled.tiles]
    if any(m is None for m in maps):
        raise ValueError("TADiSR: these latents carry no attention maps (denoise ran without capture)")
    return CapturedAttention(tiled.grid, tiled.batch, maps, groups)


def _channels(att: CapturedAttention, layers: str) -> slice:
    if layers == "all":
        return slice(0, None)
    if layers not in att.groups:
        have = ", ".join(["all", *att.groups]) or "all"
        raise ValueError(f"TADiSR: this model captures no attention in the '{layers}' layers; choose one of: {have}")
    lo, hi = att.groups[layers]
    return slice(lo, hi)


def heatmap(att: CapturedAttention, layers: str = "all", heads: str = "mean", normalize: bool = True,
            progress=None, cancel=None) -> torch.Tensor:
    """Blend the per-tile maps into one heat map [B, 1, H, W] (0..1) like the SR tiles are blended."""
    from tadisr_core.tiling import Blender

    if heads not in REDUCTIONS:
        raise ValueError(f"TADiSR: heads must be one of {REDUCTIONS}, got '{heads}'")
    if layers not in LAYER_GROUPS:
        raise ValueError(f"TADiSR: layers must be one of {LAYER_GROUPS}, got '{layers}'")
    sel = _channels(att, layers)
    grid = att.grid
    canvas = torch.empty(att.batch, 1, grid.height, grid.width)
    blender = Blender(grid, [canvas])
    n_tiles = len(grid)
    for u, maps in enumerate(att.maps):
        if cancel is not None:
            cancel()
        m = maps[:, sel].float()
        m = m.mean(1, keepdim=True) if heads == "mean" else m.amax(1, keepdim=True)
        m = F.interpolate(m.cpu(), size=(grid.tile_h, grid.tile_w), mode="bilinear", align_corners=False)
        blender.add(u // n_tiles, u % n_tiles, [m[0]])
        if progress is not None:
            progress(u + 1, len(att.maps))
    heat = blender.finish()[0]
    if normalize:
        flat = heat.flatten(1)
        lo, hi = flat.min(1).values.view(-1, 1, 1, 1), flat.max(1).values.view(-1, 1, 1, 1)
        heat = (heat - lo) / (hi - lo).clamp_min(1e-12)
    return heat.clamp(0, 1)


def colorize(heat: torch.Tensor, colormap: str = "jet") -> torch.Tensor:
    """[B, 1, H, W] in 0..1 -> RGB [B, 3, H, W] through a colour map."""
    if colormap not in COLORMAPS:
        raise ValueError(f"TADiSR: colormap must be one of {tuple(COLORMAPS)}, got '{colormap}'")
    anchors = torch.tensor(COLORMAPS[colormap], dtype=torch.float32)
    pos = heat.clamp(0, 1) * (len(anchors) - 1)
    lo = pos.floor().long().clamp(max=len(anchors) - 2)
    frac = (pos - lo).squeeze(1).unsqueeze(-1)
    rgb = anchors[lo.squeeze(1)] * (1 - frac) + anchors[lo.squeeze(1) + 1] * frac
    return rgb.permute(0, 3, 1, 2)


def overlay(image: torch.Tensor, heat: torch.Tensor, colormap: str = "jet", opacity: float = 0.5) -> torch.Tensor:
    """Blend the coloured heat map onto `image` [B, C, H, W]; the heat map is resized to the image."""
    b_img, b_heat = image.shape[0], heat.shape[0]
    if b_img != b_heat and 1 not in (b_img, b_heat):
        raise ValueError(f"TADiSR: the image batch ({b_img}) and the attention batch ({b_heat}) differ")
    if heat.shape[-2:] != image.shape[-2:]:
        heat = F.interpolate(heat, size=image.shape[-2:], mode="bilinear", align_corners=False)
    rgb = image[:, :3] if image.shape[1] >= 3 else image.expand(-1, 3, -1, -1)
    return rgb * (1 - opacity) + colorize(heat, colormap) * opacity


def view(attention, image, layers="all", heads="mean", normalize=True, colormap="jet", opacity=0.5):
    """Heat map MASK and overlay IMAGE (ComfyUI layouts) of captured attention."""
    if attention is None:
        raise ValueError("TADiSR: no attention was captured: turn on 'capture_attention' in TADiSR Upscale "
                         "(or take it from TADiSR One-Step Denoise)")
    if not isinstance(attention, CapturedAttention):
        raise ValueError("TADiSR: 'attention' must come from TADiSR One-Step Denoise or TADiSR Upscale")
    host.check_interrupt()
    heat = heatmap(attention, layers, heads, bool(normalize), host.progress_reporter(len(attention.maps)),
                   host.cancel_callback())
    img = convert.image_to_core(image)
    out = overlay(img, heat, colormap, float(opacity))
    dev = host.intermediate_device()
    return convert.mask_from_core(heat, dev), convert.image_from_core(out, dev)
