"""Declarations shared by the V3 nodes: custom socket types, the category, shared inputs, schema."""

from __future__ import annotations

import dataclasses

from comfy_api.latest import io

from .. import types

CATEGORY = "TADiSR"
TADiSRModel = io.Custom(types.TADISR_MODEL)
TADiSRLatents = io.Custom(types.TADISR_LATENTS)
TADiSRAttention = io.Custom(types.TADISR_ATTENTION)

_SCHEMA_FIELDS = {f.name for f in dataclasses.fields(io.Schema)}


def schema(search_aliases: list[str], **fields) -> io.Schema:
    """io.Schema in the TADiSR category; `search_aliases` passed where the host knows them (newer
    ComfyUI). ComfyUI 0.3.75's search reads only the node id and display name, so display names
    carry the words users search for."""
    if "search_aliases" in _SCHEMA_FIELDS:
        fields["search_aliases"] = list(search_aliases)
    return io.Schema(category=CATEGORY, **fields)


def model_input() -> io.Input:
    return TADiSRModel.Input("model", tooltip="The model from Load TADiSR Model.")


def tile_batch_input() -> io.Input:
    return io.Int.Input("tile_batch", default=0, min=0, max=64, tooltip=(
        "Tiles per model call. 0 = auto (from free memory). Halved automatically on out-of-memory."))


def color_fix_input() -> io.Input:
    """The colour-fix choice of Upscale and Joint Decode (choices from `tadisr_core.color`)."""
    from tadisr_core.color import COLOR_FIX_CHOICES

    return io.Combo.Input("color_fix", options=list(COLOR_FIX_CHOICES), default="auto", tooltip=(
        "none: the model's output as it is (faithful to the release). wavelet: keep the input's colours (low "
        "frequencies of the bicubic upscale) under the model's detail. auto: wavelet for the built-in demo "
        "models (they shift colours), none for the others."))


def _max_overlap() -> int:
    """The overlap widget's largest value: one tile step under the largest tile."""
    from tadisr_core.descriptor import DESCRIPTOR

    return DESCRIPTOR.size.max_tile - DESCRIPTOR.size.tile_multiple


def tiling_inputs() -> list[io.Input]:
    """scale / tile / overlap / tile_batch widgets shared by Upscale and Encode (limits and defaults
    from `descriptor.DESCRIPTOR.size`)."""
    from tadisr_core.descriptor import DESCRIPTOR

    size = DESCRIPTOR.size
    return [
        io.Float.Input("scale", default=size.default_scale, min=size.min_scale, max=size.max_scale, step=0.5,
                       tooltip=(
            "Upscale factor. TADiSR is trained for 4x; the image is resized bicubically by this factor, then "
            "restored.")),
        io.Int.Input("tile", default=size.default_tile, min=size.min_tile, max=size.max_tile,
                     step=size.tile_multiple, tooltip=(
            "Tile size in output pixels (multiple of 8). 768 is what the model was trained for; lower it if VRAM "
            "is short (out-of-memory also halves it automatically; Denoise and Decode keep the tile Encode chose, "
            "so there encode again with a smaller one).")),
        io.Int.Input("overlap", default=size.default_overlap, min=0, max=_max_overlap(),
                     step=size.tile_multiple, tooltip=(
            "Overlap of neighbouring tiles in output pixels (< tile). Tiles are blended with a Hann window; "
            "more overlap hides seams, costs more tiles.")),
        tile_batch_input(),
    ]


def image_input(tooltip: str = "Low-resolution image(s) to upscale (RGB; alpha is resized and kept).") -> io.Input:
    return io.Image.Input("image", tooltip=tooltip)


def validate_tiling(tile, overlap) -> bool | str:
    """validate_inputs helper: True, or why `tile` and `overlap` cannot work together (None = linked,
    checked when the node runs, before any tile: `running.check_tiling`).

    Checked at queue time, before the model loader runs (with Kolors a load of minutes). ComfyUI then
    attaches the message to both inputs and skips its own min/max check of them, so the message says
    which one is wrong, and the ranges are checked here: `check_settings` with a tile, the overlap
    widget's own range when the tile is linked."""
    from .. import running
    from ..errors import PREFIX

    if tile is None:
        most = _max_overlap()
        if overlap is not None and not 0 <= int(overlap) <= most:
            return f"{PREFIX}overlap must be between 0 and {most} (and smaller than the tile), got {overlap}"
        return True
    try:
        running.check_tiling(1.0, int(tile), 0 if overlap is None else int(overlap))  # a neutral scale
    except ValueError as exc:
        return PREFIX + str(exc)  # queue-time messages do not pass through `errors.reported`
    return True
