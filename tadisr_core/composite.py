"""Paste TADiSR's text regions onto another upscaler's image of the same scene.

Pure tensor logic, images [B, C, H, W] and masks [B, 1, H, W] in 0..1:

1. `match_size`: the other image is resized (bicubic, antialiased) to TADiSR's size.
2. `region_mask`: the text mask is thresholded, grown by `grow` px (square neighbourhood) and
   given a linear soft edge that lies *inside* the grown area and outside the text (so `feather`
   is at most half of `grow`): the result is exactly the other image wherever the grown mask is 0
   and exactly TADiSR's on the text.
3. `paste`: other * (1 - mask) + tadisr * mask (RGB; an RGBA TADiSR image keeps its alpha).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _broadcast(a: torch.Tensor, b: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape[0] == b.shape[0]:
        return a, b
    if a.shape[0] == 1:
        return a.expand(b.shape[0], *a.shape[1:]), b
    if b.shape[0] == 1:
        return a, b.expand(a.shape[0], *b.shape[1:])
    raise ValueError(f"{what}: batch sizes {a.shape[0]} and {b.shape[0]} differ (one of them may be 1)")


def match_size(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`image` resized to height x width (bicubic, antialiased when shrinking), clamped to 0..1."""
    if tuple(image.shape[-2:]) == (height, width):
        return image
    out = F.interpolate(image.float(), size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return out.clamp(0, 1)


def grow(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Dilate `mask` [B, 1, H, W] by `pixels` (max over a (2p+1) square)."""
    if pixels <= 0:
        return mask
    return F.max_pool2d(mask, 2 * pixels + 1, stride=1, padding=pixels)


def _box_blur(mask: torch.Tensor, radius: int) -> torch.Tensor:
    if radius <= 0:
        return mask
    k = 2 * radius + 1
    padded = F.pad(mask, (radius, radius, radius, radius), mode="replicate")  # no fade at the image edge
    return F.avg_pool2d(padded, k, stride=1)


def region_mask(mask: torch.Tensor, grow_px: int = 8, feather_px: int = 4, threshold: float = 0.5) -> torch.Tensor:
    """The paste mask: `mask` >= threshold, grown by `grow_px`, with a `feather_px` soft edge inside it.

    The feather is taken out of the growth (at most `grow_px // 2`): the result is 0 outside
    `grow(mask >= threshold, grow_px)` and 1 on `grow(mask >= threshold, grow_px - 2 * feather_px)`.
    """
    if grow_px < 0 or feather_px < 0:
        raise ValueError(f"grow and feather must be >= 0, got {grow_px} and {feather_px}")
    feather_px = min(feather_px, grow_px // 2)
    hard = (mask >= threshold).to(torch.float32)
    core = grow(hard, grow_px - feather_px)
    return _box_blur(core, feather_px).clamp(0, 1)


def paste(base: torch.Tensor, overlay: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`overlay` where `mask` is 1, `base` where it is 0, linearly blended between (same shapes,
    or a batch of 1 on either side)."""
    base, overlay = _broadcast(base, overlay, "paste")
    base, mask = _broadcast(base, mask, "paste")
    return base * (1 - mask) + overlay * mask


def _rgb(image: torch.Tensor) -> torch.Tensor:
    return image.float().expand(-1, 3, -1, -1) if image.shape[1] == 1 else image.float()[:, :3]


def check_mask_size(text_mask: torch.Tensor, image: torch.Tensor) -> None:
    """ValueError unless the text mask [.., H, W] is the size of the image it belongs to [.., H, W]."""
    if tuple(text_mask.shape[-2:]) != tuple(image.shape[-2:]):
        raise ValueError(f"the text mask ({text_mask.shape[-1]}x{text_mask.shape[-2]}) and the image "
                         f"({image.shape[-1]}x{image.shape[-2]}) differ in size; use the mask of this image")


def check_same_aspect(image: torch.Tensor, reference: torch.Tensor, what: str, reference_what: str) -> None:
    """ValueError unless `image` [.., H, W] has `reference`'s aspect ratio up to one pixel of rounding per side
    (each upscaler rounds its output size its own way: a 21 x 23 input is 84 x 92 at x4, 32 x 34 at x1.5):
    resizing another picture to fit would mix two scenes without a word."""
    (h, w), (rh, rw) = image.shape[-2:], reference.shape[-2:]
    if abs(w * rh - rw * h) > w + h + rw + rh:
        raise ValueError(f"the {what} ({w}x{h}) and the {reference_what} ({rw}x{rh}) have other aspect ratios, so "
                         f"they are not the same picture; give the {what} of the same input")


def common_batch(batches: dict[str, int]) -> int:
    """The batch size of inputs named in `batches` (name -> size); ValueError unless each is it or 1."""
    if len(set(batches.values()) - {1}) > 1:
        raise ValueError("batch sizes differ: " + ", ".join(f"{k} {n}" for k, n in batches.items())
                         + "; each must be the same, or 1")
    return max(batches.values())


def text_composite(tadisr: torch.Tensor, text_mask: torch.Tensor, other: torch.Tensor, grow_px: int = 8,
                   feather_px: int = 4, threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(composite [B, C, H, W], used mask [B, 1, H, W]): TADiSR's text regions on the other image, RGB,
    with TADiSR's alpha as a fourth channel when it has one (C = 4).

    `other` (of TADiSR's aspect ratio, `check_same_aspect`) is resized to TADiSR's size; `text_mask` must be
    TADiSR's size (`check_mask_size`). A batch of 1 on any side serves every item of the others.
    """
    check_mask_size(text_mask, tadisr)
    check_same_aspect(other, tadisr, "other image", "TADiSR image")
    common_batch({"TADiSR image": tadisr.shape[0], "text mask": text_mask.shape[0], "other image": other.shape[0]})
    h, w = tadisr.shape[-2:]
    other = match_size(other, h, w)
    used = region_mask(text_mask.float(), grow_px, feather_px, threshold)
    out = paste(_rgb(other), _rgb(tadisr), used)
    if tadisr.shape[1] == 4:
        out = torch.cat([out, tadisr[:, 3:].float().expand(out.shape[0], -1, -1, -1)], 1)
    return out, used.expand(out.shape[0], -1, -1, -1)
