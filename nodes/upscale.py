"""TADiSR Upscale, the logic: image -> upscaled image + text mask (+ captured attention), all in one."""

from __future__ import annotations

from tadisr_core.descriptor import DESCRIPTOR

from . import convert, host, running

SIZE = DESCRIPTOR.size  # default scale, tile and overlap


def upscale(handle, image, scale=SIZE.default_scale, tile=SIZE.default_tile, overlap=SIZE.default_overlap,
            tile_batch=0, attention=False, color_fix="auto", mask=True):
    """(image [B,H,W,C], mask [B,H,W], attention tiles | None) in ComfyUI layouts.

    `mask=False` (the node's text_mask output unconnected): the image alone, faster, the same
    image; the mask returned is all zeros.

    The tiles run fused (encode -> denoise -> decode per batch, blended at once); with attention
    each tile's maps are kept as well. `color_fix="wavelet"` takes the colours from the bicubic
    upscale, "auto" does what the model recommends (tadisr_core.color).
    """
    from tadisr_core import pipeline

    img = convert.image_to_core(image)
    running.check_tiling(scale, tile, overlap)
    batch = running.tile_batch_arg(tile_batch)
    with running.running(handle, running.image_grid(img, scale, tile, overlap), batch,
                         img.shape[0]) as (m, progress, cancel):
        res = pipeline.upscale(m, img, float(scale), int(tile), int(overlap), batch, progress=progress,
                               cancel=cancel, keep_attention=bool(attention), color_fix=color_fix, mask=bool(mask))
    dev = host.intermediate_device()
    out = convert.image_from_core(res.image, dev)
    text_mask = convert.mask_from_core(res.mask, dev) if mask else out.new_zeros(out.shape[:3])
    return out, text_mask, res.attention_tiles
