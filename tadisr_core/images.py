"""The one image reader and writer of the project (CLI, nodes, training, evaluate), with PIL.

Reading gives float32 [1, C, H, W] in 0..1 (C = 1 gray, 3 RGB, 4 RGBA) as the user sees the image:

* EXIF orientation is applied;
* bit depth is kept: 16-bit files are divided by 65535, integer TIFFs by the range of their declared
  bits (BitsPerSample / SampleFormat), float files are taken as 0..1 (clipped to it) unless more
  than 1 % of their pixels pass 1.5, when they are scaled by 255 or 65535 (with a warning); NaN or
  Inf pixels are an error naming the file (never a silently black tile);
* animated and multi-page files: the first frame is used, with a warning naming the frame count;
* images above `max_pixels` (default 64 MP, env TADISR_MAX_PIXELS) are refused before decoding
  (decompression bombs: a 97 KB PNG can claim 100 MP);
* an RGB ICC profile is returned with the pixels, so outputs can carry it; a gray or CMYK profile is
  applied instead (`_to_srgb`): CMYK becomes sRGB RGB, gray stays gray (at its bit depth) on sRGB's
  tone curve, and the sRGB profile is returned, so outputs show the colours and tones the input had.
* a transparency key (tRNS of palette, gray and RGB PNGs) becomes alpha (RGBA, gray repeated; a 16-bit
  gray PNG keeps its 16-bit levels); an alpha opaque everywhere (most screenshots') is dropped;
* the resolution (PNG pHYs, JPEG JFIF, TIFF, else EXIF X/YResolution) is returned in dots per inch, so
  outputs can print at the input's size (`scaled_dpi`).

Pillow reads 16-bit-per-channel colour PNGs at 8 bits per channel; a warning says so.
Saving writes 8 bits per channel, as PNG, JPEG or WebP by the file's suffix (`OUTPUT_FORMATS`), tagged
Software=TADiSR (PNG text, EXIF in JPEG and WebP), through a hidden temporary file and an atomic
rename, so an interrupted run never leaves a half-written image under the final name.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import math
import os
import struct
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .descriptor import DESCRIPTOR
from .files import default_file_mode, same_file
from .finite import check_unit_range
from .wording import named

log = logging.getLogger("tadisr")

# read always; folder walks take the other suffixes of `PICTURE_FORMATS` Pillow can open too (`image_suffixes`)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".tga"})
HEIF_SUFFIXES = frozenset({".heic", ".heif", ".hif"})   # iPhone photos: read only with the pillow-heif plugin
HEIF_ADVICE = "HEIC/HEIF photos need the pillow-heif package (pip install pillow-heif), or convert them to PNG or JPEG"
# Pillow formats a folder walk takes, where Pillow has their opener: pictures people keep (photos, scans,
# screenshots), not documents (EPS, PDF), data (FITS, HDF5), animations or video (FLI, MPEG), layered
# files (PSD) or brushes (GBR), which Pillow also registers; a file named explicitly is read whatever it is
PICTURE_FORMATS = frozenset({"PNG", "JPEG", "MPO", "WEBP", "TIFF", "BMP", "DIB", "GIF", "TGA", "AVIF", "HEIF",
                             "JPEG2000", "PPM", "QOI", "PCX"})
DEFAULT_MAX_PIXELS = 64_000_000
MAX_DPI = 1e6                    # a resolution above this is taken for damaged metadata (read as none)
SOFTWARE_TAG = "TADiSR"          # "Software" of every image we write: PNG text, EXIF in JPEG and WebP
_ROWS_PER_CHUNK = 256            # bounds the float temporaries of the 8-bit conversion
_PNG_END = b"IEND\xaeB`\x82"
_JPEG_END = b"\xff\xd9"
_D50 = (0.9642, 1.0, 0.8249)    # the ICC profile connection space's white
_SRGB_CURVE = (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045)  # IEC 61966-2-1, ICC parametric curve type 3
_EXIF_SOFTWARE = 0x0131
_EXIF_DOCUMENT_NAME = 0x010D     # JPEG / WebP: the input an output came from (save_images' `source`)
_EXIF_RESOLUTION = (0x011A, 0x011B, 0x0128)   # XResolution, YResolution, ResolutionUnit (2 inch, 3 cm)
_EXIF_ORIENTATION = 0x0112
_JFIF_MAX_DENSITY = 65535        # JPEG's JFIF density is 16-bit; a higher dpi goes in EXIF only
_PNG_SOURCE = "TADiSR source"    # PNG: the same, as a text chunk
_MAX_SIDE = {"JPEG": 65500, "WEBP": 16383}   # the longest side each format can hold (libjpeg: 65500)
OUTPUT_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}   # suffix -> Pillow format of what we write
DEFAULT_QUALITY = 95             # JPEG (4:4:4) / WebP quality of what we write; WebP at 100 is lossless


class ImageReadError(OSError):
    """An input file could not be read as an image; the message names the file and why."""


@dataclass
class ImageFile:
    """Pixels of one file plus what travels with them."""

    pixels: torch.Tensor            # float32 [1, C, H, W] in 0..1
    icc_profile: bytes | None = None  # what outputs carry: RGB as read, sRGB after a gray / CMYK one
    frames: int = 1
    bits: int = 8                   # bits per sample as read
    dpi: tuple[float, float] | None = None  # (x, y) dots per inch as displayed; None when the file gives none


def is_image_file(path: str | Path) -> bool:
    """Whether `path` has an image suffix we read (`image_suffixes`)."""
    return Path(path).suffix.lower() in image_suffixes()


def image_suffixes() -> frozenset[str]:
    """The suffixes a folder walk takes: `IMAGE_SUFFIXES` and those Pillow registers for the other
    `PICTURE_FORMATS` it can open here (.avif, .jfif, .pgm, .jp2... as this Pillow's build has them; HEIC
    when pillow-heif is installed)."""
    from PIL import Image

    _register_optional_plugins()
    Image.init()
    return _pillow_suffixes(len(Image.EXTENSION), len(Image.OPEN))  # registering a plugin grows these


@functools.lru_cache(maxsize=4)
def _pillow_suffixes(_extensions: int, _openers: int) -> frozenset[str]:
    """`image_suffixes` for the current state of Pillow's plugin registry (the arguments key the cache)."""
    from PIL import Image

    return IMAGE_SUFFIXES | {ext.lower() for ext, fmt in Image.registered_extensions().items() if _pillow_decodes(fmt)}


def _pillow_decodes(fmt: str) -> bool:
    """Whether format `fmt` is one of `PICTURE_FORMATS` and Pillow here has its opener (MPO: JPEG's)."""
    from PIL import Image

    return fmt in PICTURE_FORMATS and ("JPEG" if fmt == "MPO" else fmt) in Image.OPEN


@functools.lru_cache(maxsize=None)
def _register_optional_plugins() -> None:
    """Register pillow-heif's HEIC/HEIF opener with Pillow when it is installed (once)."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return
    try:
        register_heif_opener()
    except Exception as exc:  # noqa: BLE001 - a broken optional plugin must not stop reading other formats
        log.warning("pillow-heif is installed but could not be registered (%s); HEIC/HEIF files are not read", exc)


def _needs_pillow_heif(path: str | Path) -> bool:
    """Whether `path` is named as a HEIC/HEIF photo, which this Pillow cannot read (no pillow-heif)."""
    return Path(path).suffix.lower() in HEIF_SUFFIXES - image_suffixes()


def left_out_advice(others: list[Path]) -> str:
    """What to do about files a folder walk left out as not images: `HEIF_ADVICE` when HEIC/HEIF files are
    among them (Pillow reads them only with pillow-heif), else ""."""
    heif = sum(map(_needs_pillow_heif, others))
    return f"; {heif} HEIC/HEIF file(s): {HEIF_ADVICE}" if heif else ""


@dataclass
class FolderImages:
    """What a folder walk found: image files, and what it left out."""

    files: list[Path] = field(default_factory=list)         # sorted
    others: list[Path] = field(default_factory=list)        # files that are not images
    subfolders: int = 0                                     # not entered (not recursive)


def walk_images(folder: str | Path, recursive: bool = True, exclude: str | Path | None = None) -> FolderImages:
    """The image files under `folder` (every level when `recursive`; symlinked sub-folders followed, each
    real folder once; `exclude` and hidden names skipped), and what was left out. The one folder walk of
    the project: the CLI's inputs, evaluate's predictions and ground truth."""
    folder, found, seen = Path(folder), FolderImages(), set()
    exclude = Path(exclude) if exclude is not None else None

    def unreadable(err: OSError) -> None:
        log.warning("cannot list %s: %s", err.filename, err.strerror)

    for root, dirs, names in os.walk(folder, followlinks=True, onerror=unreadable):
        real = os.path.realpath(root)
        if real in seen or (exclude is not None and same_file(root, exclude) and Path(root) != folder):
            dirs[:] = []
            continue
        seen.add(real)
        visible = sorted(d for d in dirs if not d.startswith(".")
                         and not (exclude is not None and same_file(Path(root) / d, exclude)))
        if not recursive:
            found.subfolders += len(visible)
        dirs[:] = visible if recursive else []
        for name in names:
            p = Path(root) / name
            if name.startswith("."):
                continue
            if not p.is_file():
                if p.is_symlink():  # said by name: an image the user sees listed, which is not there
                    log.warning("left out %s: a link to %s, which does not exist", p, os.readlink(p))
                continue
            (found.files if is_image_file(p) else found.others).append(p)
    found.files.sort()
    return found


def max_pixels_limit() -> int:
    """The pixel limit for reading: $TADISR_MAX_PIXELS or DEFAULT_MAX_PIXELS; ImageReadError unless the
    variable is a positive finite number."""
    raw = os.environ.get("TADISR_MAX_PIXELS")
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 1):
        raise ImageReadError(f"TADISR_MAX_PIXELS={raw!r} (environment) is not a positive number of pixels; "
                             f"unset it for the default of {DEFAULT_MAX_PIXELS:,} or set e.g. 2e8")
    return int(value)


@contextlib.contextmanager
def _pil_bomb_limit(limit: int):
    """Let PIL open up to `limit` pixels (we check the size ourselves) without its own warning."""
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    raise_above = None if old is None else 2 * old
    change = raise_above is not None and limit > raise_above
    if change:
        Image.MAX_IMAGE_PIXELS = limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        if change:
            Image.MAX_IMAGE_PIXELS = old


def _declared_int_range(im) -> float:
    """Full-scale value of a 32-bit integer ("I") image from its TIFF tags (PNG "I" is 16-bit)."""
    tags = getattr(im, "tag_v2", None)
    if tags is not None:
        bits = tags.get(258, (32,))
        bits = int(bits[0] if isinstance(bits, tuple) else bits)
        signed = tags.get(339, (1,))
        signed = int(signed[0] if isinstance(signed, tuple) else signed) == 2
        return float(2 ** (bits - 1) - 1 if signed else 2 ** bits - 1)
    return 65535.0


BULK_QUANTILE = 0.99  # a float file's range is judged by its bulk: HDR highlights do not make it 0..255


def _float_scale(a: np.ndarray, path: Path) -> float:
    """1 for a float image in 0..1 (its overshoot is clipped by the caller), else 255, 65535 or its maximum,
    judged by the `BULK_QUANTILE` of its pixels, with a warning."""
    from .finite import RANGE_SLACK

    if a.size == 0 or float(np.quantile(a, BULK_QUANTILE)) <= 1.0 + RANGE_SLACK:
        return 1.0
    hi = float(a.max())
    scale = 255.0 if hi <= 255.0 + 1e-3 else 65535.0 if hi <= 65535.0 + 1e-3 else hi
    log.warning("%s: float pixels reach %.6g (not 0..1); read as 0..%g", path, hi, scale)
    return scale


def _high_depth(im, path: Path, full: float) -> tuple[np.ndarray, int]:
    """1-channel 16-bit / 32-bit integer / float image -> float32 (H, W) in 0..1 and its bit depth."""
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float32)
        if not np.isfinite(a).all():
            bad = int((~np.isfinite(a)).sum())
            raise ImageReadError(f"cannot use {path}: {bad} pixel(s) are NaN or Inf (float image); fix or "
                                 f"re-export the file")
        from .finite import RANGE_SLACK

        scaled = a / _float_scale(a, path)
        lo, hi = float(scaled.min(initial=0.0)), float(scaled.max(initial=0.0))
        if lo < 0.0 or hi > 1.0:  # said louder when more than a filter's overshoot is lost
            level = logging.WARNING if min(lo, 1.0 - hi) < -RANGE_SLACK else logging.INFO
            log.log(level, "%s: float pixels span %.4g..%.4g; clipped to 0..1", path, lo, hi)
        return np.clip(scaled, 0.0, 1.0), 32
    if im.mode.startswith("I;16"):
        return np.asarray(im, dtype=np.float32) / 65535.0, 16
    a = np.asarray(im, dtype=np.float64)
    return (a / full).astype(np.float32), int(round(math.log2(full + 1))) if full > 0 else 32


def _icc_space(icc: bytes | None) -> bytes | None:
    """The colour space an ICC profile describes (header bytes 16-20: b"RGB ", b"GRAY", b"CMYK", ...)."""
    return icc[16:20] if icc and len(icc) >= 20 else None


@functools.lru_cache(maxsize=None)
def _srgb_profile() -> bytes:
    """LittleCMS's sRGB profile, as outputs carry it."""
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


@functools.lru_cache(maxsize=None)
def _srgb_gray_profile() -> bytes:
    """A gray ICC profile (v2.1, display class) on sRGB's tone curve: what gray inputs with a profile are
    converted to (Pillow's ImageCms creates no gray profiles)."""
    def s15(*values: float) -> bytes:
        return b"".join(struct.pack(">i", round(v * 65536)) for v in values)

    tags = [(b"wtpt", b"XYZ \0\0\0\0" + s15(*_D50)),
            (b"kTRC", b"para\0\0\0\0" + struct.pack(">HH", 3, 0) + s15(*_SRGB_CURVE))]
    offset, table, data = 128 + 4 + 12 * len(tags), b"", b""
    for sig, tag in tags:
        table += sig + struct.pack(">II", offset + len(data), len(tag))
        data += tag + b"\0" * (-len(tag) % 4)
    body = struct.pack(">I", len(tags)) + table + data
    header = (struct.pack(">I", 128 + len(body)) + b"\0" * 4 + bytes([2, 0x10, 0, 0]) + b"mntrGRAYXYZ "
              + b"\0" * 12 + b"acsp" + b"\0" * 28 + s15(*_D50) + b"\0" * 48)
    return header + body


def _to_srgb(im, icc: bytes, path: Path):
    """`im` with its gray or CMYK ICC profile `icc` applied: (CMYK as sRGB RGB, or gray (L, LA, 16-bit)
    as gray on sRGB's tone curve, at its bit depth; the sRGB profile). A profile that cannot be
    applied (damaged, or 32-bit / float samples) is dropped with a warning: (`im` as it is, None)."""
    gray = _icc_space(icc) == b"GRAY"
    if gray and im.mode == "1":
        im = im.convert("L")
    elif gray and im.mode == "La":
        im = im.convert("LA")
    if im.mode not in (("L", "LA", "I;16", "I;16L", "I;16B") if gray else ("CMYK",)):
        log.warning("%s: its %s colour profile cannot be applied to %s pixels; it is read as sRGB", path,
                    _icc_space(icc).decode().strip(), im.mode)
        return im, None
    from PIL import Image, ImageCms

    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if not gray:
            srgb = ImageCms.createProfile("sRGB")
            return ImageCms.profileToProfile(im, source, srgb, outputMode="RGB"), _srgb_profile()
        target = ImageCms.ImageCmsProfile(io.BytesIO(_srgb_gray_profile()))
        # unoptimised: LittleCMS's joined curve loses up to 3 % of the range in the shadows of 16-bit gray
        tone = functools.partial(ImageCms.profileToProfile, inputProfile=source, outputProfile=target,
                                 flags=ImageCms.Flags.NOOPTIMIZE)
        if im.mode == "LA":
            return Image.merge("LA", (tone(im.getchannel("L")), im.getchannel("A"))), _srgb_profile()
        return tone(im), _srgb_profile()
    except (ImageCms.PyCMSError, ImportError, OSError, ValueError, TypeError) as exc:  # ImportError: no LittleCMS
        log.warning("%s: its colour profile cannot be used (%s); it is read as sRGB", path, exc)
        return im, None


def _gray_key_as_alpha(im, rawmode: str):
    """A gray image (mode 1 or L) with a transparency key (PNG tRNS) as LA. Pillow scales 2- and 4-bit
    samples to 8 bits but leaves their key in the raw units (`rawmode` L;2 / L;4), so the key is scaled
    alike here; a key that is not one gray level is ignored."""
    from PIL import Image

    key, gray = im.info["transparency"], im.convert("L")
    if not isinstance(key, int):
        return gray
    bits = {"L;2": 2, "L;4": 4}.get(rawmode.rstrip("I"), 8)
    key = key * (255 // (2 ** bits - 1)) if im.mode == "L" else key
    return Image.merge("LA", (gray, gray.point(lambda v: 0 if v == key else 255)))


def _deep_gray_key_opacity(im) -> np.ndarray | None:
    """For a 16-bit gray image with a transparency key (PNG tRNS, in 16-bit units): where it is opaque
    (H, W bool); None for any other image."""
    key = im.info.get("transparency")
    if not im.mode.startswith("I;16") or not isinstance(key, int):
        return None
    return np.asarray(im) != key


def _unidentified_reason(path: Path) -> str:
    """Why Pillow recognised no image in `path`: an empty file, a HEIC/HEIF photo without pillow-heif, or
    an unknown format."""
    with contextlib.suppress(OSError):
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
    if _needs_pillow_heif(path):
        return HEIF_ADVICE
    return "not an image format Pillow knows (damaged, or another kind of file)"


def _read_dpi(im) -> tuple[float, float] | None:
    """(x, y) dots per inch of an opened image as displayed: Pillow's `info["dpi"]` (PNG pHYs, TIFF, JPEG
    JFIF; not the values Pillow makes up: 72 for a JPEG whose EXIF has none, 1 for a TIFF without
    resolution tags), else EXIF X/YResolution in inches or cm (WebP), swapped when the EXIF orientation
    turns the image a quarter; None when absent, zero, not a number or above `MAX_DPI`."""
    exif = im.getexif()
    made_up = (im.format == "JPEG" and im.info.get("jfif_unit") not in (1, 2) or
               im.format == "TIFF" and not all(tag in im.tag_v2 for tag in _EXIF_RESOLUTION[:2]))
    dpi = None if made_up else im.info.get("dpi")
    unit = exif.get(_EXIF_RESOLUTION[2], 2)
    try:
        if dpi is None and unit in (2, 3):
            dpi = [float(exif.get(tag, 0)) * (2.54 if unit == 3 else 1) for tag in _EXIF_RESOLUTION[:2]]
        x, y = (float(v) for v in dpi)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if not (0 < x <= MAX_DPI and 0 < y <= MAX_DPI):  # NaN fails too; above: damaged (PNG cannot hold it x 4)
        return None
    return (y, x) if exif.get(_EXIF_ORIENTATION) in (5, 6, 7, 8) else (x, y)


def scaled_dpi(dpi: tuple[float, float] | None, scale: float) -> tuple[float, float] | None:
    """The resolution of an image upscaled by `scale` that prints at the size `dpi` gave it (None stays None)."""
    return None if dpi is None else (dpi[0] * scale, dpi[1] * scale)


def read_image(path: str | Path, max_pixels: int | None = None) -> ImageFile:
    """Read an image file as the user sees it (see the module doc); ImageReadError names the file."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    _register_optional_plugins()
    path = Path(path)
    limit = max_pixels if max_pixels is not None else max_pixels_limit()
    try:
        # Opened from a file object: Pillow memory-maps uncompressed one-band TIFFs opened by name and
        # then drops their Orientation tag unapplied, so exif_transpose would leave gray scans unrotated.
        with _pil_bomb_limit(limit), open(path, "rb") as f, Image.open(f) as im:
            w, h = im.size
            if w * h > limit:
                raise ImageReadError(f"cannot use {path}: {w}x{h} = {w * h:,} pixels is above the limit of "
                                     f"{limit:,} (a decompression bomb?); raise it with TADISR_MAX_PIXELS if the "
                                     f"image is genuine")
            frames = int(getattr(im, "n_frames", 1) or 1)
            icc = im.info.get("icc_profile")
            args = im.tile[0][3] if im.tile else ""
            rawmode = str(args[0] if isinstance(args, tuple) and args else args)
            full_scale = _declared_int_range(im) if im.mode == "I" else 65535.0  # tags are gone after transpose
            dpi = _read_dpi(im)  # after the tile is read: a PNG's getexif() loads the pixels
            im = ImageOps.exif_transpose(im)
            im.load()
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"cannot use {path}: {exc}; raise the limit with TADISR_MAX_PIXELS if the image is "
                             f"genuine") from None
    except FileNotFoundError:
        raise ImageReadError(f"input not found: {path}") from None
    except PermissionError:
        raise ImageReadError(f"cannot read {path}: permission denied") from None
    except UnidentifiedImageError:  # Pillow's words name the file object, not the file
        raise ImageReadError(f"cannot read {path} as an image: {_unidentified_reason(path)}") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(f"cannot read {path} as an image: {exc}") from exc
    if frames > 1:
        log.warning("%s has %d frames (animated or multi-page); only the first is used", path, frames)
    if "16" in rawmode and im.mode in ("RGB", "RGBA"):
        log.warning("%s has 16 bits per colour channel; it is read at 8 bits", path)
    if "transparency" in im.info and im.mode in ("1", "L"):
        im = _gray_key_as_alpha(im, rawmode)  # first: a gray profile's result carries no transparency key
    opaque = _deep_gray_key_opacity(im)  # also before the profile, for the same reason
    if _icc_space(icc) in (b"GRAY", b"CMYK"):
        im, icc = _to_srgb(im, icc, path)
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a, bits = _high_depth(im, path, full_scale)
        pixels = torch.from_numpy(np.clip(a, 0, 1)).view(1, 1, *a.shape)
        if opaque is not None and not opaque.all():  # as 8-bit gray with a key: RGBA (gray repeated), the key's
            # pixels transparent
            pixels = torch.cat([pixels.expand(-1, 3, -1, -1), torch.from_numpy(opaque).float().view_as(pixels)], 1)
        return ImageFile(pixels, icc, frames, bits, dpi)
    if im.mode in ("LA", "La", "RGBA", "RGBa", "PA") or "transparency" in im.info:
        im = im.convert("RGBA")  # a transparency key (tRNS of palette, gray or RGB PNGs) becomes alpha
    elif im.mode in ("1", "L"):
        im = im.convert("L")
    elif im.mode != "RGB":
        im = im.convert("RGB")
    a = np.asarray(im, dtype=np.uint8)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.shape[2] == 4 and (a[:, :, 3] == 255).all():  # alpha opaque everywhere (most screenshots) says nothing:
        gray = (a[:, :, 0] == a[:, :, 1]).all() and (a[:, :, 1] == a[:, :, 2]).all()  # gray repeated (LA, L + key)
        a = a[:, :, :1] if gray else a[:, :, :3]  # which JPEG can hold
    pixels = torch.from_numpy(a.copy()).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
    return ImageFile(pixels, icc, frames, 8, dpi)


def load_image(path: str | Path, max_pixels: int | None = None) -> torch.Tensor:
    """Read an image as float32 [1, C, H, W] in 0..1 (see `read_image`)."""
    return read_image(path, max_pixels).pixels


def check_image_tensor(image: torch.Tensor, what: str | Path = "image") -> None:
    """ValueError naming `what` (the file being written) unless `image` is a float [C, H, W] or
    [1, C, H, W] tensor of finite values in 0..1 (give or take `finite.RANGE_SLACK`): a 0..255 tensor would be
    written white and NaN black."""
    if not isinstance(image, torch.Tensor) or image.ndim not in (3, 4) or (image.ndim == 4 and len(image) != 1):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{what}: expected an image tensor [C, H, W] or [1, C, H, W], got {shape}")
    if not image.is_floating_point():
        raise ValueError(f"{what}: expected a float image in 0..1, got {str(image.dtype).removeprefix('torch.')} "
                         f"(divide a 0..255 image by 255)")
    check_unit_range(image, str(what), "fix what made the NaN or Inf", f"{what}: the image's",
                     "images are written from")


def to_uint8(image: torch.Tensor, what: str | Path = "image") -> np.ndarray:
    """[C, H, W] or [1, C, H, W] float in 0..1 -> uint8 [H, W, C], converted in row chunks (bounded memory).
    ValueError naming `what` for anything else (see `check_image_tensor`)."""
    check_image_tensor(image, what)
    if image.ndim == 4:
        image = image[0]
    c, h, w = image.shape
    out = np.empty((h, w, c), dtype=np.uint8)
    for y in range(0, h, _ROWS_PER_CHUNK):
        part = image[:, y:y + _ROWS_PER_CHUNK].detach().float().cpu()
        out[y:y + part.shape[1]] = part.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return out


def load_rgb_uint8(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """An image file as uint8 RGB (H, W, 3): gray repeated, alpha dropped (for metrics and training data)."""
    x = load_image(path, max_pixels)
    x = x[:, :3] if x.shape[1] >= 3 else x.expand(-1, 3, -1, -1)
    return to_uint8(x)


def _icc_fits(icc: bytes | None, channels: int) -> bool:
    """Whether an ICC profile's colour space matches what we write (RGB for 3/4 channels, GRAY for 1)."""
    return _icc_space(icc) == (b"GRAY" if channels == 1 else b"RGB ")


def _write(image: torch.Tensor, path: Path, icc: bytes | None, image_format: str, quality: int,
           source: str | None = None, dpi: tuple[float, float] | None = None) -> None:
    """Write `image` to `path` in `image_format` ("PNG", "JPEG", "WEBP") with our Software tag (and the
    input it came from, `source`, and its resolution `dpi`: PNG pHYs, JPEG JFIF and EXIF, WebP EXIF)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    a = to_uint8(image)
    if image_format == "WEBP" and a.shape[2] == 1:  # WebP has no gray: written as RGB, with an RGB profile only
        a = np.repeat(a, 3, axis=2)
    extra = {"icc_profile": icc} if _icc_fits(icc, a.shape[2]) else {}
    if image_format == "PNG":
        info = PngInfo()
        info.add_text("Software", SOFTWARE_TAG)
        if source:
            info.add_text(_PNG_SOURCE, source)
        extra["pnginfo"] = info
        if dpi:
            extra["dpi"] = dpi
    else:
        exif = Image.Exif()
        exif[_EXIF_SOFTWARE] = SOFTWARE_TAG
        if source:
            exif[_EXIF_DOCUMENT_NAME] = source
        if dpi:
            exif.update(zip(_EXIF_RESOLUTION, (*dpi, 2)))
        extra.update(exif=exif.tobytes(), quality=quality)
        if image_format == "JPEG":
            extra["subsampling"] = 0  # full-resolution colour: 4:2:0 blurs the edges of coloured text
            if dpi and max(dpi) <= _JFIF_MAX_DENSITY:
                extra["dpi"] = dpi
        elif quality == 100:
            extra["lossless"] = True
    Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a).save(path, format=image_format, **extra)


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    try:
        return OUTPUT_FORMATS["jpg" if suffix == "jpeg" else suffix]
    except KeyError:
        raise ValueError(f"{path}: images are written as {', '.join('.' + k for k in OUTPUT_FORMATS)}") from None


def check_writable(path: str | Path, channels: int, size: tuple[int, int] | None = None) -> None:
    """ValueError naming `path` when an image of `channels` (and `size`, height x width) cannot be
    written there: a suffix we do not write, an alpha channel (4 channels) for JPEG, or a side longer
    than JPEG (65500 px) or WebP (16383 px) can hold."""
    path = Path(path)
    image_format = _format_of(path)
    if channels not in DESCRIPTOR.input_channels:
        raise ValueError(f"{path}: cannot save {channels} channels as an image (need {DESCRIPTOR.channels_text()})")
    if image_format == "JPEG" and channels == 4:
        raise ValueError(f"{path}: the image has an alpha channel, which JPEG cannot keep; write it as PNG or "
                         f"WebP ({named('--format png / webp', 'a .png / .webp path')})")
    longest = _MAX_SIDE.get(image_format)
    if size is not None and longest is not None and max(size) > longest:
        raise ValueError(f"{path}: a {size[1]}x{size[0]} image is too large for {image_format} (at most {longest} "
                         f"px a side); write it as PNG ({named('--format png', 'a .png path')}) or upscale by less "
                         f"({named('--scale', 'scale')})")


def save_images(items: list[tuple], quality: int = DEFAULT_QUALITY, source: str | None = None,
                dpi: tuple[float, float] | None = None) -> list[Path]:
    """Write several 8-bit images, each in the format of its path's suffix (PNG, JPEG at `quality`,
    WebP at `quality`): items are (image, path) or (image, path, icc_profile). `source` names the input
    they came from in each file (see `recorded_source`); `dpi`, (x, y) dots per inch, is each file's
    resolution (see `scaled_dpi`; None writes none).

    Images are float [C, H, W] / [1, C, H, W] in 0..1 (values up to `finite.RANGE_SLACK` outside are
    clamped), C = 1, 3 or 4 (anything else, or NaN / Inf, is a ValueError naming the file, and none is
    written). All are written to hidden temporary files first and renamed only when every one
    succeeded, so the final names appear together or not at all; the temporaries are removed on any
    error (also Ctrl-C / SIGTERM handled as one).
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for item in items:
            image, path = item[0], Path(item[1])
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = _temporary_path(path)
            staged.append((tmp, path))
            check_image_tensor(image, path)
            check_writable(path, image.shape[-3])
            _write(image, tmp, item[2] if len(item) > 2 else None, _format_of(path), quality, source, dpi)
            os.chmod(tmp, default_file_mode())
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            if tmp.exists():
                tmp.unlink()
    return [path for _, path in staged]


def name_max(folder: Path) -> int:
    """The longest file name (bytes) the disk of `folder` (or of its nearest existing parent) takes: 255 on
    the usual file systems."""
    for place in (folder, *folder.parents):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if place.exists():
                return os.pathconf(place, "PC_NAME_MAX")
    return 255


def _temporary_path(path: Path) -> Path:
    """The hidden file `path` is written to first: `.NAME.partial`, or a short name of a digest where that would
    pass the disk's longest name (a final name that fits must not fail for its temporary's)."""
    name = f".{path.name}.partial"
    if len(os.fsencode(name)) > name_max(path.parent):
        name = f".tadisr-{hashlib.sha256(os.fsencode(path.name)).hexdigest()[:16]}.partial"
    return path.with_name(name)


def save_image(image: torch.Tensor, path: str | Path, icc_profile: bytes | None = None,
               quality: int = DEFAULT_QUALITY, dpi: tuple[float, float] | None = None) -> Path:
    """Write one 8-bit image (PNG, JPEG or WebP by the suffix), atomically (see `save_images`)."""
    return save_images([(image, path, icc_profile)], quality, dpi=dpi)[0]


def _complete(path: Path, image_format: str) -> bool:
    """Whether the file ends as a whole file of `image_format` does (PNG IEND, JPEG EOI, the RIFF size)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if image_format == "WEBP":
            head = f.read(12)
            return head[:4] == b"RIFF" and head[8:] == b"WEBP" and int.from_bytes(head[4:8], "little") + 8 == size
        f.seek(max(0, size - 12))
        return f.read().endswith(_PNG_END if image_format == "PNG" else _JPEG_END)


def _our_tags(path: Path, complete: bool) -> tuple[bool, str | None]:
    """(whether `path` is an image this project wrote, by its Software tag, and with `complete` also
    whole; the input it recorded, if any). Only the header is read, whatever the image's size."""
    from PIL import Image

    try:
        expected = _format_of(path)
        if complete and not _complete(path, expected):
            return False, None
        with _pil_bomb_limit(sys.maxsize), Image.open(path) as im:
            if im.format != expected:
                return False, None
            if expected == "PNG":
                return im.info.get("Software") == SOFTWARE_TAG, im.info.get(_PNG_SOURCE)
            exif = im.getexif()
            return exif.get(_EXIF_SOFTWARE) == SOFTWARE_TAG, exif.get(_EXIF_DOCUMENT_NAME)
    except (OSError, ValueError, SyntaxError):
        return False, None


def image_size(path: str | Path) -> tuple[int, int] | None:
    """(width, height) of an image file from its header alone; None when it cannot be read."""
    from PIL import Image

    try:
        with _pil_bomb_limit(sys.maxsize), Image.open(path) as im:
            return im.size
    except (OSError, ValueError, SyntaxError):
        return None


def written_by_us(path: str | Path, complete: bool = True, source: str | None = None,
                  unrecorded: bool = True) -> bool:
    """Whether `path` is an image this project wrote (its Software tag), with `complete` also whole,
    and with `source` also from that input (a file of a version that recorded no input counts as
    from it when `unrecorded`)."""
    ours, recorded = _our_tags(Path(path), complete)
    return ours and (source is None or recorded == source or (recorded is None and unrecorded))


def recorded_source(path: str | Path) -> str | None:
    """The input an image this project wrote was made from (`save_images`' `source`); None when the
    file is not ours or records none."""
    ours, recorded = _our_tags(Path(path), complete=False)
    return recorded if ours else None
