"""TADiSR Text Composite and TADiSR Read Text, the logic (ComfyUI layouts in and out)."""

from __future__ import annotations

import torch

from . import convert, host


def composite(tadisr_image, text_mask, other_image, grow=8, feather=4, threshold=0.5):
    """(IMAGE, MASK): TADiSR's text regions pasted onto `other_image` (resized to TADiSR's size); the IMAGE
    keeps `tadisr_image`'s alpha. Images outside 0..1 or with NaN are refused, naming the input."""
    from tadisr_core.composite import text_composite
    from tadisr_core.finite import check_input_image

    host.check_interrupt()
    tadisr = convert.image_to_core(tadisr_image, "tadisr_image")
    mask = convert.mask_to_core(text_mask, "text_mask")
    other = convert.image_to_core(other_image, "other_image")
    check_input_image(tadisr, "tadisr_image")
    check_input_image(other, "other_image")  # 0..255 would be clamped to white, NaN would spread through the blend
    out, used = text_composite(tadisr, mask, other, int(grow), int(feather), float(threshold))
    dev = host.intermediate_device()
    return convert.image_from_core(out, dev), convert.mask_from_core(used, dev)


def read_text(image, text_mask=None, min_score=0.5, min_coverage=0.25, engine=None):
    """(STRING, IMAGE): the recognised lines (images of a batch separated by a blank line) and the
    image with their boxes drawn. With a mask, only lines it covers are kept. An image outside 0..1 or
    with NaN is refused."""
    from tadisr_core import reading
    from tadisr_core.composite import check_mask_size, common_batch
    from tadisr_core.finite import check_input_image

    img = convert.image_to_core(image, "image")
    check_input_image(img, "image")  # a 0..255 image would be read as white: no text, without a word
    mask = None if text_mask is None else convert.mask_to_core(text_mask, "text_mask")
    count = img.shape[0]
    if mask is not None:
        check_mask_size(mask, img)
        count = common_batch({"image": img.shape[0], "text_mask": mask.shape[0]})
    texts, drawn = [], []
    for b in range(count):  # a batch of 1 on either side serves every item of the other
        host.check_interrupt()
        one = img[min(b, img.shape[0] - 1)]
        rgb = one[:3] if one.shape[0] >= 3 else one.expand(3, -1, -1)
        lines = reading.read_lines(rgb, float(min_score), engine=engine)
        if mask is not None:
            lines = reading.keep_in_mask(lines, mask[min(b, mask.shape[0] - 1)], float(min_coverage))
        texts.append(reading.lines_text(lines))
        drawn.append(reading.draw_boxes(rgb, lines))
    return "\n\n".join(texts), convert.image_from_core(torch.stack(drawn), host.intermediate_device())
