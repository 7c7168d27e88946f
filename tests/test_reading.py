"""Reading text with RapidOCR (tadisr_core.reading) on rendered lines: large images at their full size."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from tadisr_core import reading

pytest.importorskip("rapidocr")
pytest.importorskip("onnxruntime")
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
LINE = "INVOICE NUMBER 47{}"


@pytest.fixture(scope="module", autouse=True)
def font():
    if not Path(FONT).is_file():
        pytest.skip("DejaVu font not installed")


def _strip(width: int, xs: list[int], height: int = 240, size: int = 12) -> torch.Tensor:
    """[3, height, width] white with LINE (numbered) in `size` px text at each x, half-way down."""
    im = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(im), ImageFont.truetype(FONT, size)
    for i, x in enumerate(xs):
        draw.text((x, height // 2 - size // 2), LINE.format(i), fill="black", font=font)
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255


def _read(image: torch.Tensor, xs: list[int]) -> None:
    lines = reading.read_lines(image)
    assert [line.text for line in lines] == [LINE.format(i) for i in range(len(xs))]
    assert all(abs(line.box[0][0] - x) < 8 for line, x in zip(lines, xs))


def test_small_text_in_a_large_image_is_read_at_full_size():
    """Defect: detection was capped at 960 px, so a 3840 px wide x4 output was shrunk 4x before it and
    its 12 px lines (3 px then) were missed: none read."""
    _read(_strip(3840, [100, 1000, 1900, 2800]), [100, 1000, 1900, 2800])


def test_an_image_beyond_the_detection_limit_is_read_in_tiles():
    """6000 px: tiles 0-4096 and 1904-6000. The line at 2500 is in both (kept once); the one at 4000
    crosses the first tile's edge (kept whole, from the second)."""
    xs = [100, 1000, 2500, 4000, 5500]
    _read(_strip(6000, xs), xs)
    assert (reading.DETECT_LIMIT, reading.TILE_OVERLAP) == (4096, 1024)  # the tiles the docstring names


def test_images_up_to_960_px_read_as_before():
    from rapidocr import RapidOCR

    before = RapidOCR(params={"Det.limit_type": "max", "Det.limit_side_len": 960, "Global.log_level": "error"})
    for image in (_strip(960, [10, 330, 650], height=60), _strip(900, [40, 400], height=700, size=24)):
        assert reading.read_lines(image) == reading.read_lines(image, engine=before) != []
