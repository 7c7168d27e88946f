"""Weights stored with a scale: each value is the stored number times its scale.

Two kinds of file people keep store weights this way:

- ChatGLM3's 8-bit file (Kolors-MZ's `chatglm3-8bit.safetensors`): int8 `<layer>.weight` and a
  per-row `<layer>.weight_scale`;
- ComfyUI's scaled fp8 diffusion models: fp8 `<layer>.weight` with one scale per tensor, named
  `<layer>.weight_scale` (the format of each layer in the `_quantization_metadata` header entry or
  in `<layer>.comfy_quant` tensors), or `<layer>.scale_weight` in the older layout that a
  `scaled_fp8` tensor marks. Their input scales (`input_scale`, `scale_input`) only serve fp8
  matrix products and are not read.

`iter_dequantized` streams such a file as stored x scale, computed in the scale's dtype (as
ChatGLM's quantized layers compute it; ComfyUI's scales are fp32), then cast to the wanted dtype.
Other layouts (block-wise or per-column scales, int8 or packed 4-bit layers, rotated weights) are
not read: `unreadable_layout` names them before anything is built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

from .streaming import Rename, WeightsHeader, iter_tensors, read_header

WEIGHT_SCALES = (".weight_scale", ".scale_weight")    # ComfyUI's name now, and before
NOT_READ = (".input_scale", ".scale_input", ".comfy_quant")
SCALED_FP8_MARKER = "scaled_fp8"
READABLE_FORMATS = ("float8_e4m3fn", "float8_e5m2")   # one scale per tensor (or row): stored x scale
_FORMAT_RECORD = ".comfy_quant"


def is_side_tensor(name: str) -> bool:
    """A scale, an input scale, a format record or the scaled-fp8 marker: not a weight of the model."""
    return (name == SCALED_FP8_MARKER or name.endswith("." + SCALED_FP8_MARKER)
            or name.endswith(WEIGHT_SCALES + NOT_READ))


def weight_scales(names) -> dict[str, str]:
    """{weight name: its scale's name} for the scaled weights among the tensor `names`."""
    out = {}
    for name in names:
        for suffix in WEIGHT_SCALES:
            if name.endswith(suffix):
                out[name[: -len(suffix)] + ".weight"] = name
    return out


def _format(conf) -> str:
    """A layer's format from its record: a name, or a dict with "format" (and "convrot" for rotated weights)."""
    if isinstance(conf, str):
        return conf
    if not isinstance(conf, dict):
        return "unreadable"
    name = str(conf.get("format"))
    return f"{name} with rotated weights (convrot)" if conf.get("convrot") else name


def _formats(header: WeightsHeader) -> dict[str, str]:
    """{layer: format} from the `_quantization_metadata` header entry and any `.comfy_quant` tensors."""
    found = {}
    text = header.metadata.get("_quantization_metadata")
    if text:
        try:
            layers = json.loads(text).get("layers")
        except (json.JSONDecodeError, AttributeError):
            layers = None
        if not isinstance(layers, dict):
            layers = {"_quantization_metadata": "unreadable"}
        found.update({layer: _format(conf) for layer, conf in layers.items()})
    records = [k for k in header.tensors if k.endswith(_FORMAT_RECORD)]
    if records:
        wanted = set(records)
        for name, t in iter_tensors(header.path, rename=lambda k: k if k in wanted else None, header=header):
            try:
                conf = json.loads(bytes(t.to(torch.uint8).flatten().tolist()).decode())
            except (UnicodeDecodeError, json.JSONDecodeError, ValueError, TypeError):
                conf = None
            found[name[: -len(_FORMAT_RECORD)]] = _format(conf)
    return found


def unreadable_layout(header: WeightsHeader, prefix: str = "") -> str | None:
    """Why the scaled weights of `header`'s file (those under `prefix`: one part of an all-in-one file)
    cannot be read as stored x scale: a layer format other than fp8, or a scale that is neither one
    number nor one per row. None when they can, or there are none."""
    formats = {k: f for k, f in _formats(header).items() if k.startswith(prefix)}
    other = sorted({f for f in formats.values() if f not in READABLE_FORMATS})
    if other:
        layer = next(k for k, f in formats.items() if f == other[0])
        return f"its layers are quantized as {', '.join(other)} (e.g. {layer}), a layout read here only as fp8"
    for weight, scale in weight_scales(k for k in header.tensors if k.startswith(prefix)).items():
        w, s = header.tensors.get(weight), header.tensors[scale]
        if w is None:
            return f"{scale} scales no weight ({weight} is missing)"
        per_tensor = all(d == 1 for d in s.shape)
        per_row = bool(s.shape) and bool(w.shape) and s.shape[0] == w.shape[0] and all(d == 1 for d in s.shape[1:])
        if not (per_tensor or per_row):
            return (f"{weight} {tuple(w.shape)} has a scale of shape {tuple(s.shape)}: only one scale per tensor "
                    f"or per row is read here, not block-wise or per-column scales")
    return None


def dequantize(stored: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """stored x scale in the scale's dtype: one scale for the tensor, or one per row."""
    scale = scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1, *([1] * (stored.dim() - 1)))
    return stored.to(scale.dtype) * scale


def iter_dequantized(path: str | Path, dtype: torch.dtype | None = None, rename: Rename | None = None,
                     header: WeightsHeader | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """`streaming.iter_tensors`, with every scaled weight given as stored x scale (then cast to `dtype`)
    and the side tensors (scales, input scales, format records, the marker) left out."""
    path = Path(path)
    header = header or read_header(path)
    scale_of = weight_scales(header.tensors)
    wanted = set(scale_of.values())
    scales = dict(iter_tensors(path, rename=lambda k: k if k in wanted else None, header=header)) if wanted else {}
    renamed: dict[str, str] = {}

    def keep(key: str) -> str | None:
        if is_side_tensor(key):
            return None
        new = rename(key) if rename else key
        if new is not None:
            renamed[new] = key
        return new

    if not scales:  # an ordinary file: cast as it is read
        yield from iter_tensors(path, dtype, keep, header)
        return
    for new, stored in iter_tensors(path, None, keep, header):
        scale = scale_of.get(renamed.pop(new))
        value = dequantize(stored, scales[scale]) if scale is not None else stored
        del stored
        if dtype is not None and value.is_floating_point() and value.dtype != dtype:
            value = value.to(dtype)
        yield new, value
        del value  # before the next tensor is read
