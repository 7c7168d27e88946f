"""OCR wrapper used for OCR-A evaluation and for filtering text-free backgrounds.

Backends:
- ``rapidocr`` (default): works offline; the wheel ships PP-OCR ONNX det/rec models. The detector is set
  to ``limit_type=max, limit_side_len=960`` (the default setting upsamples small images and misses text).
- ``paddleocr``: PaddleOCR 3.x with *local* PP-OCR models (it cannot download offline). Give the model
  folder as ``model_dir`` or ``$TADISR_PADDLEOCR_DIR``, holding ``det/`` and ``rec/`` inference models.

Images are ``uint8`` RGB arrays ``(H, W, 3)``. Backends are imported lazily, on first use.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# The metric's own settings, kept fixed so OCR-A figures stay comparable across versions (the product's
# reading, tadisr_core.reading, detects at the image's size up to 4096 px; the metric's images are small).
RAPIDOCR_PARAMS = {"Det.limit_type": "max", "Det.limit_side_len": 960, "Global.log_level": "error"}
MIN_SCORE = 0.5  # PP-OCR drops recognitions below this score


def crop_quad(img: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Perspective-rectify the quadrilateral ``box`` (4x2, clockwise from top-left) out of ``img``.

    Tall results (h/w >= 1.5) are rotated 90 degrees, as PP-OCR does for vertical text lines.
    """
    import cv2

    pts = np.asarray(box, dtype=np.float32).reshape(4, 2)
    w = int(round(max(np.linalg.norm(pts[0] - pts[1]), np.linalg.norm(pts[2] - pts[3]))))
    h = int(round(max(np.linalg.norm(pts[0] - pts[3]), np.linalg.norm(pts[1] - pts[2]))))
    w, h = max(w, 1), max(h, 1)
    dst = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float32)
    m = cv2.getPerspectiveTransform(pts, dst)
    crop = cv2.warpPerspective(np.ascontiguousarray(img), m, (w, h), flags=cv2.INTER_CUBIC,
                               borderMode=cv2.BORDER_REPLICATE)
    if h / w >= 1.5:
        crop = np.ascontiguousarray(np.rot90(crop))
    return crop


def _check_rgb(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) RGB array, got {img.dtype} {img.shape}")
    return img


class OCREngine:
    """Text detection + recognition with a swappable backend ('rapidocr' or 'paddleocr')."""

    def __init__(self, backend: str = "rapidocr", min_score: float = MIN_SCORE,
                 model_dir: str | os.PathLike | None = None):
        if backend not in ("rapidocr", "paddleocr"):
            raise ValueError(f"unknown OCR backend {backend!r}; use 'rapidocr' or 'paddleocr'")
        self.backend = backend
        self.min_score = min_score
        self.model_dir = model_dir
        self._engine = None
        self._rec = None

    def load(self):
        """Load the backend models now (otherwise on first use); raises RuntimeError if unavailable."""
        if self._engine is None:
            if self.backend == "rapidocr":
                from tadisr_core.reading import load_rapidocr

                self._engine = load_rapidocr(RAPIDOCR_PARAMS)  # this module's fixed settings, not the product's
            else:
                self._engine = self._load_paddle()
        return self._engine

    def detect_and_recognize(self, img: np.ndarray) -> list[tuple[np.ndarray, str, float]]:
        """Find text lines in an RGB uint8 image: ``[(box (4, 2) float32, text, score)]``.

        Lines scoring below ``min_score`` or with blank text are dropped; the backend's reading order
        (top-to-bottom, left-to-right) is kept.
        """
        img = _check_rgb(img)
        engine = self.load()
        bgr = np.ascontiguousarray(img[..., ::-1])
        if self.backend == "rapidocr":
            res = engine(bgr, use_det=True, use_cls=True, use_rec=True)
            boxes, txts, scores = getattr(res, "boxes", None), getattr(res, "txts", None), getattr(res, "scores", None)
            found = [] if boxes is None or txts is None else list(zip(boxes, txts, scores))
        else:
            found = []
            for page in engine.predict(bgr):
                found += list(zip(page["rec_polys"], page["rec_texts"], page["rec_scores"]))
        return [(np.asarray(b, dtype=np.float32).reshape(4, 2), str(t), float(s))
                for b, t, s in found if float(s) >= self.min_score and str(t).strip()]

    def recognize(self, crops: list[np.ndarray]) -> list[str]:
        """Recognise one text line per RGB uint8 crop (no detection); returns one string per crop."""
        texts = []
        for crop in crops:
            crop = _check_rgb(crop)
            if min(crop.shape[:2]) < 2:
                texts.append("")
                continue
            bgr = np.ascontiguousarray(crop[..., ::-1])
            if self.backend == "rapidocr":
                # All three flags every call: RapidOCR remembers them between calls.
                res = self.load()(bgr, use_det=False, use_cls=False, use_rec=True)
                txts = getattr(res, "txts", None) or ("",)
                texts.append(str(txts[0]))
            else:
                page = next(iter(self._load_paddle_rec().predict(input=bgr)), None)
                texts.append(str(page["rec_text"]) if page is not None else "")
        return texts

    def has_text(self, img: np.ndarray, min_chars: int = 1) -> bool:
        """True if the detector finds at least one confident line with ``min_chars`` non-space characters."""
        return any(len("".join(t.split())) >= min_chars for _, t, _ in self.detect_and_recognize(img))

    # --- paddleocr ---------------------------------------------------------------------------------
    def _paddle_dirs(self) -> tuple[Path, Path]:
        root = self.model_dir or os.environ.get("TADISR_PADDLEOCR_DIR")
        if not root:
            raise RuntimeError("paddleocr backend: no local models. PaddleOCR cannot download models offline; "
                               "set TADISR_PADDLEOCR_DIR (from Python: pass model_dir=) to a folder with det/ and "
                               "rec/ PP-OCR inference models, or use the rapidocr backend.")
        det, rec = Path(root) / "det", Path(root) / "rec"
        missing = [str(p) for p in (det, rec) if not p.is_dir()]
        if missing:
            raise RuntimeError(f"paddleocr backend: model folders missing: {', '.join(missing)}")
        return det, rec

    def _import_paddle(self):
        try:
            import paddleocr  # noqa: F401
        except ImportError as e:
            raise RuntimeError("paddleocr backend needs the `paddleocr` (3.x) and `paddlepaddle` packages, "
                               f"which are not importable ({e}); install them or use the rapidocr backend.") from e
        return paddleocr

    def _load_paddle(self):
        paddleocr = self._import_paddle()
        det, rec = self._paddle_dirs()
        return paddleocr.PaddleOCR(
            text_detection_model_dir=str(det), text_recognition_model_dir=str(rec),
            use_doc_orientation_classify=False, use_doc_unwarping=False, use_textline_orientation=False,
            text_det_limit_type="max", text_det_limit_side_len=960)

    def _load_paddle_rec(self):
        if self._rec is None:
            paddleocr = self._import_paddle()
            _, rec = self._paddle_dirs()
            self._rec = paddleocr.TextRecognition(model_dir=str(rec))
        return self._rec


_DEFAULT: dict[str, OCREngine] = {}


def default_engine(backend: str = "rapidocr") -> OCREngine:
    """A process-wide shared engine per backend (models load once)."""
    if backend not in _DEFAULT:
        _DEFAULT[backend] = OCREngine(backend)
    return _DEFAULT[backend]


def has_text(img: np.ndarray, min_chars: int = 1, engine: OCREngine | None = None) -> bool:
    """True if ``img`` (uint8 RGB) contains confidently recognised text; for filtering backgrounds."""
    return (engine or default_engine()).has_text(img, min_chars=min_chars)
