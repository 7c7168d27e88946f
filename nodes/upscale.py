"""TADiSR Upscale: image -> upscaled image + text mask (+ captured attention), all in one node."""

from __future__ import annotations

from . import convert, host, running
from .types import TADISR_ATTENTION


def upscale(handle, image, scale=4.0, tile=768, overlap=256, tile_batch=0, attention=False):
    """(image [B,H,W,C], mask [B,H,W], CapturedAttention | None) in ComfyUI layouts.

    The tiles run fused (encode -> denoise -> decode per batch, blended at once); with attention
    each tile's maps are kept as well.
    """
    from tadisr_core import pipeline

    img = convert.image_to_core(image)
    running.check_tiling(scale, tile, overlap)
    batch = running.tile_batch_arg(tile_batch)
    with running.running(handle, tile, batch) as (m, progress, cancel):
        res = pipeline.upscale(m, img, float(scale), int(tile), int(overlap), batch, progress=progress,
                               cancel=cancel, keep_attention=bool(attention))
    dev = host.intermediate_device()
    return convert.image_from_core(res.image, dev), convert.mask_from_core(res.mask, dev), res.attention_tiles


class TADiSRUpscale:
    """Node: TADiSR Upscale (all in one)."""

    DESCRIPTION = ("Text-aware super-resolution in one node: bicubic resize by 'scale', then one TADiSR step per "
                   "overlapping tile (encode, one-step denoise at t=200, joint image + text-mask decode), blended "
                   "with a Hann window. Gives the upscaled image and a mask of where text is. Image batches are "
                   "processed tile by tile; Cancel stops between tiles.")
    CATEGORY = "TADiSR"
    FUNCTION = "upscale"
    RETURN_TYPES = ("IMAGE", "MASK", TADISR_ATTENTION)
    RETURN_NAMES = ("image", "text_mask", "attention")
    OUTPUT_TOOLTIPS = ("The upscaled image (scale x the input size).",
                       "Where the model sees text: 0..1, same size as the image.",
                       "Captured 'text' attention for TADiSR Text Attention; empty unless 'capture_attention' is on.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": running.model_input(),
            "image": ("IMAGE", {"tooltip": "Low-resolution image(s) to upscale (RGB; alpha is resized and kept)."}),
            **running.tiling_inputs(),
            "capture_attention": ("BOOLEAN", {"default": False, "tooltip": (
                "Also output the cross-attention to the word 'text' (for TADiSR Text Attention). Same image and mask; "
                "the maps of each tile stay in RAM (~20 MB per 768 px tile).")}),
        }}

    def upscale(self, model, image, scale=4.0, tile=768, overlap=256, tile_batch=0, capture_attention=False):
        """Upscaled image, text mask and (optionally) the captured attention."""
        return upscale(model, image, scale, tile, overlap, tile_batch, bool(capture_attention))
