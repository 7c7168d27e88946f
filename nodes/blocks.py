"""Graph blocks that map onto the model's steps: Encode -> One-Step Denoise -> Joint Decode.

Chained, they give the same result as TADiSR Upscale with the same settings. Between the steps
each tile's latents and text-attention maps stay in RAM (about 20 MB per 768 px tile); the encoder
features the decoder reuses are recomputed at decode unless they are small.
"""

from __future__ import annotations

from . import attention_view, convert, host, running
from .types import TADISR_ATTENTION, TADISR_LATENTS


def _check_latents(latents, stage: str):
    from tadisr_core.pipeline import TiledLatents

    source = "TADiSR Encode" if stage == "encoded" else "TADiSR One-Step Denoise"
    if not isinstance(latents, TiledLatents):
        raise ValueError(f"TADiSR: 'latents' must come from {source}")
    if latents.stage != stage:
        raise ValueError(f"TADiSR: these latents are {latents.stage}; connect the output of {source} here")
    return latents


class TADiSREncode:
    """Node: TADiSR Encode."""

    DESCRIPTION = ("Step 1 of 3: resizes the image by 'scale' (bicubic), cuts it into overlapping tiles and "
                   "VAE-encodes each tile (keeping the encoder features the joint decoder reuses).")
    CATEGORY = "TADiSR"
    FUNCTION = "encode"
    RETURN_TYPES = (TADISR_LATENTS,)
    RETURN_NAMES = ("latents",)
    OUTPUT_TOOLTIPS = ("Encoded tiles of the whole batch, for TADiSR One-Step Denoise.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": running.model_input(),
            "image": ("IMAGE", {"tooltip": "Low-resolution image(s) to upscale (RGB; alpha is resized and kept)."}),
            **running.tiling_inputs(),
        }}

    def encode(self, model, image, scale=4.0, tile=768, overlap=256, tile_batch=0):
        """Encoded tiles."""
        from tadisr_core.pipeline import encode_tiles

        img = convert.image_to_core(image)
        running.check_tiling(scale, tile, overlap)
        batch = running.tile_batch_arg(tile_batch)
        with running.running(model, tile, batch) as (m, progress, cancel):
            return (encode_tiles(m, img, float(scale), int(tile), int(overlap), batch, progress=progress,
                                 cancel=cancel),)


class TADiSRDenoise:
    """Node: TADiSR One-Step Denoise."""

    DESCRIPTION = ("Step 2 of 3: one UNet pass at timestep 200 per tile turns the degraded latents into clean ones, "
                   "capturing the cross-attention to the word 'text' on the way.")
    CATEGORY = "TADiSR"
    FUNCTION = "denoise"
    RETURN_TYPES = (TADISR_LATENTS, TADISR_ATTENTION)
    RETURN_NAMES = ("latents", "attention")
    OUTPUT_TOOLTIPS = ("Denoised tiles, for TADiSR Joint Decode.",
                       "Captured 'text' attention per tile, for TADiSR Text Attention.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": running.model_input(),
            "latents": (TADISR_LATENTS, {"tooltip": "Encoded tiles from TADiSR Encode."}),
            "tile_batch": running.tiling_inputs()["tile_batch"],
        }}

    def denoise(self, model, latents, tile_batch=0):
        """Denoised tiles and the captured attention."""
        from tadisr_core.pipeline import denoise_tiles

        tiled = _check_latents(latents, "encoded")
        batch = running.tile_batch_arg(tile_batch)
        with running.running(model, tiled.grid.tile_h, batch) as (m, progress, cancel):
            out = denoise_tiles(m, tiled, tile_batch=batch, keep_attention=True, progress=progress, cancel=cancel)
        return out, attention_view.from_tiles(out)


class TADiSRDecode:
    """Node: TADiSR Joint Decode."""

    DESCRIPTION = ("Step 3 of 3: the VAE decoder and the text-segmentation decoder run side by side on every tile; "
                   "tiles are blended (Hann window) into the upscaled image and its text mask.")
    CATEGORY = "TADiSR"
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("image", "text_mask")
    OUTPUT_TOOLTIPS = ("The upscaled image (scale x the input size).",
                       "Where the model sees text: 0..1, same size as the image.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": running.model_input(),
            "latents": (TADISR_LATENTS, {"tooltip": "Denoised tiles from TADiSR One-Step Denoise."}),
            "tile_batch": running.tiling_inputs()["tile_batch"],
        }}

    def decode(self, model, latents, tile_batch=0):
        """Upscaled image and text mask."""
        from tadisr_core.pipeline import decode_tiles

        tiled = _check_latents(latents, "denoised")
        batch = running.tile_batch_arg(tile_batch)
        with running.running(model, tiled.grid.tile_h, batch) as (m, progress, cancel):
            res = decode_tiles(m, tiled, batch, progress=progress, cancel=cancel)
        dev = host.intermediate_device()
        return convert.image_from_core(res.image, dev), convert.mask_from_core(res.mask, dev)
