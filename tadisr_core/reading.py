"""Read the text in an image with RapidOCR (optional dependency), and draw what was found.

`read_lines` runs detection + recognition; `keep_in_mask` keeps the lines a text mask covers;
`draw_boxes` outlines them. Images are [3, H, W] float 0..1, masks [1, H, W].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# The detector works on the image at its size (up to 960 px on the long side): the default
# setting upsamples small images and misses text.
RAPIDOCR_PARAMS = {"Det.limit_type": "max", "Det.limit_side_len": 960, "Global.log_level": "error"}
MISSING = ("reading text needs the optional packages rapidocr and onnxruntime: "
           "pip install rapidocr onnxruntime (in the Python that runs ComfyUI)")


@dataclass
class TextLine:
    """One recognised line: its quadrilateral (4 x (x, y), clockwise from top-left), text and score."""

    box: list[tuple[float, float]]
    text: str
    score: float


def load_rapidocr():
    """A RapidOCR engine (its PP-OCR ONNX models ship in the wheel); RuntimeError saying what to
    install when rapidocr is absent."""
    try:
        from rapidocr import RapidOCR
    except ImportError as exc:
        raise RuntimeError(f"{MISSING} ({exc})") from None
    return RapidOCR(params=dict(RAPIDOCR_PARAMS))


_engine = None


def _default_engine():
    global _engine
    if _engine is None:
        _engine = load_rapidocr()
    return _engine


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] float 0..1 -> (H, W, 3) uint8 RGB."""
    return (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def read_lines(image: torch.Tensor, min_score: float = 0.5, engine=None) -> list[TextLine]:
    """Text lines in `image` [3, H, W] in reading order, those scoring below `min_score` dropped."""
    engine = engine or _default_engine()
    bgr = np.ascontiguousarray(to_uint8(image)[..., ::-1])
    res = engine(bgr, use_det=True, use_cls=True, use_rec=True)
    boxes, txts, scores = getattr(res, "boxes", None), getattr(res, "txts", None), getattr(res, "scores", None)
    if boxes is None or txts is None:
        return []
    lines = []
    for box, text, score in zip(boxes, txts, scores):
        if float(score) >= min_score and str(text).strip():
            pts = np.asarray(box, dtype=np.float32).reshape(4, 2)
            lines.append(TextLine([(float(x), float(y)) for x, y in pts], str(text), float(score)))
    return lines


def mask_coverage(line: TextLine, mask: torch.Tensor) -> float:
    """Mean of `mask` [1, H, W] over the line's box, the quadrilateral itself (a slanted line's bounding
    rectangle is mostly background), within the image; 0 when it lies outside."""
    from PIL import Image, ImageDraw

    h, w = mask.shape[-2:]
    xs, ys = [p[0] for p in line.box], [p[1] for p in line.box]
    x0, x1 = max(0, int(np.floor(min(xs)))), min(w, int(np.ceil(max(xs))))
    y0, y1 = max(0, int(np.floor(min(ys)))), min(h, int(np.ceil(max(ys))))
    if x1 <= x0 or y1 <= y0:
        return 0.0
    crop = mask[..., y0:y1, x0:x1].float().reshape(y1 - y0, x1 - x0)
    quad = Image.new("1", (x1 - x0, y1 - y0), 0)
    ImageDraw.Draw(quad).polygon([(x - x0, y - y0) for x, y in line.box], fill=1)
    inside = torch.from_numpy(np.array(quad, dtype=bool))
    return float(crop[inside].mean() if inside.any() else crop.mean())  # a sliver that covers no pixel centre


def keep_in_mask(lines: list[TextLine], mask: torch.Tensor, min_coverage: float = 0.25) -> list[TextLine]:
    """The lines whose box the mask covers on average by at least `min_coverage`."""
    return [line for line in lines if mask_coverage(line, mask) >= min_coverage]


def draw_boxes(image: torch.Tensor, lines: list[TextLine], color=(1.0, 0.1, 0.1), width: int = 2) -> torch.Tensor:
    """A copy of `image` [3, H, W] with each line's quadrilateral outlined."""
    from PIL import Image, ImageDraw

    canvas = Image.fromarray(to_uint8(image))
    draw = ImageDraw.Draw(canvas)
    rgb = tuple(int(round(c * 255)) for c in color)
    for line in lines:
        draw.polygon(line.box, outline=rgb, width=width)
    out = torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255
    return out.to(image.device)


def lines_text(lines: list[TextLine]) -> str:
    """The recognised lines, one per line of text."""
    return "\n".join(line.text for line in lines)
