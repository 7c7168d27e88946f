"""Image-quality metrics: PSNR and SSIM (kornia), and OCR-A (text accuracy on ground-truth text regions).

PSNR/SSIM take float tensors ``(N, 3, H, W)`` (or ``(3, H, W)``) in ``[0, 1]`` and return one value per
image. ``y_channel=True`` compares the BasicSR luma Y = 16 + 65.481 R + 128.553 G + 24.966 B (0-255 scale)
instead of RGB; ``crop_border`` drops that many pixels on every side first (BasicSR's ``crop_border``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

_Y_WEIGHTS = (65.481, 128.553, 24.966)
SSIM_WINDOW = 11  # pixels a side of SSIM's Gaussian window: 'valid' SSIM needs images at least this large


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` RGB array -> float32 ``(1, 3, H, W)`` tensor in ``[0, 1]``."""
    return torch.from_numpy(np.array(img, dtype=np.float32, copy=True)).permute(2, 0, 1)[None] / 255.0


def rgb_to_y(x: torch.Tensor) -> torch.Tensor:
    """BasicSR Y channel of RGB in ``[0, 1]``, returned in ``[0, 1]`` scale (i.e. Y/255), shape ``(N, 1, H, W)``."""
    w = torch.tensor(_Y_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return ((x * w).sum(dim=1, keepdim=True) + 16.0) / 255.0


def _prepare(x: torch.Tensor, y: torch.Tensor, y_channel: bool, crop_border: int, min_side: int = 1):
    """Batched, float, Y or RGB images with `crop_border` pixels dropped a side; ValueError when the
    shapes differ or less than `min_side` pixels a side would be left."""
    if x.dim() == 3:
        x, y = x[None], y[None]
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"images must have equal (N, C, H, W) shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    if not x.is_floating_point():
        x, y = x.float(), y.float()
    if y_channel:
        x, y = rgb_to_y(x), rgb_to_y(y)
    c, (h, w) = int(crop_border), x.shape[-2:]
    if c < 0 or 2 * c >= min(h, w):
        raise ValueError(f"a crop border of {c} pixels leaves nothing of a {w}x{h} image "
                         f"(0 to {(min(h, w) - 1) // 2} pixels a side)")
    if min(h, w) < min_side:  # whatever the crop border
        raise ValueError(f"a {w}x{h} image is smaller than SSIM's {min_side}x{min_side} window")
    if min(h, w) - 2 * c < min_side:
        most = (min(h, w) - min_side) // 2
        raise ValueError(f"a crop border of {c} pixels leaves {w - 2 * c}x{h - 2 * c} of a {w}x{h} image, smaller "
                         f"than SSIM's {min_side}x{min_side} window: use a crop border of at most {most} pixels a side")
    if c:
        x, y = x[..., c:-c, c:-c], y[..., c:-c, c:-c]
    return x, y


def psnr(x: torch.Tensor, y: torch.Tensor, y_channel: bool = False, crop_border: int = 0) -> torch.Tensor:
    """PSNR in dB per image (``inf`` for identical images), data range 1."""
    import kornia.metrics

    x, y = _prepare(x, y, y_channel, crop_border)
    return torch.stack([kornia.metrics.psnr(a, b, 1.0) for a, b in zip(x, y)])


def ssim(x: torch.Tensor, y: torch.Tensor, y_channel: bool = False, crop_border: int = 0,
         window_size: int = SSIM_WINDOW, padding: str = "valid") -> torch.Tensor:
    """Mean SSIM per image: Gaussian window (sigma 1.5), data range 1, channels averaged.

    ``padding='valid'`` averages only where the window fits (BasicSR, and scikit-image with
    ``gaussian_weights=True, use_sample_covariance=False``); ``'same'`` reflect-pads. Either way the
    image left after ``crop_border`` must hold the window (ValueError otherwise, not NaN).
    """
    import kornia.metrics

    x, y = _prepare(x, y, y_channel, crop_border, min_side=window_size)
    return kornia.metrics.ssim(x, y, window_size, max_val=1.0, padding=padding).mean(dim=(1, 2, 3))


# --- OCR-A ---------------------------------------------------------------------------------------------

def text_similarity(pred: str, gt: str, ignore_case: bool = False) -> float:
    """1 - NED: one minus the unit-cost Levenshtein distance over the longer string's length (ICDAR's
    normalised edit distance), on stripped strings; 1.0 if both are empty, 0.0 for a reading with no
    character right. (Until 2026-12-03 it was (len_p + len_g - lev) / (len_p + len_g), which scores a
    wholly wrong reading of the right length 0.5.)"""
    import Levenshtein

    p, g = pred.strip(), gt.strip()
    if ignore_case:
        p, g = p.upper(), g.upper()
    longest = max(len(p), len(g))
    return 1.0 if longest == 0 else 1.0 - Levenshtein.distance(p, g) / longest


@dataclass
class OCRAResult:
    """OCR-A of one image pair: ``score`` is the mean over GT text boxes, ``None`` if the GT has no text."""

    score: float | None
    boxes: list[dict] = field(default_factory=list)  # {"box", "gt", "pred", "score"} per box


def ocr_accuracy(pred: np.ndarray, gt: np.ndarray, engine, ignore_case: bool = False) -> OCRAResult:
    """OCR-A of a prediction against its ground truth (both uint8 RGB ``(H, W, 3)``, same size).

    Text lines are detected on the GT only; each GT box is perspective-cropped from both images and
    both crops go through the same recogniser, so the two texts differ only by image content.
    ``engine`` is a ``training.ocr.OCREngine``.
    """
    from training.ocr import crop_quad

    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in size")
    lines = engine.detect_and_recognize(gt)
    if not lines:
        return OCRAResult(None)
    boxes = [b for b, _, _ in lines]
    texts = engine.recognize([crop_quad(gt, b) for b in boxes] + [crop_quad(pred, b) for b in boxes])
    gt_texts, pred_texts = texts[:len(boxes)], texts[len(boxes):]
    rows = [{"box": b.round(1).tolist(), "gt": g, "pred": p, "score": text_similarity(p, g, ignore_case)}
            for b, g, p in zip(boxes, gt_texts, pred_texts) if g.strip()]
    if not rows:
        return OCRAResult(None)
    return OCRAResult(float(np.mean([r["score"] for r in rows])), rows)


def summarize_ocr(results: list[OCRAResult]) -> dict:
    """Dataset OCR-A: mean over images with GT text (``ocr_a``), mean over all boxes (``ocr_a_pooled``),
    and how many images were scored / excluded for having no GT text."""
    scored = [r for r in results if r.score is not None]
    box_scores = [b["score"] for r in scored for b in r.boxes]
    return {
        "ocr_a": float(np.mean([r.score for r in scored])) if scored else None,
        "ocr_a_pooled": float(np.mean(box_scores)) if box_scores else None,
        "ocr_images": len(scored),
        "ocr_excluded_no_text": len(results) - len(scored),
        "ocr_boxes": len(box_scores),
    }


@dataclass
class MaskCounts:
    """Pixel counts of a binarised text mask against the ground truth; add them up over a dataset."""

    tp: int = 0
    fp: int = 0
    fn: int = 0

    def __add__(self, other: "MaskCounts") -> "MaskCounts":
        return MaskCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    @property
    def iou(self) -> float:
        """|P ∩ G| / |P ∪ G| (1 when both are empty)."""
        union = self.tp + self.fp + self.fn
        return self.tp / union if union else 1.0

    @property
    def f1(self) -> float:
        """2 |P ∩ G| / (|P| + |G|) (1 when both are empty)."""
        total = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / total if total else 1.0


def _no_nan(values: torch.Tensor, what: str) -> torch.Tensor:
    if torch.isnan(values).any():
        raise ValueError(f"cannot score {what} with NaN at {int(torch.isnan(values).sum())} positions")
    return values


def mask_counts(prob: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor, threshold: float = 0.5) -> MaskCounts:
    """Counts of ``prob > threshold`` against ``gt > 0.5`` (same shape; floats in 0..1; NaN is refused)."""
    prob = _no_nan(torch.as_tensor(np.asarray(prob, dtype=np.float32)), "a mask")
    p = prob > threshold
    g = torch.as_tensor(np.asarray(gt, dtype=np.float32)) > 0.5
    if p.shape != g.shape:
        raise ValueError(f"mask shapes differ: prediction {tuple(p.shape)}, ground truth {tuple(g.shape)}")
    return MaskCounts(int((p & g).sum()), int((p & ~g).sum()), int((~p & g).sum()))


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of `scores` for binary `labels` (ties get half credit; 0.5 = chance; NaN
    scores are refused, as they would rank arbitrarily)."""
    s, y = _no_nan(scores.flatten().double(), "ranking scores"), labels.flatten() > 0.5
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = torch.unique(s, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = (ends - (counts.double() - 1) / 2)[inverse]  # average rank of each tie group, 1-based
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
