"""torch Datasets for training: FTSR-layout folders, Real-CE with list files, on-the-fly synthesis.

Every item is ``dict(lr=[3,h,w], hr=[3,H,W], mask=[1,H,W], name=str)``, float tensors in 0..1, with
``H = scale * h``. Random crops are aligned: the HR crop starts at ``scale`` times the LR coordinates.
With ``seed=None`` the crops (and on-the-fly degradations) follow torch's global RNG, which DataLoader
seeds per worker; with a seed, item ``i`` is the same every time.
"""
from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from tadisr_core.pipeline import LATENT_FACTOR, upscale_canvas
from training.data.degradation import FTSR_RELEASE, DegradationPreset, degrade, get_preset, ground_truth
from training.data.synthesis import (
    FontSpec,
    SynthesisConfig,
    TextSynthesizer,
    find_text_crops,
    fonts_in_folder,
    list_images,
    load_mask,
    load_rgb,
    sample_seed,
    system_fonts,
)

log = logging.getLogger("tadisr")


def image_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 ``(H,W,3)`` -> float ``[3,H,W]`` in 0..1."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float() / 255


def mask_tensor(mask: np.ndarray) -> torch.Tensor:
    """bool or uint8 ``(H,W)`` mask -> float ``[1,H,W]`` in {0,1}."""
    return torch.from_numpy(np.array(mask > 0))[None].float()


def aligned_crop(lr: np.ndarray, hr: np.ndarray, mask: np.ndarray, crop: int, scale: int,
                 rng: random.Random, name: str = "") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random ``crop``-pixel HR crop (and mask) with the matching ``crop/scale`` LR crop."""
    if crop % scale:
        raise ValueError(f"crop {crop} is not divisible by scale {scale}")
    c = crop // scale
    h, w = lr.shape[:2]
    if h < c or w < c:
        raise ValueError(f"{name}: LR image {w}x{h} is smaller than the LR crop {c}x{c}")
    y, x = rng.randint(0, h - c), rng.randint(0, w - c)
    hs, ws = y * scale, x * scale
    return lr[y:y + c, x:x + c], hr[hs:hs + crop, ws:ws + crop], mask[hs:hs + crop, ws:ws + crop]


def _check_crop(crop: int | None, scale: int) -> None:
    if crop is not None and crop % scale:
        raise ValueError(f"crop {crop} is not divisible by scale {scale}")


def _item_rng(seed: int | None, index: int) -> random.Random:
    if seed is None:
        return random.Random(torch.randint(0, 2**62, (1,)).item())
    return random.Random(sample_seed(seed, index))


def _files_by_stem(folder: Path) -> dict[str, Path]:
    """The images of `folder` by stem; ValueError naming the files when several share a stem."""
    files: dict[str, Path] = {}
    for path in list_images(folder, recursive=False):
        if path.stem in files:
            raise ValueError(f"several files share the stem {path.stem!r} in {folder}: {files[path.stem].name}, "
                             f"{path.name}; keep one")
        files[path.stem] = path
    return files


def _degrade_np(hr: np.ndarray, scale: int, preset, rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
    """(training target, LR) of a uint8 HR: the target is the HR, sharpened if the preset says so."""
    gen = torch.Generator().manual_seed(rng.getrandbits(62))
    target = ground_truth(image_tensor(hr)[None], preset)
    lr = degrade(target, scale, preset, gen)[0]
    if get_preset(preset).usm_gt:
        hr = (target[0].permute(1, 2, 0) * 255).round().byte().numpy()
    return hr, (lr.permute(1, 2, 0) * 255).round().byte().numpy()


def _crop_hr(hr, mask, crop, rng, name):
    h, w = hr.shape[:2]
    if h < crop or w < crop:
        raise ValueError(f"{name}: HR image {w}x{h} is smaller than the crop {crop}x{crop}")
    y, x = rng.randint(0, h - crop), rng.randint(0, w - crop)
    return hr[y:y + crop, x:x + crop], mask[y:y + crop, x:x + crop]


def _fit_to_grid(a: np.ndarray, scale: int) -> np.ndarray:
    """A whole HR image (or mask) trimmed at the bottom and right to a multiple of LATENT_FACTOR x scale,
    the rule data.crop follows: its LR then covers whole latent cells."""
    m = LATENT_FACTOR * scale
    h, w = a.shape[:2]
    return a[: h - h % m, : w - w % m]


def _fit_pair_to_grid(lr: np.ndarray, hr: np.ndarray, mask: np.ndarray, scale: int):
    """A whole LR image and its HR (exactly `scale` times its size; 1: an LR upscaled to the HR size)
    trimmed to a multiple of LATENT_FACTOR LR pixels."""
    h, w = lr.shape[:2]
    h, w = h - h % LATENT_FACTOR, w - w % LATENT_FACTOR
    return lr[:h, :w], hr[:h * scale, :w * scale], mask[:h * scale, :w * scale]


def _mask_for_hr(mask_file: Path, hr_file: Path, w: int, h: int) -> np.ndarray:
    """The mask of a ``w`` x ``h`` HR, resized (nearest) to it when it has the HR's aspect ratio within
    rounding (a mask saved at another resolution); a mask of another shape is refused, not stretched."""
    mask = load_mask(mask_file)
    mh, mw = mask.shape
    if (mw, mh) == (w, h):
        return mask
    if abs(mw * h - mh * w) > max(w, h):
        sideways = abs(mw * w - mh * h) <= max(w, h)
        hint = ("; it is the HR turned sideways: likely an EXIF orientation one of them was saved with, "
                "so save the mask upright as the HR displays" if sideways else "; is it the mask of another image?")
        raise ValueError(f"mask {mask_file} is {mw}x{mh}, HR {hr_file} is {w}x{h}: a different aspect ratio{hint}")
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 0


def _is_fraction_of(lr: np.ndarray, hr: np.ndarray, scale: int) -> bool:
    """Whether an LR is ``1/scale`` of its HR, rounded down or up on each side (`_match_lr_to_hr` pairs them)."""
    return all(abs(n * scale - m) < scale for n, m in zip(lr.shape[:2], hr.shape[:2]))


def _match_lr_to_hr(lr: np.ndarray, hr: np.ndarray, mask: np.ndarray, scale: int):
    """An LR of floor or ceil(HR / scale) per side and its HR, trimmed at the bottom and right to the
    pixels both cover: the HR (and mask) to ``scale`` x the LR, or the LR by its one extra pixel."""
    h, w = min(lr.shape[0], hr.shape[0] // scale), min(lr.shape[1], hr.shape[1] // scale)
    return lr[:h, :w], hr[:h * scale, :w * scale], mask[:h * scale, :w * scale]


def _downscale_registered_lr(lr: np.ndarray, hr: np.ndarray, mask: np.ndarray, scale: int):
    """An LR registered to its HR at (about) the HR size, made ``1/scale`` of it: all three trimmed at the
    bottom and right to the pixels both cover, rounded down to a multiple of ``scale``, then the LR resized
    (bicubic, antialiased) by exactly ``1/scale``, so LR pixel (i, j) is HR block (scale*i.., scale*j..)."""
    h, w = min(lr.shape[0], hr.shape[0]), min(lr.shape[1], hr.shape[1])
    h, w = h - h % scale, w - w % scale
    small = Image.fromarray(lr[:h, :w]).resize((w // scale, h // scale), Image.BICUBIC)
    return np.asarray(small), hr[:h, :w], mask[:h, :w]


def model_input(lr: torch.Tensor, hr_size: tuple[int, int], scale: int) -> torch.Tensor:
    """The model's input for a batch's LR [B, C, h, w]: its bicubic upscale, or the LR itself when a
    dataset gave it already upscaled to the HR size (the release's sr_bicubic/)."""
    return lr if tuple(lr.shape[-2:]) == tuple(hr_size) else upscale_canvas(lr, scale, lr.device)


class TripletFolderDataset(Dataset):
    """``root/hr``, ``root/mask`` and optionally ``root/lr`` with matching file stems (other names with
    ``hr_dir`` / ``lr_dir`` / ``mask_dir``: the authors' FTSR release is gt/, sr_bicubic/, mask/).

    Without ``lr/`` the LR is degraded on the fly from the (cropped) HR with ``preset``. LR files are
    ``1/scale`` of the HR size (rounded down or up per side: the pair is then trimmed to the pixels both
    cover, `_match_lr_to_hr`), or the HR size: an LR already upscaled to it (the release's
    ``sr_bicubic/``), which is then the model's input as it is (`model_input`).
    """

    def __init__(self, root: str | os.PathLike, crop: int | None = None, scale: int = 4,
                 preset: str | DegradationPreset = FTSR_RELEASE, seed: int | None = None,
                 hr_dir: str = "hr", lr_dir: str | None = "lr", mask_dir: str = "mask"):
        _check_crop(crop, scale)
        self.root, self.crop, self.scale, self.preset, self.seed = Path(root), crop, scale, preset, seed
        hr_path, mask_path = self.root / hr_dir, self.root / mask_dir
        lr_path = self.root / lr_dir if lr_dir is not None else None
        for folder in (hr_path, mask_path):
            if not folder.is_dir():
                ftsr = all((self.root / d).is_dir() for d in ("gt", "sr_bicubic", "mask"))
                optional = f" and optionally {lr_dir}/" if lr_dir else ""
                raise FileNotFoundError(f"missing folder {folder} (expected {hr_dir}/, {mask_dir}/{optional} "
                                        f"under {self.root})"
                                        + ("; it holds the authors' FTSR layout: set data.hr_dir: gt and "
                                           "data.lr_dir: sr_bicubic" if ftsr else ""))
        if lr_path is not None and lr_dir != "lr" and not lr_path.is_dir():  # named on purpose: a typo?
            raise FileNotFoundError(f"missing LR folder {lr_path} (data.lr_dir); set data.lr_dir: null to degrade "
                                    "the HR on the fly instead")
        hrs, masks = _files_by_stem(hr_path), _files_by_stem(mask_path)
        lrs = _files_by_stem(lr_path) if lr_path is not None and lr_path.is_dir() else None
        if not hrs:
            raise FileNotFoundError(f"no images in {hr_path}")
        self.items = []
        for stem in sorted(hrs):
            if stem not in masks:
                raise FileNotFoundError(f"no mask for {hrs[stem]} in {mask_path}")
            if lrs is not None and stem not in lrs:
                raise FileNotFoundError(f"no LR image for {hrs[stem]} in {lr_path}")
            self.items.append((stem, hrs[stem], masks[stem], lrs[stem] if lrs is not None else None))
        self.lr_source = None if lrs is not None else ("data.lr_dir: null" if lr_dir is None else f"no {lr_dir}/ folder")
        if note := self.degradation_note():
            log.info(note)

    def degradation_note(self) -> str | None:
        """The one line saying that this set has no LR folder, so its LR is degraded on the fly, and with
        which preset; None when the LR images are read from a folder."""
        if self.lr_source is None:
            return None
        return (f"{self.root}: {self.lr_source}, so each LR is degraded on the fly from its HR with the "
                f"{get_preset(self.preset).name!r} degradation preset (data.degradation)")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        stem, hr_file, mask_file, lr_file = self.items[index]
        rng = _item_rng(self.seed, index)
        hr = load_rgb(hr_file)
        mask = load_mask(mask_file)
        if mask.shape != hr.shape[:2]:
            raise ValueError(f"mask {mask_file} is {mask.shape[::-1]}, HR {hr_file} is {hr.shape[1::-1]}")
        if lr_file is None:
            if self.crop is not None:
                hr, mask = _crop_hr(hr, mask, self.crop, rng, str(hr_file))
            hr, mask = _fit_to_grid(hr, self.scale), _fit_to_grid(mask, self.scale)
            hr, lr = _degrade_np(hr, self.scale, self.preset, rng)
        else:
            lr = load_rgb(lr_file)
            upscaled = lr.shape[:2] == hr.shape[:2]  # the model's input itself (`model_input`)
            if not upscaled:
                if not _is_fraction_of(lr, hr, self.scale):
                    raise ValueError(f"LR {lr_file} is {lr.shape[1]}x{lr.shape[0]}; expected 1/{self.scale} "
                                     f"of HR {hr_file} ({hr.shape[1]}x{hr.shape[0]}), or the HR size (an LR "
                                     "already upscaled to it)")
                lr, hr, mask = _match_lr_to_hr(lr, hr, mask, self.scale)  # floor or ceil of HR/scale
            step = 1 if upscaled else self.scale
            if self.crop is not None:
                lr, hr, mask = aligned_crop(lr, hr, mask, self.crop, step, rng, str(hr_file))
            else:
                lr, hr, mask = _fit_pair_to_grid(lr, hr, mask, step)
        return {"lr": image_tensor(lr), "hr": image_tensor(hr), "mask": mask_tensor(mask), "name": stem}


def read_list_file(path: Path) -> list[str]:
    """The entries of a Real-CE list file (also `evaluate --list`): UTF-8 (with or without a Notepad BOM),
    one per line, blank lines skipped, Windows backslashes turned to "/"."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"Real-CE list file {path} is not UTF-8 text (UTF-16?); save it as UTF-8") from None
    return [line.strip().replace("\\", "/") for line in text.splitlines() if line.strip()]


class RealCEDataset(Dataset):
    """Real-CE pairs named in ``list_file`` (one file name per line; the stem is used).

    Real-CE stores the 13 mm LR registered to the 52 mm HR at the same size; such LR images are
    resized to ``1/scale`` (bicubic, antialiased; `_downscale_registered_lr`, after trimming the pair to a
    multiple of ``scale``) so every dataset has the same geometry. LR images
    already at ``1/scale`` are used as they are. ``mask_dir=None`` gives all-zero masks (no text
    supervision: only for evaluation or image-only losses).
    """

    def __init__(self, root: str | os.PathLike, list_file: str | os.PathLike,
                 lr_dir: str = "13mm_aligned_1024", hr_dir: str = "52mm_aligned_1024",
                 mask_dir: str | None = "mask-52mm-bts-1024-v2", crop: int | None = None, scale: int = 4,
                 seed: int | None = None):
        _check_crop(crop, scale)
        self.root, self.crop, self.scale, self.seed = Path(root), crop, scale, seed
        list_path = Path(list_file)
        if not list_path.is_absolute() and not list_path.is_file():
            list_path = self.root / list_path
        if not list_path.is_file():
            raise FileNotFoundError(f"Real-CE list file not found: {list_file} (also tried {list_path})")
        names = read_list_file(list_path)
        folders = {"lr": self.root / lr_dir, "hr": self.root / hr_dir}
        if mask_dir is not None:
            folders["mask"] = self.root / mask_dir
        by_stem = {}
        for key, folder in folders.items():
            if not folder.is_dir():
                hint = "; a set without text masks: data.mask_dir: null" if key == "mask" else ""
                raise FileNotFoundError(f"missing Real-CE folder {folder} (data.{key}_dir){hint}")
            by_stem[key] = _files_by_stem(folder)
        self.items = []
        for name in names:
            stem = Path(name).stem
            files = {}
            for key, folder in folders.items():
                if stem not in by_stem[key]:
                    raise FileNotFoundError(f"{name} (from {list_path}) has no image in {folder}")
                files[key] = by_stem[key][stem]
            self.items.append((stem, files))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        stem, files = self.items[index]
        hr = load_rgb(files["hr"])
        h, w = hr.shape[:2]
        mask = _mask_for_hr(files["mask"], files["hr"], w, h) if "mask" in files else np.zeros((h, w), bool)
        lr = load_rgb(files["lr"])
        if _is_fraction_of(lr, hr, self.scale):
            lr, hr, mask = _match_lr_to_hr(lr, hr, mask, self.scale)
        elif abs(lr.shape[0] - h) <= self.scale and abs(lr.shape[1] - w) <= self.scale:
            lr, hr, mask = _downscale_registered_lr(lr, hr, mask, self.scale)
        else:
            raise ValueError(f"LR {files['lr']} ({lr.shape[1]}x{lr.shape[0]}) matches neither the HR "
                             f"{files['hr']} size ({w}x{h}) nor 1/{self.scale} of it")
        if self.crop is not None:
            lr, hr, mask = aligned_crop(lr, hr, mask, self.crop, self.scale, _item_rng(self.seed, index),
                                        str(files["hr"]))
        else:
            lr, hr, mask = _fit_pair_to_grid(lr, hr, mask, self.scale)
        return {"lr": image_tensor(lr), "hr": image_tensor(hr), "mask": mask_tensor(mask), "name": stem}


def named_by_key(read, folder, key: str):
    """`read(folder)`, a missing folder's FileNotFoundError ending with the config `key` that named it."""
    try:
        return read(folder)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} ({key})") from None


class OnTheFlySynthesisDataset(Dataset):
    """FTSR-style samples synthesised per item: item ``i`` of epoch ``e`` is fixed by (seed, e, i).

    ``backgrounds``: a folder or a list of image files. ``fonts``: None (system fonts), a folder or a
    list of ``FontSpec``. ``text_crops``: None, a folder (TextSeg/BTS/CTR layout) or (image, mask) pairs.
    """

    def __init__(self, backgrounds: str | os.PathLike | Sequence[str | os.PathLike],
                 fonts: str | os.PathLike | Sequence[FontSpec] | None = None,
                 text_crops: str | os.PathLike | Sequence[tuple] | None = None, length: int = 1000,
                 size: int = 512, scale: int = 4, preset: str | DegradationPreset = FTSR_RELEASE,
                 seed: int = 0, config: SynthesisConfig | None = None, has_text=None):
        if isinstance(backgrounds, (str, os.PathLike)):
            folder, backgrounds = backgrounds, named_by_key(list_images, backgrounds, "data.backgrounds")
            if not backgrounds:
                raise ValueError(f"no background images in {folder} (data.backgrounds): put .png / .jpg photos "
                                 f"without text there, or use 'skimage'")
        if fonts is None:
            fonts = system_fonts()
        elif isinstance(fonts, (str, os.PathLike)):
            fonts = named_by_key(fonts_in_folder, fonts, "data.fonts")
        if isinstance(text_crops, (str, os.PathLike)):
            text_crops = named_by_key(find_text_crops, text_crops, "data.text_crops")
        config = config or SynthesisConfig(size=size, scale=scale)
        try:
            self.synth = TextSynthesizer(backgrounds, fonts, text_crops or (), config, preset, has_text)
        except ValueError as e:
            if fonts or text_crops:
                raise
            raise ValueError(f"{e} (data.fonts, data.text_crops)") from None
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Draw a fresh set of samples (call before each epoch for new data every epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        s = self.synth.sample(sample_seed(self.seed, self.epoch, index))
        return {"lr": image_tensor(s.lr), "hr": image_tensor(s.hr), "mask": mask_tensor(s.mask),
                "name": f"synth_{self.epoch}_{index:06d}"}
