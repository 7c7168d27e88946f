"""Image files <-> tensors [1, C, H, W] in 0..1 (C = 1 gray, 3 RGB, 4 RGBA), with PIL.

Saving writes 8-bit PNG through a temporary file in the same folder and an atomic rename, so an
interrupted run never leaves a half-written image under the final name.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".tga"})
_ROWS_PER_CHUNK = 256   # bounds the float temporaries of the 8-bit conversion


class ImageReadError(OSError):
    """An input file could not be read as an image."""


def is_image_file(path: str | Path) -> bool:
    """Whether `path` has an image suffix we read."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def load_image(path: str | Path) -> torch.Tensor:
    """Read an image as float32 [1, C, H, W] in 0..1, applying EXIF orientation.

    Gray stays 1 channel; anything with transparency becomes RGBA (4); the rest RGB (3).
    16-bit gray files keep their precision.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(f"cannot read {path} as an image: {exc}") from exc
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float32)
        a = a / (65535.0 if a.max(initial=0) > 255 or im.mode.startswith("I;16") else 255.0)
        return torch.from_numpy(np.clip(a, 0, 1)).view(1, 1, *a.shape)
    if im.mode in ("1", "L"):
        im = im.convert("L")
    elif im.mode in ("LA", "La", "RGBA", "RGBa", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
    elif im.mode != "RGB":
        im = im.convert("RGB")
    a = np.asarray(im, dtype=np.uint8)
    if a.ndim == 2:
        a = a[:, :, None]
    return torch.from_numpy(a.copy()).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[C, H, W] or [1, C, H, W] in 0..1 -> uint8 [H, W, C], converted in row chunks (bounded memory)."""
    if image.ndim == 4:
        if image.shape[0] != 1:
            raise ValueError(f"expected one image, got a batch of {image.shape[0]}")
        image = image[0]
    c, h, w = image.shape
    out = np.empty((h, w, c), dtype=np.uint8)
    for y in range(0, h, _ROWS_PER_CHUNK):
        part = image[:, y:y + _ROWS_PER_CHUNK].detach().float().cpu()
        out[y:y + part.shape[1]] = part.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return out


def _write_png(image: torch.Tensor, path: Path) -> None:
    from PIL import Image

    a = to_uint8(image)
    if a.shape[2] not in (1, 3, 4):
        raise ValueError(f"cannot save {a.shape[2]} channels as PNG (need 1, 3 or 4)")
    Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a).save(path, format="PNG")


def save_images(items: list[tuple[torch.Tensor, str | Path]]) -> list[Path]:
    """Write several images ([C, H, W] / [1, C, H, W] in 0..1, C = 1, 3 or 4) as 8-bit PNGs.

    All are written to temporary files first and renamed only when every one succeeded, so the
    final names appear together or not at all.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for image, path in items:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.partial")
            staged.append((tmp, path))
            _write_png(image, tmp)
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            if tmp.exists():
                tmp.unlink()
    return [path for _, path in staged]


def save_image(image: torch.Tensor, path: str | Path) -> Path:
    """Write one image as an 8-bit PNG, atomically (see `save_images`)."""
    return save_images([(image, path)])[0]
