"""The text nodes without ComfyUI: Text Composite (TADiSR's text pasted into another upscale) and Read
Text (RapidOCR lines, filtered by the text mask); the OCR engine is a stand-in except where said."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
import torch

from nodes import convert, text_tools, upscale
from tests.node_fixtures import TILE, random_image


# -- text composite -----------------------------------------------------------------
def test_text_composite_is_the_other_image_outside_the_grown_mask_and_tadisr_inside(handle):
    image, mask, _ = upscale.upscale(handle, random_image(1, 24, 16, seed=6), **TILE)
    mask = torch.zeros_like(mask)
    mask[:, 30:40, 20:36] = 0.9  # a "text" block
    other = random_image(1, 48, 32, seed=7)  # half size: resized to TADiSR's size
    out, used = text_tools.composite(image, mask, other, grow=6, feather=3, threshold=0.5)
    from tadisr_core.composite import match_size

    resized = convert.image_from_core(match_size(convert.image_to_core(other), 96, 64))
    grown = torch.zeros(1, 96, 64, dtype=torch.bool)
    grown[:, 24:46, 14:42] = True
    core = torch.zeros_like(grown)
    core[:, 30:40, 20:36] = True  # the text (grown by grow - 2 * feather = 0): fully TADiSR's
    assert torch.equal(out[~grown], resized[~grown])
    assert torch.allclose(out[core], image[core], atol=1e-6)
    assert torch.equal(used == 0, ~grown) and torch.all(used[core] == 1)
    ring = grown & ~core
    assert torch.all((used[ring] > 0) & (used[ring] < 1))


def test_text_composite_is_tadisrs_on_text_that_touches_the_image_edge(handle):
    """Defect: the feather blur padded with zeros, so text at the border was blended with the other image."""
    a, b = random_image(1, 16, 16, seed=1), random_image(1, 16, 16, seed=2)
    mask = torch.zeros(1, 16, 16)
    mask[0, 4:8, 0:6] = 1.0                                # a text line that runs out of the left edge
    out, used = text_tools.composite(a, mask, b, grow=4, feather=2)
    assert torch.all(used[0, 4:8, 0:6] == 1) and torch.equal(out[0, 4:8, 0:6], a[0, 4:8, 0:6])


def test_text_composite_without_feather_is_a_hard_paste(handle):
    a, b = random_image(2, 8, 8, seed=1), random_image(1, 8, 8, seed=2)
    mask = torch.zeros(1, 8, 8)
    mask[0, 3, 3] = 1.0
    out, used = text_tools.composite(a, mask, b, grow=1, feather=0)
    inside = used[0] == 1
    assert inside.sum() == 9 and torch.equal(out[0][inside], a[0][inside]) and torch.equal(out[1][~inside],
                                                                                           b[0][~inside])


def test_text_composite_refuses_a_mask_of_another_size_or_batch(v3, handle):
    a, b = random_image(2, 8, 8, seed=1), random_image(3, 8, 8, seed=2)
    with pytest.raises(ValueError, match=r"^TADiSR: the text mask \(16x8\) and the image \(8x8\) differ in size"):
        v3.TADiSRTextComposite.execute(a, torch.zeros(1, 8, 16), b)  # was stretched to fit without a word
    with pytest.raises(ValueError, match=r"^TADiSR: batch sizes differ: TADiSR image 2, text mask 1, other image 3"):
        v3.TADiSRTextComposite.execute(a, torch.zeros(1, 8, 8), b)
    # another picture (4x400) was stretched onto TADiSR's 8x8 without a word; another scale's rounding is fine
    with pytest.raises(ValueError, match=r"^TADiSR: the other image \(4x400\) and the TADiSR image \(8x8\) have other "
                                         r"aspect ratios, so they are not the same picture"):
        v3.TADiSRTextComposite.execute(a, torch.zeros(1, 8, 8), random_image(1, 400, 4, seed=3))
    wide = random_image(1, 97 * 4, 61 * 4, seed=4)
    other = random_image(1, 243, 152, seed=5)  # x2.5 of the same 97 x 61 input, rounded
    image, used = v3.TADiSRTextComposite.execute(wide, torch.zeros(1, 97 * 4, 61 * 4), other)
    assert image.shape == (1, 97 * 4, 61 * 4, 3) and used.shape == (1, 97 * 4, 61 * 4)
    small = random_image(1, 92, 84, seed=6)  # a 21 x 23 input at x4; at x1.5 it is 32 x 34, 3 % off in aspect
    assert v3.TADiSRTextComposite.execute(small, torch.zeros(1, 92, 84), random_image(1, 34, 32, seed=7))[0].shape \
        == (1, 92, 84, 3)


def test_text_composite_names_the_input_that_is_wrong(handle):
    """Defect: "TADiSR: TADiSR: the image must be ..." named neither the input nor stopped repeating itself."""
    a = random_image(1, 8, 8)
    with pytest.raises(ValueError, match=r"^TADiSR: text_mask must be a MASK \[batch, height, width\], got shape "
                                         r"\(1, 1, 8, 8\)$"):
        text_tools.composite(a, torch.zeros(1, 1, 8, 8), a)
    with pytest.raises(ValueError, match=r"^TADiSR: other_image must be \[batch, height, width, channels\]"):
        text_tools.composite(a, torch.zeros(1, 8, 8), torch.rand(1, 8, 8, 2))


def test_text_composite_keeps_the_alpha_of_an_rgba_tadisrrandom_image(handle):
    """Defect: an RGBA TADiSR image (Upscale keeps alpha) came out of the composite with 3 channels."""
    rgba, other = random_image(1, 8, 8, c=4, seed=1), random_image(2, 8, 8, seed=2)
    mask = torch.zeros(1, 8, 8)
    mask[0, 2:5, 2:5] = 1.0
    out, used = text_tools.composite(rgba, mask, other, grow=1, feather=0)
    rgb, _ = text_tools.composite(rgba[..., :3], mask, other, grow=1, feather=0)
    assert out.shape == (2, 8, 8, 4) and torch.equal(out[..., :3], rgb)
    assert torch.equal(out[..., 3], rgba[..., 3].expand(2, -1, -1))


class _FakeOCR:
    """Stands in for RapidOCR's engine: returns fixed lines (the node logic around it is what is tested)."""

    def __call__(self, bgr, **kwargs):
        class Result:
            boxes = [[[2, 2], [10, 2], [10, 6], [2, 6]], [[12, 12], [20, 12], [20, 15], [12, 15]]]
            txts = ("OPEN", "sale")
            scores = (0.9, 0.8)
        assert bgr.shape == (16, 24, 3) and bgr.dtype.name == "uint8"
        return Result()


def test_read_text_lines_mask_filter_and_boxes():
    image = torch.ones(1, 16, 24, 3) * 0.5
    text, boxes = text_tools.read_text(image, engine=_FakeOCR())
    assert text == "OPEN\nsale" and boxes.shape == image.shape and not torch.equal(boxes, image)
    mask = torch.zeros(1, 16, 24)
    mask[:, 12:16, 12:21] = 1
    text, _ = text_tools.read_text(image, mask, engine=_FakeOCR())
    assert text == "sale"
    text, _ = text_tools.read_text(image, engine=_FakeOCR(), min_score=0.85)
    assert text == "OPEN"
    with pytest.raises(ValueError, match="differ in size"):
        text_tools.read_text(image, torch.zeros(1, 8, 8), engine=_FakeOCR())


def test_read_text_pairs_masks_with_images_by_batch_or_refuses(v3):
    """Defect: 3 images with 2 masks read image 3 through image 2's mask, and 1 image with 2 masks
    ignored the second mask, both without a word."""
    images, masks = torch.ones(3, 16, 24, 3) * 0.5, torch.zeros(2, 16, 24)
    with pytest.raises(ValueError, match=r"^TADiSR: batch sizes differ: image 3, text_mask 2; each must be the same"):
        v3.TADiSRReadText.execute(images, text_mask=masks)  # refused before any OCR engine is made
    masks[1, 12:16, 12:21] = 1
    text, boxes = text_tools.read_text(images[:1], masks, engine=_FakeOCR())
    assert text == "\n\nsale" and boxes.shape == (2, 16, 24, 3)  # one reading per mask
    text, _ = text_tools.read_text(images, masks[1:], engine=_FakeOCR())
    assert text == "sale\n\nsale\n\nsale"


def test_a_slanted_line_is_kept_by_the_mask_over_its_box_not_its_bounding_rectangle():
    """Defect: coverage was the mask's mean over the line's axis-aligned bounding rectangle, so a mask
    that covered a 30-degree line's whole box scored 0.26 and one over half of it dropped the line."""
    from PIL import Image, ImageDraw

    from tadisr_core import reading

    box = [(10.0, 40.0), (60.0, 11.0), (65.0, 20.0), (15.0, 49.0)]     # a slanted line's quadrilateral
    drawn = Image.new("L", (80, 60), 0)
    ImageDraw.Draw(drawn).polygon(box, fill=255)
    mask = torch.from_numpy(np.array(drawn, dtype=np.float32) / 255).unsqueeze(0)
    line = reading.TextLine(box, "SLANT", 0.9)
    assert reading.mask_coverage(line, mask) == 1.0
    assert reading.keep_in_mask([line], mask * (torch.rand(mask.shape, generator=torch.Generator().manual_seed(0))
                                                < 0.5), 0.25) == [line]
    assert reading.mask_coverage(reading.TextLine([(90.0, 0.0), (99.0, 0.0), (99.0, 5.0), (90.0, 5.0)], "x", 1.0),
                                 mask) == 0.0                           # outside the image


INSTALL_OCR = 'pip install -U "rapidocr>=3.10" "onnxruntime>=1.18"'


def test_read_text_without_rapidocr_says_what_to_install(monkeypatch):
    import importlib.metadata

    from tadisr_core import reading

    assert reading.ocr_unavailable() is None  # the test extra installs both
    real_version = importlib.metadata.version

    def installed(versions):
        def version(name):
            if name not in versions:
                return real_version(name)
            if versions[name] is None:
                raise importlib.metadata.PackageNotFoundError(name)
            return versions[name]
        monkeypatch.setattr(importlib.metadata, "version", version)

    installed({"rapidocr": None})
    assert reading.ocr_unavailable() == f"reading text needs the optional package rapidocr: {INSTALL_OCR}"
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # rapidocr does not depend on it
    with pytest.raises(RuntimeError, match="^reading text needs the optional packages rapidocr and onnxruntime: "):
        reading.load_rapidocr()
    # defects: onnxruntime missing was found only after the upscale ran, in rapidocr's words; rapidocr
    # before 3.10 downloads its models (offline: an error), before 3.4 refuses our settings
    installed({"rapidocr": "3.10.0"})
    assert reading.ocr_unavailable() == f"reading text needs the optional package onnxruntime: {INSTALL_OCR}"
    monkeypatch.delitem(sys.modules, "onnxruntime")
    installed({"rapidocr": "3.8.0"})
    assert reading.ocr_unavailable() == ("reading text needs rapidocr 3.10 or newer (older ones download their "
                                         f"models), found 3.8.0: {INSTALL_OCR}")
    installed({"rapidocr": "3.10.0", "onnxruntime": "1.17.3"})  # IR version 9 at most
    assert reading.ocr_unavailable() == ("reading text needs onnxruntime 1.18 or newer (older ones cannot run "
                                         f"rapidocr's models), found onnxruntime 1.17.3: {INSTALL_OCR}")
    installed({"rapidocr": "3.10.0", "onnxruntime": None, "onnxruntime-gpu": "1.17.1"})
    assert "found onnxruntime-gpu 1.17.1" in reading.ocr_unavailable()
    installed({"rapidocr": "3.10.0", "onnxruntime": "1.18.0"})
    monkeypatch.setitem(sys.modules, "rapidocr", None)  # installed, but its import fails
    with pytest.raises(RuntimeError, match="^rapidocr cannot start .*" + re.escape(INSTALL_OCR)):
        reading.load_rapidocr()


def test_read_text_and_text_composite_refuse_an_image_outside_0_to_1_naming_it(v3, handle):
    """Defect: Read Text clamped a 0..255 image to white and returned '' without a word; Text Composite
    clamped a 0..255 other_image to white, and NaN in it made the whole output NaN, TADiSR's text too.
    Now the pipeline's input check refuses them, naming the input."""
    from tadisr_core.finite import NonFiniteError

    hint = "but the model reads 0..1: map a -1..1 image with (x + 1) / 2 and a 0..255 one with x / 255"
    bright = random_image(1, 8, 8) * 255
    span = f"{float(bright.min()):.3g}..{float(bright.max()):.3g}"
    with pytest.raises(ValueError) as err:
        v3.TADiSRReadText.execute(bright)
    assert str(err.value) == f"TADiSR: the image's values span {span}, {hint}"
    with pytest.raises(ValueError, match=r"^the image's values span"):  # the logic itself, engine or not
        text_tools.read_text(bright, engine=_FakeOCR())
    tadisr, mask = random_image(1, 8, 8, seed=1), torch.ones(1, 8, 8)
    with pytest.raises(ValueError) as err:
        v3.TADiSRTextComposite.execute(tadisr, mask, bright)
    assert str(err.value) == f"TADiSR: the other_image's values span {span}, {hint}"
    with pytest.raises(ValueError) as err:
        v3.TADiSRTextComposite.execute(bright, mask, tadisr)
    assert str(err.value) == f"TADiSR: the tadisr_image's values span {span}, {hint}"
    broken = random_image(1, 8, 8, seed=2)
    broken[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError) as err:
        v3.TADiSRTextComposite.execute(tadisr, mask, broken)
    assert str(err.value) == ("TADiSR: other_image: 1 non-finite value(s) (NaN/Inf); the image holds NaN or Inf "
                              "pixels: fix or replace it")
    out, _ = v3.TADiSRTextComposite.execute(tadisr, mask, random_image(1, 8, 8, seed=2) * 1.2 - 0.1)  # overshoot passes
    assert torch.equal(out, tadisr)
