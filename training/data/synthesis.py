"""FTSR-style training data: text pasted onto text-free HR photographs, with a pixel-exact text mask.

Text comes from two sources:

- text crops with masks (TextSeg / BTS / CTR layouts): pasted as opaque rectangles, as the official
  FTSR script does; the mask is the crop's binarised text mask;
- text rendered with fonts (Latin and CJK; random strings, sizes, colours, rotations, vertical and
  multi-line layouts): rendered as an alpha layer, thresholded to a binary mask, and composited with
  that same mask, so the mask is exactly the set of pixels the text changed.

Everything is deterministic given a seed. ``TextSynthesizer.sample(seed)`` returns HR, LR (through
``degradation.degrade``) and mask as uint8 arrays.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import random
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from tadisr_core.images import ImageReadError, is_image_file, load_image, load_rgb_uint8, to_uint8, walk_images
from training.data.degradation import FTSR_RELEASE, DegradationPreset, degrade, get_preset, ground_truth

log = logging.getLogger("tadisr")

ALPHA_THRESHOLD = 127  # alpha > this counts as text
LATIN_CHARS = "abcdefghijklmnopqrstuvwxyz"
LATIN_EXTRA = "0123456789&-.,!?'"
# Frequent simplified Chinese characters (random strings over these look like real text, not rarities).
COMMON_HANZI = (
    "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么"
    "心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样现"
    "分将外但身些与高意进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最间新什打便位"
    "因重被走电四第门相次东政海口使教西再平真听世气信北少关并内加化由却代军产入先山五太水万市眼体别处总才场师"
    "书比住员九笑性通目华报立马命张活难神数件安表原车白应路期叫死常提感金何更反合放做系计或司利受光王果亲界及"
    "今京务制解各任至清物台象记边共风战干接它许八特觉望直服毛林题建南度统色字请交爱让认算论百吃义科怎元社术结"
)
LATIN_PROBE = "AaZz09"
CJK_PROBE = "中文字我"
SYSTEM_FONT_FAMILIES = (
    "DejaVu Sans", "DejaVu Serif", "DejaVu Sans Mono", "Liberation Sans", "Liberation Serif",
    "Noto Sans CJK SC", "Noto Serif CJK SC", "WenQuanYi Zen Hei",
)


# ---------------------------------------------------------------------------------------- file I/O


def list_images(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Image files under ``folder`` (sorted; `images.walk_images`: symlinked sub-folders followed, hidden
    names left out); a clear error if the folder is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    return walk_images(folder, recursive).files


SET_FOLDERS = ("hr", "lr", "mask")
SET_FILE = re.compile(r"\d{6,}\.png")  # the names a synthesised set's files have


def _set_files(out: Path) -> list[Path]:
    """The files in `out`'s set folders (hidden ones such as .DS_Store left out)."""
    return [f for sub in SET_FOLDERS if (out / sub).is_dir() for f in sorted((out / sub).iterdir())
            if not f.name.startswith(".")]


def foreign_set_files(out: Path, flag: str = "--out") -> str | None:
    """The error (naming `flag`, the option that gave `out`) when `out`'s set folders hold files a
    synthesised set does not have; None otherwise. Nothing is written or removed."""
    foreign = [f for f in _set_files(out) if not SET_FILE.fullmatch(f.name)]
    if not foreign:
        return None
    count = f"{len(foreign)} file" + ("s" if len(foreign) > 1 else "")
    return (f"{flag} {out} holds {count} this command did not write (e.g. {foreign[0]}); choose another {flag}, "
            f"or move them away")


def clear_previous_set(out: Path, flag: str = "--out") -> str | None:
    """Remove a synthesised set written into `out` before (its NNNNNN.png files and manifest, also one a
    stop cut short), so that a new set never mixes with an older one; the error of `foreign_set_files`
    when `out` holds other files (left as they are)."""
    if problem := foreign_set_files(out, flag):
        return problem
    for f in _set_files(out):
        f.unlink()
    (out / "manifest.jsonl").unlink(missing_ok=True)
    return None


def small_backgrounds(paths: Sequence[str | os.PathLike], size: int) -> list[tuple[Path, tuple[int, int]]]:
    """The backgrounds whose short side is under `size`, with their (width, height), from the file headers.

    `TextSynthesizer` upscales them to the crop, which blurs the ground truth a model learns from.
    Files PIL cannot open are skipped (their reader reports them where they are read).
    """
    out = []
    for path in paths:
        try:
            with Image.open(path) as im:
                w, h = im.size
        except (OSError, ValueError):
            continue
        if min(w, h) < size:
            out.append((Path(path), (w, h)))
    return out


def small_backgrounds_warning(small: Sequence[tuple[Path, tuple[int, int]]], total: int, size: int,
                              setting: str) -> str:
    """One warning naming the small backgrounds (up to five) and what to change; `setting` is the crop's option."""
    names = ", ".join(f"{p} ({w}x{h})" for p, (w, h) in small[:5])
    more = f" and {len(small) - 5} more" if len(small) > 5 else ""
    return (f"{len(small)} of {total} backgrounds are under the {size} px crop ({setting}) on their short side and "
            f"are upscaled to it, which blurs the ground truth: {names}{more}. Use photos at least {size} px on "
            f"the short side, or a smaller {setting}.")


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """An image file as uint8 RGB ``(H, W, 3)``, read by the project's one reader (EXIF, 16-bit, float files)."""
    return load_rgb_uint8(path)


def load_mask(path: str | os.PathLike, size: tuple[int, int] | None = None) -> np.ndarray:
    """A mask file (read by the one reader: EXIF, 16-bit) binarised to bool ``(H, W)`` (any non-black pixel of a
    0/1 mask, > 127 otherwise). A file with transparency (RGBA or gray + alpha, not all opaque) is seen
    over black; when its visible pixels are all one colour (ink drawn as opacity), the alpha itself is
    the mask. A file of class indices (`_class_index_mask`: a VOC-style palette, a 16-bit 0/1 file) is read by
    index: any but 0 is text. ``size`` = (W, H) resizes it (nearest) first."""
    x = load_image(path)  # first: it names the file when it cannot be read
    a = _class_index_mask(path)
    if a is None:
        if x.shape[1] in (2, 4) and bool((x[:, -1] < 1).any()):
            colour, alpha = x[:, :-1], x[:, -1:]
            seen = colour[:, :, alpha[0, 0] > 0]
            one_colour = seen.numel() == 0 or bool((seen.amax(dim=-1) == seen.amin(dim=-1)).all())
            x = alpha if one_colour else colour * alpha
        a = to_uint8(x[:, :3] if x.shape[1] >= 3 else x[:, :1])
        if a.shape[2] == 3:  # PIL's "L" conversion, exactly: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16
            a = ((a[..., 0].astype(np.uint32) * 19595 + a[..., 1].astype(np.uint32) * 38470
                  + a[..., 2].astype(np.uint32) * 7471 + 0x8000) >> 16).astype(np.uint8)
        else:
            a = a[..., 0]
    if size is not None and a.shape[::-1] != tuple(size):
        a = np.asarray(Image.fromarray(a).resize(size, Image.NEAREST))
    return a > 0 if a.max() <= 1 else a > ALPHA_THRESHOLD


def _class_index_mask(path: str | os.PathLike) -> np.ndarray | None:
    """A mask file that stores class indices rather than colours, as uint8 0/1 (EXIF orientation applied):
    a palette file without transparency whose index 0 is black or unset and whose other indices are
    colours or only 1 (VOC-style: any index but 0 is text, whatever its colour), or a 16/32-bit gray file
    holding only 0 and 1. None for other files, binarised by their colours: a palette of gray levels is
    an antialiased mask saved as a palette image, whose faint edges are no text."""
    from PIL import ImageOps

    with open(path, "rb") as f, Image.open(f) as im:
        palette = im.getpalette() if im.mode == "P" else None
        indexed = im.mode == "P" and "transparency" not in im.info and not any((palette or [0, 0, 0])[:3])
        if not indexed and im.mode not in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            return None
        a = np.asarray(ImageOps.exif_transpose(im))
    if indexed:
        used = np.unique(a)
        entries = np.array(palette + [0] * (3 * 256 - len(palette))).reshape(-1, 3)[used]
        indexed = used.max() <= 1 or not (entries == entries[:, :1]).all()
    if not indexed and (im.mode == "P" or a.max() > 1):
        return None
    return (a != 0).astype(np.uint8)


# ------------------------------------------------------------------------------------------ fonts


@dataclass(frozen=True)
class FontSpec:
    """A font face: file, face index inside a .ttc, and which scripts it renders."""

    path: str
    index: int = 0
    latin: bool = True
    cjk: bool = False


@functools.lru_cache(maxsize=256)
def load_font(path: str, index: int, size: int) -> ImageFont.FreeTypeFont:
    """A cached PIL FreeType font."""
    return ImageFont.truetype(path, size=size, index=index)


def _glyph(font: ImageFont.FreeTypeFont, ch: str) -> tuple:
    mask = font.getmask(ch)
    return mask.size, bytes(mask)


def font_renders(font: ImageFont.FreeTypeFont, text: str) -> bool:
    """True if every non-space character of ``text`` has a real glyph (not the font's .notdef box)."""
    notdef = _glyph(font, "\U000f0000")  # a private-use code point no text font maps
    return all(_glyph(font, ch) != notdef for ch in set(text) if not ch.isspace())


def probe_font(path: str | os.PathLike, index: int = 0) -> FontSpec | None:
    """A ``FontSpec`` with the scripts the face renders, or None if it cannot be loaded."""
    try:
        font = load_font(str(path), index, 32)
    except OSError:
        return None
    spec = FontSpec(str(path), index, font_renders(font, LATIN_PROBE), font_renders(font, CJK_PROBE))
    return spec if spec.latin or spec.cjk else None


def fonts_in_folder(folder: str | os.PathLike) -> list[FontSpec]:
    """Usable fonts (.ttf, .otf, .ttc face 0) under ``folder``, sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"font folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".ttf", ".otf", ".ttc"))
    return [s for s in (probe_font(p) for p in files) if s is not None]


def system_fonts(families: Sequence[str] = SYSTEM_FONT_FAMILIES) -> list[FontSpec]:
    """Installed fonts of the given families, found with fontconfig's ``fc-match`` (empty if absent)."""
    if shutil.which("fc-match") is None:
        return []
    specs: list[FontSpec] = []
    for family in families:
        out = subprocess.run(["fc-match", "-f", "%{file}\t%{index}\t%{family}", family],
                             capture_output=True, text=True, check=False).stdout
        parts = out.split("\t")
        if len(parts) != 3 or family.lower() not in parts[2].lower():
            continue  # fc-match falls back to another family when the requested one is missing
        spec = probe_font(parts[0], int(parts[1] or 0))
        if spec is not None and spec not in specs:
            specs.append(spec)
    return specs


# ------------------------------------------------------------------------------------- text crops


def _mask_dir_names(image_dir: str) -> list[str]:
    if image_dir.endswith("_images"):  # TextSeg: train_images/ + train_gt/
        return [image_dir[: -len("_images")] + "_gt"]
    return {"image": ["semantic_label", "mask", "masks"],  # BTS: image/ + semantic_label/
            "images": ["masks", "mask"],
            "images_enhanced": ["mask"]}.get(image_dir, [])  # CTR


def _match_mask(mask_dir: Path, stem: str) -> Path | None:
    for suffix in ("", "_mask", "_maskfg", "_gt"):
        for ext in (".png", ".bmp", ".jpg", ".tif"):
            p = mask_dir / f"{stem}{suffix}{ext}"
            if p.is_file():
                return p
    return None


def find_text_crops(root: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(image, mask) pairs under ``root``, matched by file stem inside sibling folder pairs:
    ``images/``+``masks/``, ``image/``+``semantic_label/`` (BTS), ``images_enhanced/``+``mask/`` (CTR),
    ``*_images/``+``*_gt/`` (TextSeg). Images without a mask are skipped."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"text-crop folder not found: {root}")
    pairs = []
    for image_dir in sorted(p for p in [root, *root.rglob("*")] if p.is_dir()):
        for name in _mask_dir_names(image_dir.name):
            mask_dir = image_dir.parent / name
            if not mask_dir.is_dir():
                continue
            for img in list_images(image_dir, recursive=False):
                mask = _match_mask(mask_dir, img.stem)
                if mask is not None:
                    pairs.append((img, mask))
            break
    if not pairs:
        raise FileNotFoundError(
            f"no text crops found under {root}: expected image/mask folder pairs with matching file "
            "names, such as images/+masks/, image/+semantic_label/ (BTS), images_enhanced/+mask/ (CTR) "
            "or train_images/+train_gt/ (TextSeg)")
    return pairs


# ------------------------------------------------------------------------------------- rendering


def random_text(rng: random.Random, cjk: bool) -> str:
    """A random Latin word group or CJK string."""
    if cjk:
        return "".join(rng.choice(COMMON_HANZI) for _ in range(rng.randint(2, 8)))
    words = []
    for _ in range(rng.randint(1, 3)):
        w = "".join(rng.choice(LATIN_CHARS) for _ in range(rng.randint(2, 9)))
        if rng.random() < 0.15:
            w += rng.choice(LATIN_EXTRA)
        words.append(rng.choice((w, w.upper(), w.capitalize())))
    return " ".join(words)


def render_text_mask(lines: Sequence[str], font: ImageFont.FreeTypeFont, vertical: bool = False,
                     angle: float = 0.0, align: str = "left") -> np.ndarray:
    """Render text as a binary mask (bool ``(h, w)``, cropped to the ink). Horizontal lines are stacked
    top to bottom; ``vertical`` stacks the characters of each line top to bottom, columns right to left.
    ``angle`` rotates counter-clockwise (degrees) before thresholding."""
    if vertical:
        alpha = _render_vertical(lines, font)
    else:
        alpha = _render_horizontal(lines, font, align)
    if angle:
        alpha = alpha.rotate(angle, resample=Image.BICUBIC, expand=True)
    mask = np.asarray(alpha) > ALPHA_THRESHOLD
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return np.zeros((0, 0), bool)
    return mask[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]


def _render_horizontal(lines: Sequence[str], font: ImageFont.FreeTypeFont, align: str) -> Image.Image:
    text = "\n".join(lines)
    spacing = max(1, font.size // 5)
    bbox = ImageDraw.Draw(Image.new("L", (1, 1))).multiline_textbbox(
        (0, 0), text, font=font, spacing=spacing, align=align)
    x0, y0, x1, y1 = (math.floor(bbox[0]), math.floor(bbox[1]), math.ceil(bbox[2]), math.ceil(bbox[3]))
    pad = 2
    layer = Image.new("L", (x1 - x0 + 2 * pad, y1 - y0 + 2 * pad), 0)
    ImageDraw.Draw(layer).multiline_text((pad - x0, pad - y0), text, fill=255, font=font,
                                         spacing=spacing, align=align)
    return layer


def _render_vertical(lines: Sequence[str], font: ImageFont.FreeTypeFont) -> Image.Image:
    cell = int(font.size * 1.1) + 2
    rows = max(len(line) for line in lines)
    pad = cell  # a glyph centred in its cell may overhang it: a descender on the last row (cropped to the ink)
    layer = Image.new("L", (cell * len(lines) + 2 * pad, cell * rows + 2 * pad), 0)
    draw = ImageDraw.Draw(layer)
    for col, line in enumerate(lines):
        cx = pad + (len(lines) - 1 - col) * cell + cell // 2
        for row, ch in enumerate(line):
            draw.text((cx, pad + row * cell + cell // 2), ch, fill=255, font=font, anchor="mm")
    return layer


# ------------------------------------------------------------------------------------- composing


@dataclass
class SynthesisConfig:
    """Knobs of the composition. Sizes relative to the canvas side."""

    size: int = 512
    scale: int = 4
    min_items: int = 1
    max_items: int = 5
    crop_prob: float = 0.5  # chance an item is a text crop when both sources exist
    crop_scale: tuple[float, float] = (0.15, 1.0)  # crop long side / canvas side
    font_scale: tuple[float, float] = (0.04, 0.16)  # font size / canvas side
    min_font_px: int = 10
    cjk_prob: float = 0.4
    multiline_prob: float = 0.25
    vertical_prob: float = 0.15
    rotate_prob: float = 0.4
    max_angle: float = 30.0
    min_contrast: float = 80.0  # luma difference between text colour and the background under it
    place_tries: int = 100

    def __post_init__(self):
        if self.scale < 1:
            raise ValueError(f"scale must be at least 1, got {self.scale}")
        if self.size < self.scale or self.size % self.scale:
            raise ValueError(f"size {self.size} must be a positive multiple of scale {self.scale}")


@dataclass
class SynthSample:
    """One composed sample: uint8 HR ``(H,W,3)``, mask ``(H,W)`` in {0,255}, LR ``(h,w,3)`` or None,
    the text-free background crop, and what was placed where (``items``)."""

    hr: np.ndarray
    mask: np.ndarray
    background: np.ndarray
    background_file: str
    items: list[dict] = field(default_factory=list)
    seed: int = 0
    lr: np.ndarray | None = None


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def _text_colour(rng: random.Random, under: np.ndarray, min_contrast: float) -> tuple[int, int, int]:
    bg = float(_luma(under).mean()) if under.size else 128.0
    for _ in range(10):
        c = (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255))
        if abs(float(_luma(np.array(c))) - bg) >= min_contrast:
            return c
    return (0, 0, 0) if bg > 127 else (255, 255, 255)


class TextSynthesizer:
    """Composes FTSR-style samples from backgrounds, fonts and/or text crops, deterministically per seed.

    ``has_text(image_uint8_rgb) -> bool`` (optional) filters the backgrounds once, up front.
    """

    def __init__(self, backgrounds: Sequence[str | os.PathLike], fonts: Sequence[FontSpec] = (),
                 text_crops: Sequence[tuple[str | os.PathLike, str | os.PathLike]] = (),
                 config: SynthesisConfig | None = None, preset: str | DegradationPreset = FTSR_RELEASE,
                 has_text: Callable[[np.ndarray], bool] | None = None):
        self.config = config or SynthesisConfig()
        self.preset = get_preset(preset)
        self.fonts = list(fonts)
        self.text_crops = [(Path(i), Path(m)) for i, m in text_crops]
        if not self.fonts and not self.text_crops:
            raise ValueError("no text source: no fonts (install fonts-dejavu / fonts-noto-cjk, or give a "
                             "font folder) and no text crops")
        self.backgrounds = [Path(p) for p in backgrounds]
        self.unreadable: set[Path] = set()  # met by `_draw_background`, left out from then on
        if has_text is not None:
            self.backgrounds = [p for p in self.backgrounds if not has_text(load_rgb(p))]
        if not self.backgrounds:
            raise ValueError("no usable background images" + (" (all contain text)" if has_text else ""))

    # -- public

    def _draw_background(self, rng: random.Random) -> tuple[Path, np.ndarray]:
        """A background drawn by `rng` and read. One that cannot be read is named once and left out: the
        draw moves on to the next, and as every draw is made whether a file is known bad or not, a seed
        gives the same scene whichever bad files this process has met before."""
        for _ in range(8 * len(self.backgrounds) + 64):
            path = rng.choice(self.backgrounds)
            if path in self.unreadable:
                continue
            try:
                return path, load_rgb(path)
            except ImageReadError as e:  # its message names the file and why
                self.unreadable.add(path)
                log.warning("background left out: %s", str(e).splitlines()[0])
        raise ValueError(f"none of the {len(self.backgrounds)} backgrounds could be read (e.g. "
                         f"{next(iter(self.unreadable), '?')})")

    def compose(self, seed: int) -> SynthSample:
        """HR + mask for ``seed`` (no LR)."""
        rng = random.Random(seed)
        bg_file, image = self._draw_background(rng)
        bg = self._background_crop(image, rng)
        hr, mask = bg.copy(), np.zeros(bg.shape[:2], bool)
        boxes: list[tuple[int, int, int, int]] = []
        items = []
        for _ in range(rng.randint(self.config.min_items, self.config.max_items)):
            use_crop = bool(self.text_crops) and (not self.fonts or rng.random() < self.config.crop_prob)
            if use_crop:
                item = self._paste_crop(hr, mask, boxes, rng)
            else:
                item = self._paste_text(hr, mask, bg, boxes, rng)
            if item is not None:
                items.append(item)
        return SynthSample(hr=hr, mask=mask.astype(np.uint8) * 255, background=bg,
                           background_file=str(bg_file), items=items, seed=seed)

    def sample(self, seed: int) -> SynthSample:
        """HR, mask and the degraded LR for ``seed``."""
        s = self.compose(seed)
        hr = ground_truth(torch.from_numpy(s.hr).permute(2, 0, 1)[None].float() / 255, self.preset)
        if self.preset.usm_gt:
            s.hr = (hr[0].permute(1, 2, 0) * 255).round().byte().numpy()
        lr = degrade(hr, self.config.scale, self.preset, torch.Generator().manual_seed(seed))
        s.lr = (lr[0].permute(1, 2, 0) * 255).round().byte().numpy()
        return s

    # -- steps

    def _background_crop(self, img: np.ndarray, rng: random.Random) -> np.ndarray:
        size = self.config.size
        h, w = img.shape[:2]
        if min(h, w) < size:  # small photos are upscaled; the official script requires >= crop size
            f = size / min(h, w)
            w, h = max(size, round(w * f)), max(size, round(h * f))
            img = np.asarray(Image.fromarray(img).resize((w, h), Image.LANCZOS))
        y, x = rng.randint(0, h - size), rng.randint(0, w - size)
        return np.ascontiguousarray(img[y:y + size, x:x + size])

    def _find_spot(self, hw: tuple[int, int], boxes: list, rng: random.Random):
        size = self.config.size
        h, w = hw
        if h == 0 or w == 0 or h > size or w > size:
            return None
        for _ in range(self.config.place_tries):
            x, y = rng.randint(0, size - w), rng.randint(0, size - h)
            box = (x, y, x + w, y + h)
            if not any(_overlaps(box, b) for b in boxes):
                return box
        return None

    def _shrink_to_fit(self, make: Callable[[float], np.ndarray], start: float, minimum: float,
                       boxes: list, rng: random.Random):
        """Try sizes start, 0.9 start, ... >= minimum (as the FTSR script does): the first patch
        ``make(s)`` that finds a free spot, as (s, patch, box); None if none does."""
        s = start
        while s >= minimum:
            patch = make(s)
            box = self._find_spot(patch.shape[:2], boxes, rng)
            if box is not None:
                return s, patch, box
            s *= 0.9
        return None

    def _paste_text(self, hr, mask, bg, boxes, rng: random.Random) -> dict | None:
        cfg = self.config
        can_latin = any(f.latin for f in self.fonts)
        cjk = any(f.cjk for f in self.fonts) and (not can_latin or rng.random() < cfg.cjk_prob)
        font_spec = rng.choice([f for f in self.fonts if (f.cjk if cjk else f.latin)])
        n_lines = rng.randint(2, 3) if rng.random() < cfg.multiline_prob else 1
        lines = [random_text(rng, cjk) for _ in range(n_lines)]
        vertical = rng.random() < cfg.vertical_prob
        angle = rng.uniform(-cfg.max_angle, cfg.max_angle) if rng.random() < cfg.rotate_prob else 0.0
        align = rng.choice(("left", "center", "right"))

        def make(px: float) -> np.ndarray:
            font = load_font(font_spec.path, font_spec.index, int(px))
            return render_text_mask(lines, font, vertical, angle, align)

        start = max(rng.uniform(*cfg.font_scale) * cfg.size, cfg.min_font_px)
        found = self._shrink_to_fit(make, start, cfg.min_font_px, boxes, rng)
        if found is None:
            return None
        px, ink, box = found
        x0, y0, x1, y1 = box
        region, under = hr[y0:y1, x0:x1], bg[y0:y1, x0:x1]
        colour = _text_colour(rng, under[ink], cfg.min_contrast)
        region[ink] = colour
        # Where the background already had exactly this colour, nudge one level so that every mask
        # pixel differs from the background (mask == changed pixels, exactly).
        same = ink & (under == np.array(colour, np.uint8)).all(-1)
        region[same, 0] = colour[0] + 1 if colour[0] < 255 else 254
        mask[y0:y1, x0:x1] |= ink
        boxes.append(box)
        return {"kind": "render", "text": "\n".join(lines), "font": font_spec.path,
                "font_index": font_spec.index, "font_px": int(px), "box": list(box),
                "angle": round(angle, 3), "vertical": vertical, "colour": list(colour)}

    def _paste_crop(self, hr, mask, boxes, rng: random.Random) -> dict | None:
        cfg = self.config
        img_path, mask_path = rng.choice(self.text_crops)
        crop = Image.fromarray(load_rgb(img_path))
        crop_mask = Image.fromarray(load_mask(mask_path, crop.size).astype(np.uint8) * 255)

        def make(s: float) -> np.ndarray:  # RGB + binarised mask as a 4th channel
            f = s * cfg.size / max(crop.size)
            wh = (max(1, round(crop.width * f)), max(1, round(crop.height * f)))
            m = np.asarray(crop_mask.resize(wh, Image.LANCZOS)) > ALPHA_THRESHOLD
            return np.dstack([np.asarray(crop.resize(wh, Image.LANCZOS)), m.astype(np.uint8)])

        found = self._shrink_to_fit(make, rng.uniform(*cfg.crop_scale), cfg.crop_scale[0], boxes, rng)
        if found is None:
            return None
        _, patch, box = found
        x0, y0, x1, y1 = box
        hr[y0:y1, x0:x1] = patch[..., :3]  # an opaque rectangle, as in the FTSR script
        mask[y0:y1, x0:x1] = patch[..., 3] > 0
        boxes.append(box)
        return {"kind": "crop", "text": None, "source": str(img_path), "mask_source": str(mask_path),
                "box": list(box)}


def sample_seed(base_seed: int, *keys: int) -> int:
    """An independent 63-bit seed for e.g. sample ``index`` (and ``epoch``) of a run seeded ``base_seed``."""
    state = np.random.SeedSequence(base_seed, spawn_key=tuple(keys)).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])
