"""TADiSR Text Attention, the logic: the captured "text"-token cross-attention as a heat map and an overlay."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import convert, host

# Colour maps as evenly spaced RGB anchors, linearly interpolated.
COLORMAPS = {
    "jet": ((0, 0, .5), (0, 0, 1), (0, .5, 1), (0, 1, 1), (.5, 1, .5), (1, 1, 0), (1, .5, 0), (1, 0, 0), (.5, 0, 0)),
    "inferno": ((0, 0, .016), (.258, .039, .406), (.578, .148, .404), (.865, .317, .226), (.988, .645, .040),
                (.988, 1, .645)),
    "gray": ((0, 0, 0), (1, 1, 1)),
}


def _core_attention_tiles():
    from tadisr_core.heatmap import AttentionTiles

    return AttentionTiles


def from_tiles(tiled):
    """The per-tile maps kept by denoised TiledLatents (`tadisr_core.heatmap.AttentionTiles`)."""
    return tiled.attention_tiles()


def heatmap(att, layers: str = "all", heads: str = "mean", normalize: bool = True,
            progress=None, cancel=None) -> torch.Tensor:
    """Blend the per-tile maps into one heat map [B, 1, H, W] (0..1) like the SR tiles are blended."""
    from tadisr_core.heatmap import heatmap as core_heatmap

    return core_heatmap(att, layers, heads, normalize, progress=progress, cancel=cancel)


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
    """Blend the coloured heat map onto `image` [B, C, H, W]; the heat map is resized to the image (of
    its aspect ratio: another picture is refused)."""
    from tadisr_core.composite import check_same_aspect

    b_img, b_heat = image.shape[0], heat.shape[0]
    if b_img != b_heat and 1 not in (b_img, b_heat):
        raise ValueError(f"TADiSR: the image batch ({b_img}) and the attention batch ({b_heat}) differ")
    check_same_aspect(image, heat, "image", "heat map")
    if heat.shape[-2:] != image.shape[-2:]:
        heat = F.interpolate(heat, size=image.shape[-2:], mode="bilinear", align_corners=False)
    rgb = image[:, :3] if image.shape[1] >= 3 else image.expand(-1, 3, -1, -1)
    return rgb * (1 - opacity) + colorize(heat, colormap) * opacity


def view(attention, image, layers="all", heads="mean", normalize=True, colormap="jet", opacity=0.5):
    """Heat map MASK and overlay IMAGE (ComfyUI layouts) of captured attention."""
    if attention is None:
        raise ValueError("TADiSR: no attention was captured: turn on 'capture_attention' in TADiSR Upscale "
                         "(or take it from TADiSR One-Step Denoise)")
    if not isinstance(attention, _core_attention_tiles()):
        raise ValueError("TADiSR: 'attention' must come from TADiSR One-Step Denoise or TADiSR Upscale")
    host.check_interrupt()
    heat = heatmap(attention, layers, heads, bool(normalize), host.progress_reporter(len(attention.maps)),
                   host.cancel_callback())
    img = convert.image_to_core(image)
    out = overlay(img, heat, colormap, float(opacity))
    dev = host.intermediate_device()
    return convert.mask_from_core(heat, dev), convert.image_from_core(out, dev)
