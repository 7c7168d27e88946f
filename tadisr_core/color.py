"""Optional colour correction of the super-resolved image: the wavelet colour fix.

One-step diffusion SR can shift colours slightly. The wavelet fix keeps the model's fine detail
(its high frequencies) and takes the coarse colour (the low frequencies) from the bicubic
upscale of the input. `color_fix="auto"` (the default of the CLI, the library and the nodes) applies
the fix a model recommends (`TADiSRModel.default_color_fix`): the shipped demo models, whose colours
drift, get the wavelet fix; the released model and trained runs get none, so their output is left as
it is.

The low-pass is an "a trous" wavelet: a 3x3 binomial kernel applied `levels` times with the
dilation doubling each time (1, 2, 4, ...), borders replicated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

COLOR_FIXES = ("none", "wavelet")
AUTO_COLOR_FIX = "auto"
COLOR_FIX_CHOICES = (AUTO_COLOR_FIX, *COLOR_FIXES)   # what a user may ask for
WAVELET_LEVELS = 5
_BINOMIAL = torch.tensor([1.0, 2.0, 1.0])


def wavelet_lowpass(image: torch.Tensor, levels: int = WAVELET_LEVELS) -> torch.Tensor:
    """The low-frequency part of `image` [B, C, H, W] after `levels` dilated binomial blurs."""
    kernel = torch.outer(_BINOMIAL, _BINOMIAL) / 16.0
    c = image.shape[1]
    weight = kernel.to(image.device, image.dtype).expand(c, 1, 3, 3).contiguous()
    low = image
    for level in range(levels):
        d = 2 ** level
        padded = F.pad(low, (d, d, d, d), mode="replicate")
        low = F.conv2d(padded, weight, dilation=d, groups=c)
    return low


def wavelet_color_fix(image: torch.Tensor, reference: torch.Tensor, levels: int = WAVELET_LEVELS) -> torch.Tensor:
    """`image`'s high frequencies on `reference`'s low frequencies (same shape), clamped to 0..1."""
    if image.shape != reference.shape:
        raise ValueError(f"colour fix: image {tuple(image.shape)} and reference {tuple(reference.shape)} differ")
    ref = reference.to(image.device, image.dtype)
    return (image - wavelet_lowpass(image, levels) + wavelet_lowpass(ref, levels)).clamp(0, 1)


def check_color_fix(mode: str) -> None:
    """ValueError naming the choices unless `mode` is one of `COLOR_FIXES`."""
    if mode not in COLOR_FIXES:
        raise ValueError(f"color_fix must be one of {COLOR_FIXES}, got {mode!r}")


def resolve_color_fix(mode: str, model) -> str:
    """The colour fix to apply: `mode`, or for "auto" the one `model` recommends (its
    `default_color_fix`, "none" when it has none). ValueError naming the choices for anything else."""
    if mode == AUTO_COLOR_FIX:
        return getattr(model, "default_color_fix", "none")
    if mode not in COLOR_FIXES:
        raise ValueError(f"color_fix must be one of {COLOR_FIX_CHOICES}, got {mode!r}")
    return mode


def apply_color_fix(image: torch.Tensor, reference: torch.Tensor, mode: str = "none") -> torch.Tensor:
    """`image` corrected by `mode` ("none" returns it unchanged, "wavelet": see `wavelet_color_fix`)."""
    check_color_fix(mode)
    return image if mode == "none" else wavelet_color_fix(image, reference)
