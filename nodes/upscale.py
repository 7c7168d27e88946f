"""TADiSR Upscale, the logic: image -> upscaled image + text mask (+ captured attention), all in one."""

from __future__ import annotations

from . import attention_view, convert, host, running


def _stage(progress, index: int, stages: int):
    return lambda done, total: progress(index * total + done, stages * total)


def upscale(handle, image, scale=4.0, tile=768, overlap=256, tile_batch=0, attention=False, color_fix="none"):
    """(image [B,H,W,C], mask [B,H,W], CapturedAttention | None) in ComfyUI layouts.

    Without attention the tiles run fused (encode -> denoise -> decode per batch, blended at once);
    with it they run staged so each tile's maps can be kept, which gives the same image and mask.
    `color_fix="wavelet"` takes the colours from the bicubic upscale (tadisr_core.color).
    """
    from tadisr_core import pipeline
    from tadisr_core.color import apply_color_fix

    img = convert.image_to_core(image)
    running.check_tiling(scale, tile, overlap)
    batch = running.tile_batch_arg(tile_batch)
    captured = None
    with running.running(handle, tile, batch) as (m, progress, cancel):
        args = (float(scale), int(tile), int(overlap), batch)
        if attention:
            groups = attention_view.channel_groups(m)
            stage = [_stage(progress, k, 3) for k in range(3)]  # one bar over the three passes
            tiled = pipeline.encode_tiles(m, img, *args, progress=stage[0], cancel=cancel)
            tiled = pipeline.denoise_tiles(running.KeepAttention(m), tiled, capture=False, tile_batch=batch,
                                           progress=stage[1], cancel=cancel)
            res = pipeline.decode_tiles(m, tiled, batch, progress=stage[2], cancel=cancel)
            captured = attention_view.from_tiles(tiled, groups)
            if color_fix != "none":
                reference = pipeline.upscale_canvas(img, float(scale))[:, :3]
                res.image[:, :3] = apply_color_fix(res.image[:, :3], reference, color_fix)
        else:
            res = pipeline.upscale(m, img, *args, progress=progress, cancel=cancel, color_fix=color_fix)
    dev = host.intermediate_device()
    return convert.image_from_core(res.image, dev), convert.mask_from_core(res.mask, dev), captured
