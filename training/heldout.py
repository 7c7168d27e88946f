"""The held-out test of the demo model: a fixed set of synthesised text scenes and one score table.

    python -m training.heldout make DIR [--count 60] [--seed 20261130] [--size 256]
    python -m training.heldout score DIR [--model demo] [--model RUN_DIR ...]
                                     [--color-fix none --color-fix wavelet]
                                     [--json OUT] [--no-ocr]
    python -m training.heldout demo-inputs DIR       # the LR inputs `make demo` ships
    python -m training.heldout mask-reference DIR    # the mask F1 of the ground truth grown by 1-3 px

`make` writes DIR/{hr,lr,mask}/NNNNNN.png, replacing a set it wrote there before: FTSR-style text
(Latin and CJK, horizontal and vertical) on scikit-image's sample photos, x4 Real-ESRGAN-mild
degradation, text 13-38 HR px tall as in the demo's training data. Its seed is disjoint from every
training seed, so no scene was trained on (the 12 background photos are shared: they are all there
is offline). The text is drawn in the fonts of `HELDOUT_FONTS` alone; DIR/heldout.json records the font
files used and the families missing, and both `make` and `score` warn when a family was missing: such a
set is not the one the model cards' figures are of.

`score` reports, per row: PSNR, SSIM, LPIPS (alex), OCR-A (rapidocr) against the HR image, and the
text mask's IoU and F1 at threshold 0.5, pooled over all pixels of the set, and its AUROC (every
4th pixel: how well the mask ranks text above background, whatever the threshold), and the same
AUROC for the text-attention heat map (`--attention`). Rows: plain bicubic,
each `--model`, and `tiny-random` (the random tiny model of `make-tiny`, what a newcomer used to run).

`mask-reference` scores the ground-truth mask itself grown by 1, 2 and 3 px (every pixel within that
distance, diagonals included): how close to the glyph outlines a mask must be for a given F1@0.5.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from tadisr_core.color import COLOR_FIXES
from tadisr_core.files import folder_target_problem
from tadisr_core.wording import command_line
from training.evaluate import json_target_problem, tolerant_stdout, write_json

if TYPE_CHECKING:
    from training.metrics import MaskCounts

HELDOUT_SEED = 20261130
DEFAULT_COUNT = 60
DEFAULT_SIZE = 256
FONT_SCALE = (0.05, 0.15)   # x 256 px = 13-38 px: the demo config's 0.1-0.3 x 128 px
PRESET = "realesrgan-mild"
# The font families the model cards' held-out set was drawn with, and the Debian packages that hold them
# (synthesis' other families, when installed, would make another set from the same seed).
HELDOUT_FONTS = {"DejaVu Sans": "fonts-dejavu-core", "DejaVu Serif": "fonts-dejavu-core",
                 "DejaVu Sans Mono": "fonts-dejavu-core", "Noto Sans CJK SC": "fonts-noto-cjk",
                 "Noto Serif CJK SC": "fonts-noto-cjk"}
SET_RECORD = "heldout.json"  # in the set's folder: its settings, the font files it was drawn with, those missing


def make_set(out: Path, count: int = DEFAULT_COUNT, seed: int = HELDOUT_SEED, size: int = DEFAULT_SIZE) -> Path:
    """Write the held-out set (every scene is drawn with text), replacing a set made in `out` before; returns `out`.

    The text is drawn in the `HELDOUT_FONTS` installed; `SET_RECORD` records them, and `missing_fonts_warning`
    says what a missing one means. ValueError for a `size` the synthesis cannot make; FileExistsError when `out`
    holds files it did not write; NotADirectoryError when a file stands where `out` must be a folder.
    """
    from PIL import Image

    from training.builders import write_backgrounds
    from training.data.synthesis import (
        SET_FOLDERS,
        SynthesisConfig,
        TextSynthesizer,
        clear_previous_set,
        list_images,
        sample_seed,
        system_fonts,
    )

    config = SynthesisConfig(size=size, scale=4, font_scale=FONT_SCALE)  # a bad size: said before any file
    if problem := folder_target_problem(out, f"DIR {out}"):
        raise NotADirectoryError(problem)
    if problem := clear_previous_set(out, "DIR"):
        raise FileExistsError(problem)
    (out / SET_RECORD).unlink(missing_ok=True)
    found = {family: system_fonts((family,)) for family in HELDOUT_FONTS}
    backgrounds = write_backgrounds("skimage-all", out / "backgrounds", 4 * size, seed)
    fonts = list(dict.fromkeys(spec for specs in found.values() for spec in specs))  # system_fonts(HELDOUT_FONTS)
    synth = TextSynthesizer(list_images(backgrounds), fonts, (), config, PRESET)
    for sub in SET_FOLDERS:
        (out / sub).mkdir(parents=True, exist_ok=True)
    for i in range(1, count + 1):
        sample = synth.sample(sample_seed(seed, i))
        for sub, arr in (("hr", sample.hr), ("lr", sample.lr), ("mask", sample.mask)):
            Image.fromarray(arr).save(out / sub / f"{i:06d}.png")
    write_json(out / SET_RECORD, {
        "seed": seed, "count": count, "size": size,
        "fonts": [{"family": family, "file": spec.path, "index": spec.index}
                  for family, specs in found.items() for spec in specs],
        "missing_fonts": [family for family, specs in found.items() if not specs]})
    return out


def missing_fonts_warning(folder: Path) -> str | None:
    """What it means that the set in `folder` was drawn without some of `HELDOUT_FONTS` (as its `SET_RECORD`
    says) and what to install; None when none was missing, or for a set made before the record was."""
    from tadisr_core.files import read_json_object

    try:
        missing = read_json_object(folder / SET_RECORD, "").get("missing_fonts") or []
    except (OSError, ValueError):
        return None
    if not missing:
        return None
    packages = " ".join(sorted({HELDOUT_FONTS[family] for family in missing if family in HELDOUT_FONTS}))
    return (f"the set in {folder} was drawn without the fonts {', '.join(missing)} (not installed), so it is not "
            f"the set the model cards' figures are of: install them (Debian: apt-get install {packages}) and "
            f"re-create it with `python -m training.heldout make {folder}`")


DEMO_INPUT_SEED = 77
DEMO_INPUT_SIZE = 384


def make_demo_inputs(out: Path, count: int = 3) -> list[Path]:
    """The small LR inputs `make demo` ships: the text scenes with the most text among 4 x `count`
    (seed disjoint from training and held-out; text 13-38 px at the 4x output) and one photo
    (scikit-image's astronaut at 1/4). NotADirectoryError when a file stands where `out` must be a folder."""
    import skimage.data
    from PIL import Image

    from training.builders import write_backgrounds
    from training.data.synthesis import SynthesisConfig, TextSynthesizer, list_images, sample_seed, system_fonts

    if problem := folder_target_problem(out, f"DIR {out}"):
        raise NotADirectoryError(problem)
    with tempfile.TemporaryDirectory() as tmp:
        backgrounds = write_backgrounds("skimage-all", Path(tmp), 4 * DEMO_INPUT_SIZE, DEMO_INPUT_SEED)
        scale = (FONT_SCALE[0] * DEFAULT_SIZE / DEMO_INPUT_SIZE, FONT_SCALE[1] * DEFAULT_SIZE / DEMO_INPUT_SIZE)
        synth = TextSynthesizer(list_images(backgrounds), system_fonts(), (),
                                SynthesisConfig(size=DEMO_INPUT_SIZE, scale=4, font_scale=scale), PRESET)
        out.mkdir(parents=True, exist_ok=True)
        candidates = [synth.sample(sample_seed(DEMO_INPUT_SEED, i)) for i in range(1, 4 * count + 1)]
        candidates.sort(key=lambda sample: -float(sample.mask.mean()))  # the scenes with the most text
        paths = []
        for i, sample in enumerate(candidates[:count], start=1):
            path = out / f"text_scene_{i}.png"
            Image.fromarray(sample.lr).save(path, optimize=True)
            paths.append(path)
        photo = Image.fromarray(skimage.data.astronaut())  # whole: the backgrounds leave out its text
        photo = photo.resize((photo.width // 4, photo.height // 4), Image.BICUBIC)
        path = out / "photo_astronaut.png"
        photo.save(path, optimize=True)
    return paths + [path]


def load_set(folder: Path) -> list[dict]:
    """The set's items: name, lr and hr as uint8 RGB arrays, mask as float 0 or 1, read as the trainer
    reads them (16-bit and EXIF as the user sees them, a mask drawn as opacity by its alpha)."""
    from tadisr_core.images import ImageReadError, load_rgb_uint8
    from training.data.synthesis import load_mask

    items = []
    for hr_path in sorted((folder / "hr").glob("*.png")):
        try:
            items.append({"name": hr_path.stem, "lr": load_rgb_uint8(folder / "lr" / hr_path.name),
                          "hr": load_rgb_uint8(hr_path),
                          "mask": load_mask(folder / "mask" / hr_path.name).astype(np.float32)})
        except ImageReadError as e:  # a file missing or damaged: the set is not as `make` wrote it
            raise ImageReadError(f"{e}; re-create the set with `python -m training.heldout make {folder}`") from None
    if not items:
        raise FileNotFoundError(f"{folder}/hr holds no .png files: create the set with "
                                f"`python -m training.heldout make {folder}`")
    return items


def check_sizes(items: list[dict], folder: Path) -> None:
    """ValueError naming the first scene whose LR is not a quarter of its HR, or whose mask is not the HR's size."""
    for item in items:
        (h, w), (lh, lw), (mh, mw) = item["hr"].shape[:2], item["lr"].shape[:2], item["mask"].shape
        if (4 * lh, 4 * lw) != (h, w) or (mh, mw) != (h, w):
            raise ValueError(f"scene {item['name']} of {folder}: hr {w}x{h}, lr {lw}x{lh}, mask {mw}x{mh}; the LR "
                             f"must be a quarter of the HR and the mask its size: re-create the set with "
                             f"`python -m training.heldout make {folder}`")


def _tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img.astype(np.float32) / 255.0).permute(2, 0, 1)[None]


def _uint8(x: torch.Tensor) -> np.ndarray:
    return (x[0, :3].clamp(0, 1).permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)


def bicubic(lr: torch.Tensor) -> tuple[torch.Tensor, None, None]:
    """The baseline row: bicubic x4, no mask, no heat map."""
    from tadisr_core.pipeline import upscale_canvas

    return upscale_canvas(lr, 4), None, None


def model_runner(model, tile: int = 256, overlap: int = 64, color_fix: str = "none"):
    """A row function that upscales with a TADiSR model (mask and heat map included)."""
    from tadisr_core.pipeline import upscale

    def run(lr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = upscale(model, lr, 4, tile=tile, overlap=overlap, tile_batch=1, color_fix=color_fix, attention=True)
        return out.image, out.mask, out.attention
    return run


def tiny_random_model(workdir: Path):
    """The random tiny model newcomers ran before the demo existed (make-tiny, paper variant)."""
    from tadisr_core.loading import load_tadisr
    from tadisr_core.spec import tiny_spec
    from tadisr_core.testing import make_tiny

    paths = make_tiny(workdir, tiny_spec("paper"))
    return load_tadisr(paths["kolors"], paths["checkpoint"], paths["prompt_cache"])


def score(items: list[dict], run, lpips_model=None, ocr_engine=None) -> dict:
    """Mean PSNR / SSIM / LPIPS / OCR-A, pooled mask IoU / F1, and the AUROC of the mask and of the heat
    map of one row function over the set."""
    from training.evaluate import evaluate_pair, mean_of
    from training.metrics import MaskCounts, OCRAResult, auroc, mask_counts, summarize_ocr

    rows, counts, probs, heats, truths = [], MaskCounts(), [], [], []
    for item in items:
        with torch.inference_mode():
            sr, mask, heat = run(_tensor(item["lr"]))
        row = evaluate_pair(_uint8(sr), item["hr"], lpips_model=lpips_model, ocr_engine=ocr_engine,
                            y_channel=False, crop_border=0, device=torch.device("cpu"))
        if mask is not None:
            counts = counts + mask_counts(mask[0, 0].numpy(), item["mask"])
            probs.append(mask[0, 0, ::2, ::2].flatten())  # every 4th pixel keeps the ranking cheap
            truths.append(torch.from_numpy(item["mask"][::2, ::2].copy()).flatten())
        if heat is not None:
            heats.append(heat[0, 0, ::2, ::2].flatten())
        rows.append(row)
    out = {"n": len(rows), **{k: mean_of(rows, k) for k in ("psnr", "ssim")}}
    if lpips_model is not None:
        out["lpips"] = mean_of(rows, "lpips")
        out["lpips_n"] = sum(r["lpips"] is not None for r in rows)
    if ocr_engine is not None:
        out.update(summarize_ocr([OCRAResult(r["ocr_a"], r.get("ocr_boxes", [])) for r in rows]))
    out["mask_iou"] = counts.iou if mask is not None else None
    out["mask_f1"] = counts.f1 if mask is not None else None
    out["mask_auroc"] = auroc(torch.cat(probs), torch.cat(truths)) if mask is not None else None
    out["heat_auroc"] = auroc(torch.cat(heats), torch.cat(truths)) if heat is not None else None
    return out


def grown_truth_counts(items: list[dict], pixels: int) -> MaskCounts:
    """Pooled mask counts of each item's ground truth grown by `pixels` (a square of side
    2 * pixels + 1 around every text pixel) against the ground truth itself."""
    from tadisr_core.composite import grow
    from training.metrics import MaskCounts, mask_counts

    counts = MaskCounts()
    for item in items:
        truth = (torch.from_numpy(item["mask"]) > 0.5).float()[None, None]
        counts = counts + mask_counts(grow(truth, pixels)[0, 0], truth[0, 0])
    return counts


def run_score(folder: Path, models: list[str], ocr: bool = True, lpips: bool = True,
              color_fixes: tuple[str, ...] = ("none",)) -> dict:
    """The whole table: bicubic, each model reference (a row per colour fix of its output), and the
    random tiny model. A model reference that names no model is said before any scoring."""
    from tadisr_core.model_ref import load_model, resolve_model

    for ref in models:
        resolve_model(ref)
    items = load_set(folder)
    check_sizes(items, folder)
    lpips_model = None
    if lpips:
        from training.lpips import LPIPS

        lpips_model = LPIPS("alex")
    engine = None
    if ocr:
        from training.ocr import OCREngine

        engine = OCREngine("rapidocr")
        engine.load()
    table = {"bicubic": score(items, bicubic, lpips_model, engine)}
    for ref in models:
        model = load_model(ref)
        for fix in color_fixes:
            name = ref if fix == "none" else f"{ref}, --color-fix {fix}"
            table[name] = score(items, model_runner(model, color_fix=fix), lpips_model, engine)
    with tempfile.TemporaryDirectory() as tmp:
        table["tiny-random"] = score(items, model_runner(tiny_random_model(Path(tmp))), lpips_model, engine)
    return {"set": str(folder), "n": len(items), "rows": table}


def format_table(report: dict) -> str:
    """A Markdown table of the report's rows."""
    cols = [("psnr", "PSNR", ".2f"), ("ssim", "SSIM", ".3f"), ("lpips", "LPIPS", ".3f"), ("ocr_a", "OCR-A", ".3f"),
            ("mask_iou", "mask IoU@0.5", ".3f"), ("mask_f1", "mask F1@0.5", ".3f"), ("mask_auroc", "mask AUROC", ".3f"),
            ("heat_auroc", "heat-map AUROC", ".3f")]
    lines = ["| model | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in report["rows"].items():
        cells = [("-" if row.get(k) is None else format(row[k], f)) for k, _, f in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    small = {(row["lpips_n"], row["n"]) for row in report["rows"].values() if row.get("lpips_n", row["n"]) < row["n"]}
    for scored, n in sorted(small):
        lines.append(f"\nLPIPS: the mean over the {scored} of {n} scenes large enough for its backbone.")
    read = {(row["ocr_images"], row["n"]) for row in report["rows"].values() if "ocr_images" in row}
    for scored, n in sorted(read):  # one set: the same scenes have ground-truth text for every row
        lines.append(f"\nOCR-A: the mean over the {scored} of {n} scenes whose ground truth holds text the "
                     f"detector finds.")
    return "\n".join(lines)


@command_line()
def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    p = argparse.ArgumentParser(prog="python -m training.heldout", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    mk = sub.add_parser("make", help="write the held-out set")
    mk.add_argument("dir", type=Path)
    mk.add_argument("--count", type=int, default=DEFAULT_COUNT)
    mk.add_argument("--seed", type=int, default=HELDOUT_SEED)
    mk.add_argument("--size", type=int, default=DEFAULT_SIZE)
    di = sub.add_parser("demo-inputs", help="write the LR inputs `make demo` ships")
    di.add_argument("dir", type=Path)
    mr = sub.add_parser("mask-reference", help="the mask F1 of the ground truth grown by 1-3 px")
    mr.add_argument("dir", type=Path)
    sc = sub.add_parser("score", help="score bicubic, the given models and the random tiny model")
    sc.add_argument("dir", type=Path)
    sc.add_argument("--model", action="append", default=[],
                    help="demo, demo-release, a run folder, one of its step folders or a checkpoint (repeatable)")
    sc.add_argument("--color-fix", choices=COLOR_FIXES, action="append",
                    help="a row per model with the CLI's colour fix of its output (wavelet: the input's "
                         "colours; repeatable; default: none)")
    sc.add_argument("--json", type=Path, help="also write the report here")
    sc.add_argument("--no-ocr", action="store_true")
    sc.add_argument("--no-lpips", action="store_true")
    args = p.parse_args(argv)
    if args.command == "make":
        if args.count < 1:
            mk.error("--count must be at least 1")
        try:
            print(make_set(args.dir, args.count, args.seed, args.size))
            if problem := missing_fonts_warning(args.dir):
                print(f"warning: {problem}", file=sys.stderr)
        except NotADirectoryError as e:  # a file where DIR must be a folder: the message names DIR
            print(f"error: {e}", file=sys.stderr)
            return 2
        except (FileExistsError, ValueError) as e:  # a --size it cannot make; files of another kind in DIR
            print(f"error: cannot make the set in {args.dir}: {e}", file=sys.stderr)
            return 2
        return 0
    if args.command == "demo-inputs":
        try:
            paths = make_demo_inputs(args.dir)
        except NotADirectoryError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for path in paths:
            print(path)
        return 0
    if getattr(args, "json", None) and (problem := json_target_problem(args.json)):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        if args.command == "mask-reference":
            items = load_set(args.dir)
            print("| ground truth grown by | mask IoU@0.5 | mask F1@0.5 |\n|---|---|---|")
            for pixels in (1, 2, 3):
                counts = grown_truth_counts(items, pixels)
                print(f"| {pixels} px | {counts.iou:.3f} | {counts.f1:.3f} |")
            return 0
        if problem := missing_fonts_warning(args.dir):
            print(f"warning: {problem}", file=sys.stderr)
        report = run_score(args.dir, args.model or ["demo"], ocr=not args.no_ocr, lpips=not args.no_lpips,
                           color_fixes=tuple(args.color_fix or ["none"]))
    except (OSError, ValueError, RuntimeError) as e:  # the set's files, a --model, LPIPS weights, OCR backend
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        write_json(args.json, report)
    tolerant_stdout()
    print(format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
