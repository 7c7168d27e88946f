"""TADiSR training losses: the image loss (MSE + LPIPS + modified focal) and the mask loss
(MSE + sigmoid focal + Dice).

Presets:

- ``paper`` (default): image 1·MSE + 5·LPIPS + 10·MFL; mask 1·MSE(sigmoid(m), t) + 10·focal + 1·Dice.
  LPIPS gets [0, 1] inputs mapped to [-1, 1] (``normalize=True``).
- ``release``: the weights the released CogView4 training script effectively uses:
  image 1·MSE + 5·LPIPS with the [0, 1] inputs *not* mapped to [-1, 1] (the script calls ``lpips``
  without ``normalize=True``), no MFL; mask 1·MSE on the *logits* + 1·focal + 10·Dice. The script's
  intent is 10·focal + 1·Dice, but its helper returns ``(focal, dice)`` and the caller unpacks
  ``(dice, focal)``, so the weights end up swapped; the preset reproduces what actually ran.
  The release's 5·OCR-edge loss (PP-OCR boxes on the GT mask, rectified Sobel edges) is not
  reproduced: it needs an OCR detector inside the training loop.

The modified focal loss (MFL, eq. (8) of the paper) is
``mean((1 - p_correct)^gamma * ||Sobel(sr) - Sobel(hr)||^2)``: the squared difference of the
per-channel Sobel gradients (x and y, every RGB channel; kornia's unnormalised 3x3 kernel, ±1, ±2,
replicate padding), summed over channels and directions, weighted per pixel by how wrong the
predicted text mask is, ``p_correct = sigmoid(m)·t + (1 - sigmoid(m))·(1 - t)``. The weight is not
detached: the MFL also trains the mask stream (towards the GT wherever edges are wrong).
``mfl_detach_weight=True`` stops that gradient (the image stream alone is steered). The released
training scripts use no MFL at all (see the ``release`` preset).

The legibility loss (``ocr``, off in both presets; not in the paper) compares what a text recogniser
sees: the L1 distance between the features of PP-OCR's recogniser backbone
(``training.ocr_features``) on the output and on the ground truth, averaged over the feature cells
that hold GT text (the GT mask max-pooled to the feature grid). Crops without text add nothing.

All terms are means over pixels and over the batch (the release sums focal and Dice over the batch;
at its batch size of 1 that is the same).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import kornia
import torch
import torch.nn.functional as F
from torch import nn

IMAGE_TERMS = ("mse", "lpips", "mfl", "ocr")
MASK_TERMS = ("mask_mse", "mask_focal", "mask_dice")
TERMS = IMAGE_TERMS + MASK_TERMS
GT_MASK_TERMS = ("mfl", "ocr", *MASK_TERMS)  # the terms that read the ground-truth text mask


@dataclass(frozen=True)
class LossWeights:
    """Weights of every term; a zero weight removes the term (it is neither computed nor reported)."""

    mse: float = 1.0
    lpips: float = 5.0
    mfl: float = 10.0
    ocr: float = 0.0
    mask_mse: float = 1.0
    mask_focal: float = 10.0
    mask_dice: float = 1.0


@dataclass(frozen=True)
class LossSettings:
    """Everything that defines the loss: weights plus the knobs that differ between presets."""

    weights: LossWeights = LossWeights()
    lpips_normalize: bool = True      # map [0, 1] to [-1, 1] before LPIPS (the release does not)
    mask_mse_on_logits: bool = False  # MSE(m, t) instead of MSE(sigmoid(m), t) (the release)
    lpips_net: str = "vgg"            # alex | vgg | none
    mfl_gamma: float = 2.0
    mfl_detach_weight: bool = False   # True: the MFL does not train the mask stream
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    dice_smooth: float = 1.0


PRESETS: dict[str, LossSettings] = {
    "paper": LossSettings(),
    "release": LossSettings(
        weights=LossWeights(mse=1.0, lpips=5.0, mfl=0.0, mask_mse=1.0, mask_focal=1.0, mask_dice=10.0),
        lpips_normalize=False, mask_mse_on_logits=True, lpips_net="vgg"),
}


def loss_settings(preset: str = "paper", **overrides) -> LossSettings:
    """A preset's settings with some fields replaced (``None`` values are ignored).

    Weight overrides are given by term name (``mse=2.0``, ``mask_dice=0``).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown loss preset {preset!r}; choose one of {sorted(PRESETS)}")
    base = PRESETS[preset]
    weights = {k: v for k, v in overrides.items() if k in TERMS and v is not None}
    other = {k: v for k, v in overrides.items() if k not in TERMS and v is not None}
    unknown = set(other) - {f.name for f in dataclasses.fields(LossSettings)}
    if unknown:
        raise ValueError(f"unknown loss setting(s) {sorted(unknown)}")
    return dataclasses.replace(base, weights=dataclasses.replace(base.weights, **weights), **other)


# -- elementary terms -----------------------------------------------------------------------------
def sobel_gradients(x: torch.Tensor) -> torch.Tensor:
    """Per-channel unnormalised Sobel gradients of ``[B, C, H, W]`` -> ``[B, C, 2, H, W]`` (x, y)."""
    return kornia.filters.spatial_gradient(x, mode="sobel", normalized=False)


def modified_focal_loss(sr: torch.Tensor, hr: torch.Tensor, mask_logits: torch.Tensor, mask_gt: torch.Tensor,
                        gamma: float = 2.0, detach_weight: bool = False) -> torch.Tensor:
    """Eq. (8): squared Sobel-gradient error of every channel, weighted by ``(1 - p_correct)^gamma``."""
    logits = mask_logits.detach() if detach_weight else mask_logits
    p = torch.sigmoid(logits.float())
    p_correct = p * mask_gt + (1 - p) * (1 - mask_gt)
    weight = (1 - p_correct).clamp_min(0).pow(gamma)
    sq_err = (sobel_gradients(sr) - sobel_gradients(hr)).pow(2).sum(dim=(1, 2))[:, None]
    return (sq_err * weight).mean()


def ocr_feature_loss(sr: torch.Tensor, hr: torch.Tensor, mask_gt: torch.Tensor, features: nn.Module) -> torch.Tensor:
    """L1 between recogniser features of ``sr`` and ``hr``, mean over the feature cells holding GT text."""
    f_sr = features(sr)
    with torch.no_grad():
        f_hr = features(hr)
    weight = F.adaptive_max_pool2d(mask_gt.float(), f_sr.shape[-2:])
    err = (f_sr - f_hr).abs().mean(1, keepdim=True)
    return (err * weight).sum() / weight.sum().clamp_min(1.0)


def sigmoid_focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """RetinaNet focal loss on logits, mean over pixels and batch (``alpha < 0`` disables alpha); kornia's."""
    return kornia.losses.binary_focal_loss_with_logits(logits, target, alpha=alpha if alpha >= 0 else None,
                                                       gamma=gamma, reduction="mean")


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - (2·Σpt + s) / (Σp + Σt + s) per sample with p = sigmoid(logits), mean over the batch."""
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    return (1 - (2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)).mean()


# -- the combined loss ----------------------------------------------------------------------------
class TADiSRLoss(nn.Module):
    """Image + mask loss. ``forward`` returns a dict of unweighted terms plus the weighted ``total``.

    ``lpips``: an LPIPS module (``training.lpips.LPIPS``) or None; required when the LPIPS weight
    is non-zero; ``ocr_features``: a ``training.ocr_features.RecognizerFeatures`` or None, required
    when the ``ocr`` weight is non-zero. ``use_mask=False`` (the no-JSD ablation) drops every term
    that reads the predicted mask: the three mask terms and the MFL.
    """

    def __init__(self, settings: LossSettings = LossSettings(), lpips: nn.Module | None = None,
                 use_mask: bool = True, ocr_features: nn.Module | None = None):
        super().__init__()
        self.settings = settings
        self.lpips = lpips
        self.ocr_features = ocr_features
        w = settings.weights
        self.weights = {name: float(getattr(w, name)) for name in TERMS}
        if not use_mask:
            for name in MASK_TERMS + ("mfl",):
                self.weights[name] = 0.0
        self.weights = {k: v for k, v in self.weights.items() if v != 0.0}
        if "lpips" in self.weights and lpips is None:
            raise ValueError("the LPIPS weight is non-zero but no LPIPS network was given "
                             "(set loss.lpips_net to alex/vgg, or the LPIPS weight to 0)")
        if "ocr" in self.weights and ocr_features is None:
            raise ValueError("the ocr weight is non-zero but no recogniser features were given "
                             "(training.ocr_features.RecognizerFeatures)")

    @property
    def terms(self) -> tuple[str, ...]:
        """Names of the terms this loss computes, in a fixed order."""
        return tuple(t for t in TERMS if t in self.weights)

    def forward(self, sr: torch.Tensor, hr: torch.Tensor, mask_logits: torch.Tensor | None = None,
                mask_gt: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """sr, hr: ``[B, 3, H, W]`` in 0..1; mask_logits, mask_gt: ``[B, 1, H, W]`` (gt in {0, 1})."""
        s = self.settings
        sr, hr = sr.float(), hr.float()
        needs_mask = any(t in self.weights for t in MASK_TERMS + ("mfl",))
        if needs_mask:
            if mask_logits is None or mask_gt is None:
                raise ValueError(f"terms {self.terms} need the predicted mask logits and the GT mask")
            m, t = mask_logits.float(), mask_gt.float()
        if "ocr" in self.weights and mask_gt is None:
            raise ValueError("the ocr term needs the GT mask (it weights the text regions)")
        out: dict[str, torch.Tensor] = {}
        if "mse" in self.weights:
            out["mse"] = F.mse_loss(sr, hr)
        if "lpips" in self.weights:
            out["lpips"] = self.lpips(sr, hr, normalize=s.lpips_normalize).mean()
        if "mfl" in self.weights:
            out["mfl"] = modified_focal_loss(sr, hr, m, t, s.mfl_gamma, s.mfl_detach_weight)
        if "ocr" in self.weights:
            out["ocr"] = ocr_feature_loss(sr, hr, mask_gt, self.ocr_features)
        if "mask_mse" in self.weights:
            out["mask_mse"] = F.mse_loss(m if s.mask_mse_on_logits else torch.sigmoid(m), t)
        if "mask_focal" in self.weights:
            out["mask_focal"] = sigmoid_focal_loss(m, t, s.focal_alpha, s.focal_gamma)
        if "mask_dice" in self.weights:
            out["mask_dice"] = dice_loss(m, t, s.dice_smooth)
        out["total"] = sum((self.weights[k] * v for k, v in out.items()), sr.new_zeros(()))
        return out
