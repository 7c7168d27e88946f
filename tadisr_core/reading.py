"""Read the text in an image with RapidOCR (optional dependency), and draw what was found.

`read_lines` runs detection + recognition; `keep_in_mask` keeps the lines a text mask covers;
`draw_boxes` outlines them. Images are [3, H, W] float 0..1, masks [1, H, W].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .images import to_uint8

# The detector works on the image at its size (the default setting upsamples small images and misses
# text; shrinking a large one to fit misses its small text) up to DETECT_LIMIT px on the long side:
# about 2.4 GB of memory and 20 s on 2 CPU threads at 4096 x 4096. Larger images are read in tiles of
# that size overlapping by TILE_OVERLAP px, so a line up to that long crossing a tile border is whole in
# one of them.
DETECT_LIMIT = 4096
TILE_OVERLAP = 1024
RAPIDOCR_PARAMS = {"Det.limit_type": "max", "Det.limit_side_len": DETECT_LIMIT, "Global.max_side_len": DETECT_LIMIT,
                   "Global.log_level": "error"}
# RapidOCR pads an image more than _WIDE times wider than high with black bands, which at full size can
# hide all its text (a 3840 x 240 strip: no line found): larger strips are padded with their own
# background first. Images up to _SMALL px are left to RapidOCR as before, as they read well either way.
_WIDE = 8
_SMALL = 960
_ROW_GAP = 10           # lines whose tops are closer than this (px) are one row, read left to right (as RapidOCR)
_EDGE = 2               # a line this close (px) to a tile's inner edge may be cut there
RAPIDOCR_MIN = "3.10"   # older ones download their models at first use (or cannot read RAPIDOCR_PARAMS)
ONNXRUNTIME_MIN = "1.18"  # older ones cannot run rapidocr 3.10's models (ONNX IR version 10)
# onnxruntime's import name is shared by its builds, each its own distribution
ONNXRUNTIME_BUILDS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                      "onnxruntime-silicon", "onnxruntime-qnn")
INSTALL = f'pip install -U "rapidocr>={RAPIDOCR_MIN}" "onnxruntime>={ONNXRUNTIME_MIN}"'


@dataclass
class TextLine:
    """One recognised line: its quadrilateral (4 x (x, y), clockwise from top-left), text and score."""

    box: list[tuple[float, float]]
    text: str
    score: float


def ocr_unavailable() -> str | None:
    """Why RapidOCR cannot read text in this Python (a package missing or too old, and what to install),
    or None (without importing either)."""
    from importlib.metadata import PackageNotFoundError, version
    from importlib.util import find_spec

    from packaging.version import Version

    try:
        found = version("rapidocr")
    except PackageNotFoundError:
        found = None
    missing = [name for name, there in (("rapidocr", found), ("onnxruntime", find_spec("onnxruntime"))) if not there]
    if missing:
        return (f"reading text needs the optional package{'s' * (len(missing) > 1)} {' and '.join(missing)}: "
                f"{INSTALL}")
    if Version(found) < Version(RAPIDOCR_MIN):
        return (f"reading text needs rapidocr {RAPIDOCR_MIN} or newer (older ones download their models), found "
                f"{found}: {INSTALL}")
    for build in ONNXRUNTIME_BUILDS:
        try:
            runtime = version(build)
        except PackageNotFoundError:
            continue
        if Version(runtime) < Version(ONNXRUNTIME_MIN):
            return (f"reading text needs onnxruntime {ONNXRUNTIME_MIN} or newer (older ones cannot run rapidocr's "
                    f"models), found {build} {runtime}: {INSTALL}")
    return None


def load_rapidocr(params: dict | None = None):
    """A RapidOCR engine with `params` (default RAPIDOCR_PARAMS; its PP-OCR ONNX models ship in the wheel);
    RuntimeError saying what to install when rapidocr or onnxruntime is missing or too old."""
    problem = ocr_unavailable()
    if problem:
        raise RuntimeError(problem)
    try:
        from rapidocr import RapidOCR

        return RapidOCR(params=dict(RAPIDOCR_PARAMS if params is None else params))
    except ImportError as exc:  # installed but broken (a missing shared library, say)
        raise RuntimeError(f"rapidocr cannot start ({exc}): {INSTALL}") from None


_engine = None


def _default_engine():
    global _engine
    if _engine is None:
        _engine = load_rapidocr()
    return _engine


def read_lines(image: torch.Tensor, min_score: float = 0.5, engine=None) -> list[TextLine]:
    """Text lines in `image` [3, H, W] in reading order, those scoring below `min_score` dropped (an image
    longer than DETECT_LIMIT is read in overlapping tiles; see `_read_tiles`)."""
    engine = engine or _default_engine()
    rgb = to_uint8(image)
    if max(rgb.shape[:2]) <= DETECT_LIMIT:
        return _read(engine, rgb, min_score)
    return _read_tiles(engine, rgb, min_score)


def _read(engine, rgb: np.ndarray, min_score: float, x0: int = 0, y0: int = 0) -> list[TextLine]:
    """The lines RapidOCR finds in `rgb` (H, W, 3) uint8, in its order, placed at (`x0`, `y0`)."""
    res = engine(np.ascontiguousarray(_pad_wide(rgb)[..., ::-1]), use_det=True, use_cls=True, use_rec=True)
    boxes, txts, scores = getattr(res, "boxes", None), getattr(res, "txts", None), getattr(res, "scores", None)
    if boxes is None or txts is None:
        return []
    lines = []
    for box, text, score in zip(boxes, txts, scores):
        if float(score) >= min_score and str(text).strip():
            pts = np.asarray(box, dtype=np.float32).reshape(4, 2)
            lines.append(TextLine([(float(x) + x0, float(y) + y0) for x, y in pts], str(text), float(score)))
    return lines


def _pad_wide(rgb: np.ndarray) -> np.ndarray:
    """`rgb` (H, W, 3), when longer than _SMALL and more than _WIDE times wider than high, extended
    below with its background (the median of its border pixels) until it is not."""
    h, w = rgb.shape[:2]
    if w <= _SMALL or w <= _WIDE * h:
        return rgb
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    background = np.median(border, axis=0).astype(np.uint8)
    return np.concatenate([rgb, np.broadcast_to(background, (-(-w // _WIDE) - h, w, 3))])


def _read_tiles(engine, rgb: np.ndarray, min_score: float) -> list[TextLine]:
    """The lines of a large image read in overlapping tiles of DETECT_LIMIT px. A line found in several
    tiles is kept once: whole (away from a tile's inner edges) before cut, larger before smaller. A line
    longer than TILE_OVERLAP across a tile border is cut in every tile and may come out in pieces."""
    from .tiling import make_grid

    h, w = rgb.shape[:2]
    grid = make_grid(h, w, DETECT_LIMIT, TILE_OVERLAP)
    found = []
    for index in range(len(grid)):
        y, x, th, tw = grid.box(index)
        inner = (x > 0, y > 0, x + tw < w, y + th < h)      # left, top, right, bottom edges inside the image
        for line in _read(engine, rgb[y:y + th, x:x + tw], min_score, x, y):
            r = _rect(line)
            near = (r[0] - x <= _EDGE, r[1] - y <= _EDGE, x + tw - r[2] <= _EDGE, y + th - r[3] <= _EDGE)
            found.append((any(e and n for e, n in zip(inner, near)), -_area(r), line))
    kept: list[TextLine] = []
    for _, _, line in sorted(found, key=lambda f: f[:2]):
        if all(_overlap(_rect(line), _rect(k)) <= 0.5 for k in kept):
            kept.append(line)
    return _reading_order(kept)


def _rect(line: TextLine) -> tuple[float, float, float, float]:
    """The line's bounding rectangle (x0, y0, x1, y1)."""
    xs, ys = [p[0] for p in line.box], [p[1] for p in line.box]
    return min(xs), min(ys), max(xs), max(ys)


def _area(r: tuple[float, float, float, float]) -> float:
    return max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """The share of the smaller rectangle that the other covers."""
    common = _area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    return common / max(min(_area(a), _area(b)), 1e-6)


def _reading_order(lines: list[TextLine]) -> list[TextLine]:
    """Top to bottom; lines whose tops are less than _ROW_GAP px apart form a row, read left to right."""
    lines = sorted(lines, key=lambda line: line.box[0][1])
    rows = np.cumsum([0] + [b.box[0][1] - a.box[0][1] >= _ROW_GAP for a, b in zip(lines, lines[1:])])
    return [line for _, _, line in sorted(zip(rows, (line.box[0][0] for line in lines), lines),
                                          key=lambda r: r[:2])]


def mask_coverage(line: TextLine, mask: torch.Tensor) -> float:
    """Mean of `mask` [1, H, W] over the line's box, the quadrilateral itself (a slanted line's bounding
    rectangle is mostly background), within the image; 0 when it lies outside."""
    from PIL import Image, ImageDraw

    h, w = mask.shape[-2:]
    left, top, right, bottom = _rect(line)
    x0, x1 = max(0, int(np.floor(left))), min(w, int(np.ceil(right)))
    y0, y1 = max(0, int(np.floor(top))), min(h, int(np.ceil(bottom)))
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
