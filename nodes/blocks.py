"""Graph blocks that map onto the model's steps, the logic: Encode -> One-Step Denoise -> Joint Decode.

Chained, they give the same result as TADiSR Upscale with the same settings. Between the steps
each tile's latents and text-attention maps stay in RAM (about 20 MB per 768 px tile); the encoder
features the decoder reuses are recomputed at decode unless they are small.
"""

from __future__ import annotations

from tadisr_core.descriptor import DESCRIPTOR

from . import attention_view, convert, host, running

SIZE = DESCRIPTOR.size  # default scale, tile and overlap


def _check_latents(latents, stage: str, model):
    from tadisr_core.pipeline import TiledLatents, check_same_model

    source = "TADiSR Encode" if stage == "encoded" else "TADiSR One-Step Denoise"
    if not isinstance(latents, TiledLatents):
        raise ValueError(f"TADiSR: 'latents' must come from {source}")
    if latents.stage != stage:
        raise ValueError(f"TADiSR: these latents are {latents.stage}; connect the output of {source} here")
    try:
        check_same_model(getattr(model, "model", model), latents)
    except ValueError as exc:
        raise ValueError(f"TADiSR: {exc} (connect one Load TADiSR Model to Encode, One-Step Denoise and "
                         "Joint Decode)") from None
    return latents


def encode(model, image, scale=SIZE.default_scale, tile=SIZE.default_tile, overlap=SIZE.default_overlap,
           tile_batch=0):
    """Encoded tiles of the whole batch."""
    from tadisr_core.pipeline import encode_tiles

    img = convert.image_to_core(image)
    running.check_tiling(scale, tile, overlap)
    batch = running.tile_batch_arg(tile_batch)
    grid = running.image_grid(img, scale, tile, overlap)
    with running.running(model, grid, batch, img.shape[0]) as (m, progress, cancel):
        return encode_tiles(m, img, float(scale), int(tile), int(overlap), batch, progress=progress, cancel=cancel)


def denoise(model, latents, tile_batch=0):
    """Denoised tiles and the captured attention."""
    from tadisr_core.pipeline import denoise_tiles

    tiled = _check_latents(latents, "encoded", model)
    batch = running.tile_batch_arg(tile_batch)
    with running.running(model, tiled.grid, batch, tiled.batch) as (m, progress, cancel):
        out = denoise_tiles(m, tiled, tile_batch=batch, keep_attention=True, progress=progress, cancel=cancel)
    return out, attention_view.from_tiles(out)


def decode(model, latents, tile_batch=0, color_fix="auto"):
    """Upscaled image and text mask (ComfyUI layouts); `color_fix` as in `upscale.upscale`."""
    from tadisr_core.pipeline import decode_tiles

    tiled = _check_latents(latents, "denoised", model)
    batch = running.tile_batch_arg(tile_batch)
    with running.running(model, tiled.grid, batch, tiled.batch) as (m, progress, cancel):
        res = decode_tiles(m, tiled, batch, progress=progress, cancel=cancel, color_fix=color_fix)
    dev = host.intermediate_device()
    return convert.image_from_core(res.image, dev), convert.mask_from_core(res.mask, dev)
