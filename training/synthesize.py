"""Write an FTSR-style synthetic training set: ``OUT/{hr,lr,mask}/000001.png`` and ``OUT/manifest.jsonl``.

    python -m training.synthesize --backgrounds DIR --out DIR --count N [--text-crops DIR]
        [--fonts DIR] [--size 512] [--scale 4] [--seed 0] [--preset ftsr|realesrgan|realesrgan-mild|bicubic]
        [--font-scale MIN MAX]
        [--check-backgrounds]

Without ``--fonts`` the system fonts (DejaVu, Liberation, Noto CJK, WenQuanYi) are found with
fontconfig. Sample ``i`` is fully determined by ``--seed`` and ``i``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from tadisr_core.files import folder_target_problem
from tadisr_core.images import ImageReadError
from training import command_name, missing_extras
from training.builders import SKIMAGE_BACKGROUNDS, write_backgrounds
from training.config import font_scale_problem
from training.data.degradation import PRESETS
from training.data.synthesis import (
    SET_FOLDERS,
    SynthesisConfig,
    TextSynthesizer,
    clear_previous_set,
    find_text_crops,
    fonts_in_folder,
    foreign_set_files,
    list_images,
    load_rgb,
    sample_seed,
    small_backgrounds,
    small_backgrounds_warning,
    system_fonts,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=command_name("training.synthesize"), description=__doc__.split("\n")[0])
    p.add_argument("--backgrounds", required=True, type=Path,
                   help="folder of text-free HR photographs, or skimage / skimage-all (scikit-image's samples)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--count", required=True, type=int, help="number of samples")
    p.add_argument("--text-crops", type=Path, help="folder with text crops + masks (TextSeg/BTS/CTR layout)")
    p.add_argument("--fonts", type=Path, help="folder of .ttf/.otf/.ttc fonts (default: system fonts)")
    p.add_argument("--size", type=int, default=512, help="HR crop side in pixels")
    p.add_argument("--scale", type=int, default=4, help="super-resolution factor (LR = size / scale)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--font-scale", type=float, nargs=2, metavar=("MIN", "MAX"),
                   help="font size as a fraction of --size (default 0.04 0.16)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="ftsr", help="degradation preset")
    p.add_argument("--check-backgrounds", action="store_true",
                   help="drop backgrounds in which OCR finds text (needs rapidocr + onnxruntime)")
    return p


def _manifest_line(index_name: str, sample) -> str:
    items = sample.items
    return json.dumps({
        "id": index_name,
        "background": sample.background_file,
        "seed": sample.seed,
        "texts": [it["text"] for it in items],
        "fonts": [it.get("font") for it in items],
        "boxes": [it["box"] for it in items],
        "items": items,
    }, ensure_ascii=False)


def readable_backgrounds(paths: list[Path]) -> tuple[list[Path], list[str]]:
    """(the backgrounds that decode, the reader's message for each one that does not), reading each once,
    so that a damaged file is left out up front rather than failing the run half-way."""
    kept, dropped = [], []
    for path in tqdm(paths, desc="check backgrounds", unit="img", leave=False):
        try:
            load_rgb(path)
        except ImageReadError as e:  # its message names the file and why
            dropped.append(str(e).splitlines()[0])
        else:
            kept.append(path)
    return kept, dropped


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if problem := missing_extras("training.synthesize", "kornia"):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.count < 1:
        parser.error("--count must be at least 1")
    if args.font_scale and (problem := font_scale_problem(args.font_scale)):
        parser.error(f"--font-scale {problem}")
    try:
        config = SynthesisConfig(size=args.size, scale=args.scale,
                                 **({"font_scale": tuple(args.font_scale)} if args.font_scale else {}))
    except ValueError as e:  # checked before any file is written
        parser.error(f"--size / --scale: {e}")
    if problem := folder_target_problem(args.out, f"--out {args.out}"):
        parser.error(problem)
    if problem := foreign_set_files(args.out):  # before the built-in backgrounds are written into it
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if str(args.backgrounds) not in SKIMAGE_BACKGROUNDS and not args.backgrounds.is_dir():
        parser.error(f"--backgrounds {args.backgrounds}: no such folder; give a folder of photos or a built-in set: "
                     f"{', '.join(sorted(SKIMAGE_BACKGROUNDS))}")
    try:
        if str(args.backgrounds) in SKIMAGE_BACKGROUNDS:
            folder = args.out / f"backgrounds_{args.backgrounds}"
            args.backgrounds = write_backgrounds(str(args.backgrounds), folder, 2 * args.size, args.seed)
        own = [(args.out / sub).resolve() for sub in SET_FOLDERS]  # an --out inside --backgrounds: not its own set
        backgrounds = [b for b in list_images(args.backgrounds) if not any(b.resolve().is_relative_to(o) for o in own)]
        crops = find_text_crops(args.text_crops) if args.text_crops else []
        fonts = fonts_in_folder(args.fonts) if args.fonts else system_fonts()
    except FileNotFoundError as e:
        parser.error(str(e))
    if not backgrounds:
        parser.error(f"no images in --backgrounds {args.backgrounds}")
    if not fonts and not crops:
        where = f"in --fonts {args.fonts}" if args.fonts else "on this system (fc-match found none)"
        parser.error(f"no usable fonts {where}: install fonts-dejavu and fonts-noto-cjk, "
                     "pass --fonts DIR, or give --text-crops")
    backgrounds, unreadable = readable_backgrounds(backgrounds)
    if not backgrounds:
        print(f"error: none of the {len(unreadable)} images in --backgrounds {args.backgrounds} can be read",
              file=sys.stderr)
        return 2
    if unreadable:
        print(f"warning: {len(unreadable)} of {len(unreadable) + len(backgrounds)} backgrounds cannot be read and "
              f"are left out:", file=sys.stderr)
        for reason in unreadable:
            print(f"  dropped: {reason}", file=sys.stderr)
    has_text = None
    if args.check_backgrounds:
        from training.ocr import has_text  # lazy: rapidocr is only needed for this flag
    try:
        synth = TextSynthesizer(backgrounds, fonts, crops, config, args.preset, has_text)
    except ValueError as e:
        parser.error(str(e))
    if has_text is not None:
        kept = {str(b) for b in synth.backgrounds}
        dropped = [str(b) for b in backgrounds if str(b) not in kept]
        print(f"{len(synth.backgrounds)} of {len(backgrounds)} backgrounds are text-free", file=sys.stderr)
        for path in dropped:
            print(f"  dropped (OCR found text): {path}", file=sys.stderr)
    if small := small_backgrounds(synth.backgrounds, args.size):
        print(f"warning: {small_backgrounds_warning(small, len(synth.backgrounds), args.size, '--size')}",
              file=sys.stderr)

    if problem := clear_previous_set(args.out):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    for sub in SET_FOLDERS:
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    with open(args.out / "manifest.jsonl", "w", encoding="utf-8") as manifest:
        for i in tqdm(range(1, args.count + 1), desc="synthesize", unit="img"):
            sample = synth.sample(sample_seed(args.seed, i))
            name = f"{i:06d}"
            Image.fromarray(sample.hr).save(args.out / "hr" / f"{name}.png")
            Image.fromarray(sample.lr).save(args.out / "lr" / f"{name}.png")
            Image.fromarray(sample.mask).save(args.out / "mask" / f"{name}.png")
            manifest.write(_manifest_line(name, sample) + "\n")
    print(f"{args.count} scenes written to {args.out}: hr/, lr/ and mask/ (x{args.scale:g}), manifest.jsonl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
