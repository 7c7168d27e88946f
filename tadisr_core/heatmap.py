"""The text-attention heat map: captured TACA maps per tile -> one map per image, 0..1.

One implementation for every caller (the CLI's `--attention`, the Text Attention node, the fused
and staged pipelines): select a layer group, reduce the heads (mean or max), resize each tile's map
from the latent grid to the tile (bilinear), blend the tiles like the image tiles (Hann window), and
stretch each image to 0..1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .tiling import Cancel, Progress, TileGrid, blend_tiles

log = logging.getLogger("tadisr")
LAYER_GROUPS = ("all", "down", "mid", "up")
REDUCTIONS = ("mean", "max")


@dataclass
class AttentionTiles:
    """Per-tile TACA maps of one image batch and where each tile sits on the output canvas.

    `maps[u]` is [1, C, h, w] on the latent grid of unit u (image u // len(grid), tile u % len(grid));
    channels are the kept heads of every hooked attn2 layer, down blocks first, then mid, then up;
    `groups` maps "down" / "mid" / "up" to their channel range.
    """

    grid: TileGrid
    batch: int
    maps: list[torch.Tensor]
    groups: dict[str, tuple[int, int]]

    @property
    def size(self) -> tuple[int, int]:
        return self.grid.height, self.grid.width

    def nbytes(self) -> int:
        """Bytes the kept maps take."""
        return sum(m.numel() * m.element_size() for m in self.maps)


def channel_groups(model) -> dict[str, tuple[int, int]]:
    """Channel range of each UNet part in the captured maps (parts without hooked layers absent)."""
    from .attention import cross_attention_layers

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


def check_choice(layers: str, heads: str, groups: dict[str, tuple[int, int]] | None = None) -> None:
    """ValueError naming the choice when `layers` / `heads` is unknown or not captured by this model."""
    if heads not in REDUCTIONS:
        raise ValueError(f"heads must be one of {REDUCTIONS}, got '{heads}'")
    if layers not in LAYER_GROUPS:
        raise ValueError(f"layers must be one of {LAYER_GROUPS}, got '{layers}'")
    if groups is not None and layers != "all" and layers not in groups:
        have = ", ".join(["all", *groups])
        raise ValueError(f"this model captures no attention in the '{layers}' layers; choose one of: {have}")


def tile_heat(maps: torch.Tensor, grid: TileGrid, groups: dict[str, tuple[int, int]] | None = None,
              layers: str = "all", heads: str = "mean") -> torch.Tensor:
    """Maps [n, C, h, w] -> heat [n, 1, tile_h, tile_w]: layer group, head reduction, bilinear resize."""
    if layers != "all":
        lo, hi = (groups or {})[layers]
        maps = maps[:, lo:hi]
    return F.interpolate(reduce_heads(maps, heads), size=(grid.tile_h, grid.tile_w), mode="bilinear",
                         align_corners=False)


def reduce_heads(maps: torch.Tensor, heads: str = "mean") -> torch.Tensor:
    """Maps [n, C, h, w] -> [n, 1, h, w] in float32: each channel clamped to 1, then their mean or max.

    The fused and the staged paths both reduce through here, so their heat maps agree."""
    m = maps.float().clamp_max(1)  # attention probabilities: the latent-grid resize overshoots 1 (bicubic)
    return m.mean(1, keepdim=True) if heads == "mean" else m.amax(1, keepdim=True)


FLAT = 1e-3  # a map whose range is below this share of its magnitude is flat: stretching it shows rounding noise


def stretch(heat: torch.Tensor) -> torch.Tensor:
    """Each image's map [B, 1, H, W] stretched to 0..1 (in place); a flat map (range under `FLAT` of
    its magnitude, e.g. every position at the maximum 1.0) becomes all zeros, with a warning naming it."""
    per_image = heat.flatten(1)
    lo, hi = per_image.min(dim=1).values, per_image.max(dim=1).values
    span = hi - lo
    flat = span <= FLAT * torch.maximum(hi.abs(), lo.abs())
    if flat.any():
        which = flat.nonzero().flatten().tolist()
        log.warning("the text-attention map of image %s of %d is flat (every position %s): it shows no place, so "
                    "the normalised map is all zeros; other layers (or the release model) may show one",
                    ", ".join(str(i + 1) for i in which), len(flat), ", ".join(f"{float(hi[i]):.4g}" for i in which))
    level = flat.view(-1, 1, 1, 1)
    heat.sub_(lo.view(-1, 1, 1, 1)).div_(span.clamp_min(1e-12).view(-1, 1, 1, 1))
    return heat.masked_fill_(level, 0).clamp_(0, 1)


def heatmap(att: AttentionTiles, layers: str = "all", heads: str = "mean", normalize: bool = True, *,
            progress: Progress | None = None, cancel: Cancel | None = None) -> torch.Tensor:
    """The blended heat map [B, 1, H, W] on the CPU; 0..1 when `normalize` (raw probabilities otherwise)."""
    check_choice(layers, heads, att.groups)
    grid = att.grid

    def work(units: range):
        maps = torch.cat([att.maps[u] for u in units])
        return (tile_heat(maps, grid, att.groups, layers, heads),)

    heat = blend_tiles(grid, att.batch, work, 1, device="cpu", progress=progress, cancel=cancel)[0]
    return stretch(heat) if normalize else heat.clamp_(0, 1)
