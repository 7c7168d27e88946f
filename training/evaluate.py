"""Evaluate super-resolved images against ground truth: PSNR, SSIM, LPIPS, OCR-A and (optionally) FID.

    python -m training.evaluate --pred DIR --gt DIR [--json OUT] [--y-channel] [--crop-border N]
        [--lpips-net alex|vgg] [--ocr-backend rapidocr|paddleocr] [--no-ocr] [--fid-weights PATH] [--list FILE]

Files are paired by their path below each folder without the extension (``0001.png`` <-> ``0001.jpg``,
``sub/0001.png`` <-> ``sub/0001.png``; sub-folders are searched, hidden ones not); the CLI's outputs pair
too (``0001_x4.png`` <-> ``0001.png``, unless the ground truth has ``0001_x4`` itself; its
``*_text_mask.png`` / ``*_attention.png`` are not predictions and are left out), also those of
``tadisr upscale --recursive`` in the sub-folders it mirrors.
Images are read as the user sees them (EXIF orientation, 16-bit gray and float files at their real range;
Pillow reads 16-bit colour at 8 bits, truncated) by the project's one reader; an image with transparency is
composited over white (`BACKGROUND`), so colour under transparent pixels does not count. A pair that cannot be
evaluated (unreadable image, size mismatch) is reported as failed and the others go on. Ground truth
without a prediction (or a prediction without ground truth) makes the mean a subset's: that is an error
(exit 1) unless ``--allow-partial``. A ground-truth sub-folder the predictions do not have at all
(another method's results kept there) is left out, and named in the report. Images too small for the
LPIPS backbone get no LPIPS, and images under SSIM's 11 px window no SSIM; the report says over how many images
those means are.
``--list FILE`` (a Real-CE list file: one image name per line, read as the training data reads it) keeps
only the images it names, by file stem; a listed name the ground truth lacks is an error.
Exit code: 0 all pairs evaluated, 1 some pair failed or files are unmatched, 2 nothing evaluated (or a
setup error: a missing folder or file, --pred and --gt the same folder).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from tadisr_core.devices import resolve_device
from tadisr_core.files import atomic_path, require_readable, same_file
from tadisr_core.images import load_image, to_uint8, walk_images
from tadisr_core.wording import command_line
from training import command_name, missing_extras
from training.metrics import SSIM_WINDOW

PSNR_CAP = 100.0  # identical images: report 100 dB (as the official metrics code), not inf
FID_NO_WEIGHTS = "no Inception weights supplied (--fid-weights)"
BACKGROUND = 1.0  # what transparent pixels are composited over (white), in prediction and ground truth alike


_CLI_OUTPUT = re.compile(r"^(?P<stem>.+)_x\d+(\.\d+)?$")
_CLI_EXTRAS = ("_text_mask", "_attention")


def prediction_stem(stem: str) -> str | None:
    """The ground-truth stem a prediction file belongs to: ``0001_x4`` -> ``0001``; None for the CLI's
    text masks and heat maps (not predictions); any other stem as it is."""
    if stem.endswith(_CLI_EXTRAS):
        return None
    m = _CLI_OUTPUT.match(stem)
    return m.group("stem") if m else stem


def list_images(folder: Path, exclude: Path | None = None) -> dict[str, list[Path]]:
    """Image files under ``folder`` as `tadisr upscale --recursive` finds them (`images.walk_images`: sub-folders
    and symlinked ones included, hidden names and ``exclude`` left out), grouped by their path relative to
    ``folder`` without the extension (``sub/0001``)."""
    groups: dict[str, list[Path]] = {}
    for p in walk_images(folder, recursive=True, exclude=exclude).files:
        groups.setdefault(p.relative_to(folder).with_suffix("").as_posix(), []).append(p)
    return groups


def _prediction_key(key: str, gt: dict) -> str | None:
    """The ground truth a prediction's key (``sub/0001_x4``) belongs to: its own key when the ground
    truth has it (``sign_x2.png`` predicted for ``sign_x2.png``), else as `prediction_stem` says."""
    if key in gt:
        return key
    parent, _, stem = key.rpartition("/")
    stem = prediction_stem(stem)
    return None if stem is None else f"{parent}/{stem}" if parent else stem


def pair_images(pred_dir: Path, gt_dir: Path):
    """Match files by their path below each folder without the extension (predictions by `_prediction_key`).

    Ground truth in a sub-folder counts only where the predictions have that sub-folder too (so other
    folders kept inside the ground truth, such as another method's results, are not taken for it).

    Returns ``(pairs [(key, pred, gt)], pred_only [keys], gt_only [keys], ambiguous {key: why})``.
    """
    predicted = list_images(pred_dir, exclude=gt_dir)
    folders = {key.rpartition("/")[0] for key in predicted}  # "" is the top level, always compared
    gt = {key: paths for key, paths in list_images(gt_dir, exclude=pred_dir).items()
          if key.rpartition("/")[0] in folders | {""}}
    pred: dict[str, list[Path]] = {}
    for key, paths in predicted.items():
        if (target := _prediction_key(key, gt)) is not None:
            pred.setdefault(target, []).extend(paths)
    pairs, ambiguous = [], {}
    for key in sorted(set(pred) & set(gt)):
        if len(pred[key]) > 1 or len(gt[key]) > 1:
            held = [f"--{flag} {folder} holds {', '.join(p.name for p in paths)}"
                    for flag, folder, paths in (("pred", pred_dir, pred[key]), ("gt", gt_dir, gt[key]))
                    if len(paths) > 1]
            ambiguous[key] = (f"several files pair as the one image {key}: {'; '.join(held)}; keep one of them "
                              f"there (move the others away)")
        else:
            pairs.append((key, pred[key][0], gt[key][0]))
    return pairs, sorted(set(pred) - set(gt)), sorted(set(gt) - set(pred)), ambiguous


def gt_folders_left_out(pred_dir: Path, gt_dir: Path) -> dict[str, int]:
    """The ground truth's sub-folders `pair_images` leaves out (the predictions have no such folder), with
    their image counts: said in the report, so a mean over a subset is never silent."""
    predicted = {key.rpartition("/")[0] for key in list_images(pred_dir, exclude=gt_dir)}
    left: dict[str, int] = {}
    for key in list_images(gt_dir, exclude=pred_dir):
        folder = key.rpartition("/")[0]
        if folder and folder not in predicted:
            left[folder] = left.get(folder, 0) + 1
    return dict(sorted(left.items()))


def nothing_paired_message(pred_dir: Path, gt_dir: Path, pred_only: list[str], gt_only: list[str]) -> str:
    """Why no prediction pairs with a ground truth, and the likely fix: predictions one folder down
    (`--pred out` for `out/tiny/NAME_x4.png`), the two folders swapped, or the naming rule."""
    head = f"nothing to evaluate: no image in --pred {pred_dir} pairs with one in --gt {gt_dir}"
    if not pred_only:
        return f"{head}: --pred holds no predictions (images other than *_text_mask / *_attention)"
    paired = {sub: len(pair_images(sub, gt_dir)[0]) for sub in _sub_folders(pred_dir)
              if not sub.resolve().is_relative_to(gt_dir.resolve())}
    best = max(paired, key=paired.get, default=None)
    if best is not None and paired[best]:
        return (f"{head}; the predictions in its sub-folder {best.name}/ match the ground truth's names: "
                f"give --pred {best}")
    if pair_images(gt_dir, pred_dir)[0]:
        return f"{head}; with the two folders swapped they pair: give the predictions as --pred"
    return (f"{head}: a prediction NAME.png or NAME_x4.png pairs with ground truth NAME.png (any image "
            f"suffix, same sub-folder); predictions {pred_only[:3]}, ground truth {gt_only[:3]}")


def _sub_folders(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def listed_stems(path: Path) -> set[str]:
    """The image stems a list file names (`datasets.read_list_file`: folders and extensions dropped, as
    RealCEDataset reads it); ValueError when it names none."""
    from training.data.datasets import read_list_file

    stems = {Path(name).stem for name in read_list_file(path)}
    if not stems:
        raise ValueError(f"--list {path} names no images: one file name per line")
    return stems


def keep_listed(found: tuple, stems: set[str], gt_dir: Path, list_file: Path) -> tuple:
    """`pair_images`' result limited to the keys whose file stem is in ``stems``; ValueError naming the
    listed stems that no ground truth (in the folders compared) has."""
    pairs, pred_only, gt_only, ambiguous = found

    def stem(key: str) -> str:  # a pairing key is the path below the folder without its extension
        return key.rpartition("/")[2]

    pairs = [p for p in pairs if stem(p[0]) in stems]
    pred_only, gt_only = [k for k in pred_only if stem(k) in stems], [k for k in gt_only if stem(k) in stems]
    ambiguous = {k: why for k, why in ambiguous.items() if stem(k) in stems}
    have = {stem(key) for key in [p[0] for p in pairs] + gt_only + list(ambiguous)}
    if missing := sorted(stems - have):
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"--list {list_file} names {len(missing)} image(s) that --gt {gt_dir} does not hold: "
                         f"{shown}; is it the list of this split?")
    return pairs, pred_only, gt_only, ambiguous


def load_rgb(path: Path) -> np.ndarray:
    """Read an image file as uint8 RGB ``(H, W, 3)`` with the project's reader (gray repeated, transparency
    composited over `BACKGROUND`); raises on unreadable files."""
    from tadisr_core.composite import paste

    x = load_image(path)
    if x.shape[1] == 4:
        x = paste(torch.full_like(x[:, :3], BACKGROUND), x[:, :3], x[:, 3:])
    return to_uint8(x if x.shape[1] == 3 else x.expand(-1, 3, -1, -1))


def size_mismatch(pred: tuple[int, int], gt: tuple[int, int]) -> str:
    """Why a prediction of ``pred`` = (W, H) cannot be scored against ground truth of ``gt``, with the likely
    cause when one is a whole multiple of the other."""
    (pw, ph), (gw, gh) = pred, gt
    head = f"size mismatch: prediction {pw}x{ph}, ground truth {gw}x{gh}"
    for k in range(2, 17):
        if (gw, gh) == (k * pw, k * ph):
            return (f"{head}: the prediction is 1/{k} of its size a side (upscaled by a factor {k} too small, or "
                    f"--pred holds the low-resolution inputs?); upscale by the ground truth's factor")
        if (pw, ph) == (k * gw, k * gh):
            return (f"{head}: the prediction is {k} times its size a side (upscaled by a factor {k} too large, or "
                    f"--gt holds the low-resolution images?); give the high-resolution ground truth as --gt")
    return f"{head}: each prediction must have its ground truth's size"


def evaluate_pair(pred: np.ndarray, gt: np.ndarray, *, lpips_model, ocr_engine, y_channel: bool,
                  crop_border: int, device: torch.device) -> dict:
    """All per-image metrics for one pair of uint8 RGB arrays (OCR-A fields only with an engine)."""
    from training.metrics import ocr_accuracy, psnr, ssim, to_tensor

    if pred.shape != gt.shape:
        raise ValueError(size_mismatch(pred.shape[1::-1], gt.shape[1::-1]))
    x, y = to_tensor(pred), to_tensor(gt)
    row = {"psnr": min(float(psnr(x, y, y_channel, crop_border)[0]), PSNR_CAP)}
    notes = []
    if min(pred.shape[:2]) < SSIM_WINDOW:  # too small for its window: the other metrics still count
        row["ssim"] = None
        notes.append(f"SSIM left out: under {SSIM_WINDOW} px")
    else:
        row["ssim"] = float(ssim(x, y, y_channel, crop_border)[0])
    if lpips_model is not None and min(pred.shape[:2]) < lpips_model.min_side:
        row["lpips"] = None
        notes.append(f"LPIPS left out: under {lpips_model.min_side} px")
    elif lpips_model is not None:
        with torch.inference_mode():
            row["lpips"] = float(lpips_model(x.to(device), y.to(device), normalize=True).flatten()[0])
    if ocr_engine is not None:
        res = ocr_accuracy(pred, gt, ocr_engine)
        row["ocr_a"] = res.score
        row["ocr_boxes"] = res.boxes
    if notes:
        row["note"] = "; ".join(notes)
    return row


# --- FID -----------------------------------------------------------------------------------------------

def load_fid_extractor(path: Path, device: torch.device):
    """Load a TorchScript Inception feature extractor; returns ``(fn, None)`` or ``(None, reason)``.

    ``fn(uint8 (N, 3, H, W)) -> (N, D)``. Accepted: a module taking uint8 images with
    ``return_features=True`` (NVIDIA's ``inception-2015-12-05.pt``), or one taking floats in ``[0, 1]``.
    """
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated, but the published Inception is one
            warnings.simplefilter("ignore", DeprecationWarning)
            model = torch.jit.load(str(path), map_location=device).eval()
    except Exception as e:  # noqa: BLE001 - any failure means "no loader fits"
        return None, (f"{path} is not a loadable TorchScript module ({type(e).__name__}); plain state-dict "
                      "Inception weights are not supported (they need torchvision's InceptionV3)")

    def features(imgs: torch.Tensor) -> torch.Tensor:
        imgs = imgs.to(device)
        with torch.inference_mode():
            try:
                out = model(imgs, return_features=True)
            except Exception:  # noqa: BLE001 - module without that signature
                out = model(imgs.float() / 255.0)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if out.dim() != 2 or out.shape[0] != imgs.shape[0]:
            raise ValueError(f"feature extractor returned shape {tuple(out.shape)}, expected (N, D)")
        return out.double().cpu()

    return features, None


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` and ``b`` (rows = samples)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    # tr sqrt(S1 S2) = sum sqrt(eig(R S2 R)) with R = sqrt(S1): symmetric, so eigh is stable.
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root @ s2 @ root), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross)


def compute_fid(weights: Path | None, pairs, device: torch.device) -> dict:
    """FID between predictions and ground truths of the evaluated pairs, or ``{"skipped": reason}``."""
    if weights is None:
        return {"skipped": FID_NO_WEIGHTS}
    if len(pairs) < 2:
        return {"skipped": "FID needs at least 2 evaluated pairs"}
    fn, reason = load_fid_extractor(weights, device)
    if fn is None:
        return {"skipped": reason}
    try:
        feats = {"pred": [], "gt": []}
        for _, pred_path, gt_path in pairs:
            for key, path in (("pred", pred_path), ("gt", gt_path)):
                img = torch.from_numpy(load_rgb(path)).permute(2, 0, 1)[None]
                feats[key].append(fn(img))
        a, b = (torch.cat(feats[k]).numpy() for k in ("pred", "gt"))
    except Exception as e:  # noqa: BLE001
        return {"skipped": f"feature extraction failed: {type(e).__name__}: {e}"}
    return {"fid": frechet_distance(a, b), "n": len(pairs), "weights": str(weights),
            "note": "computed on full images; FID on few images is strongly biased"}


# --- report --------------------------------------------------------------------------------------------

def mean_of(rows: list[dict], key: str) -> float | None:
    """The mean of `key` over the rows that have it (LPIPS is None for an image too small for its
    backbone); None when none has it."""
    vals = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(vals)) if vals else None


def _fmt(v, spec: str) -> str:
    return "-".rjust(int(spec.partition(".")[0])) if v is None else format(v, spec)  # "-" as wide as a figure


def print_table(report: dict, out=None) -> None:
    """Human-readable summary of a report produced by ``run`` (to ``out``, default stdout)."""
    out = out or sys.stdout
    rows, mean = report["pairs"], report["mean"]
    width = max([len(r["name"]) for r in rows] + [6])
    print(f"{'image':<{width}}  {'PSNR':>7}  {'SSIM':>6}  {'LPIPS':>6}  {'OCR-A':>6}  boxes", file=out)
    for r in rows:
        boxes = len(r["ocr_boxes"]) if "ocr_boxes" in r else "-"
        print(f"{r['name']:<{width}}  {_fmt(r['psnr'], '7.3f')}  {_fmt(r['ssim'], '6.4f')}  "
              f"{_fmt(r.get('lpips'), '6.4f')}  {_fmt(r.get('ocr_a'), '6.4f')}  {boxes}", file=out)
    print(f"{'MEAN':<{width}}  {_fmt(mean['psnr'], '7.3f')}  {_fmt(mean['ssim'], '6.4f')}  "
          f"{_fmt(mean['lpips'], '6.4f')}  {_fmt(mean.get('ocr_a'), '6.4f')}  {mean.get('ocr_boxes', '-')}", file=out)
    if mean["ssim"] is not None and mean.get("ssim_n", mean["n"]) < mean["n"]:
        print(f"SSIM over {mean['ssim_n']} of {mean['n']} images; the others are smaller than its {SSIM_WINDOW} px "
              f"window", file=out)
    if mean["lpips"] is not None and mean.get("lpips_n", mean["n"]) < mean["n"]:
        print(f"LPIPS over {mean['lpips_n']} of {mean['n']} images; the others are too small for its backbone",
              file=out)
    if "ocr_excluded_no_text" in mean:
        print(f"OCR-A over {mean['ocr_images']} images; {mean['ocr_excluded_no_text']} excluded (no GT text)", file=out)
    if listed := report.get("settings", {}).get("list"):
        print(f"limited to the images listed in {listed}", file=out)
    fid = report["fid"]
    print(f"FID: {fid['fid']:.3f}" if "fid" in fid else f"FID: skipped ({fid['skipped']})", file=out)
    um = report["unmatched"]
    if um["pred_only"] or um["gt_only"]:
        print(f"unmatched: pred only {um['pred_only']}, gt only {um['gt_only']}", file=out)
    if left := um.get("gt_folders_left_out"):
        print("left out: ground-truth sub-folders the predictions do not have: "
              + ", ".join(f"{folder}/ ({n} images)" for folder, n in left.items()), file=out)
    for f in report["failed"]:
        print(f"FAILED {f['name']}: {f['error']}", file=out)


def run(args: argparse.Namespace) -> dict:
    """Evaluate all pairs; returns the report dict (also what ``--json`` writes)."""
    device = resolve_device(args.device)  # an unknown or absent device: said before any model loads
    found = pair_images(args.pred, args.gt)
    if args.list is not None:
        found = keep_listed(found, listed_stems(args.list), args.gt, args.list)
    pairs, pred_only, gt_only, ambiguous = found
    if not pairs and not ambiguous:  # said before the LPIPS and OCR models load
        raise ValueError(nothing_paired_message(args.pred, args.gt, pred_only, gt_only))
    lpips_model = None
    if not args.no_lpips:
        from training.lpips import LPIPS

        lpips_model = LPIPS(args.lpips_net, args.lpips_weights, given_as="--lpips-weights",
                            instead="pass --no-lpips").to(device)
    ocr_engine = None
    if not args.no_ocr:
        from training.ocr import OCREngine

        ocr_engine = OCREngine(args.ocr_backend)
        ocr_engine.load()

    rows, failed, ok_pairs = [], [{"name": s, "error": why} for s, why in ambiguous.items()], []
    for stem, pred_path, gt_path in pairs:
        try:
            pred, gt = load_rgb(pred_path), load_rgb(gt_path)
            row = evaluate_pair(pred, gt, lpips_model=lpips_model, ocr_engine=ocr_engine,
                                y_channel=args.y_channel, crop_border=args.crop_border, device=device)
        except Exception as e:  # noqa: BLE001 - a bad pair must not stop the run
            failed.append({"name": stem, "pred": str(pred_path), "gt": str(gt_path),
                           "error": f"{type(e).__name__}: {e}"})
            continue
        rows.append({"name": stem, "pred": str(pred_path), "gt": str(gt_path), **row})
        ok_pairs.append((stem, pred_path, gt_path))

    mean = {"n": len(rows), **{key: mean_of(rows, key) for key in ("psnr", "ssim", "lpips")},
            "ssim_n": sum(r["ssim"] is not None for r in rows),
            "lpips_n": sum(r.get("lpips") is not None for r in rows)}
    if ocr_engine is not None:
        from training.metrics import OCRAResult, summarize_ocr

        mean.update(summarize_ocr([OCRAResult(r["ocr_a"], r["ocr_boxes"]) for r in rows]))
    return {
        "pairs": rows,
        "mean": mean,
        "fid": compute_fid(args.fid_weights, ok_pairs, device),
        "failed": failed,
        "unmatched": {"pred_only": pred_only, "gt_only": gt_only,
                      "gt_folders_left_out": gt_folders_left_out(args.pred, args.gt)},
        "settings": {"pred": str(args.pred), "gt": str(args.gt), "y_channel": args.y_channel,
                     "list": None if args.list is None else str(args.list),
                     "crop_border": args.crop_border, "ssim": f"gaussian {SSIM_WINDOW}, sigma 1.5, valid",
                     "psnr_cap_db": PSNR_CAP, "transparency": f"composited over {BACKGROUND:g} (white)",
                     "lpips_net": None if args.no_lpips else args.lpips_net,
                     "ocr_backend": None if args.no_ocr else args.ocr_backend},
    }


def build_parser() -> argparse.ArgumentParser:
    """The `tadisr-evaluate` command line."""
    ap = argparse.ArgumentParser(prog=command_name("training.evaluate"), description=__doc__.split("\n")[0])
    ap.add_argument("--pred", type=Path, required=True, help="folder of super-resolved images")
    ap.add_argument("--gt", type=Path, required=True, help="folder of ground-truth images")
    ap.add_argument("--json", type=Path, help="write the full report here")
    ap.add_argument("--list", type=Path, metavar="FILE",
                    help="evaluate only the images this list file names (one file name per line, as Real-CE's "
                         "list files; matched by stem)")
    ap.add_argument("--y-channel", action="store_true", help="PSNR/SSIM on BasicSR Y instead of RGB")
    ap.add_argument("--crop-border", type=int, default=0, help="pixels dropped per side for PSNR/SSIM")
    ap.add_argument("--lpips-net", choices=["alex", "vgg"], default="alex")
    ap.add_argument("--lpips-weights", type=Path, help="LPIPS weights file or folder (default: $TADISR_LPIPS_DIR "
                                                       "or ~/.cache/tadisr/lpips)")
    ap.add_argument("--no-lpips", action="store_true")
    ap.add_argument("--ocr-backend", choices=["rapidocr", "paddleocr"], default="rapidocr")
    ap.add_argument("--no-ocr", action="store_true")
    ap.add_argument("--fid-weights", type=Path, help="TorchScript Inception feature extractor (optional)")
    ap.add_argument("--device", help="torch device for LPIPS/FID: auto (default: CUDA if available, else MPS, "
                                     "else the CPU), cpu, cuda, cuda:N or mps")
    ap.add_argument("--allow-partial", action="store_true",
                    help="exit 0 even when some ground truth has no prediction (or the reverse)")
    return ap


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def json_target_problem(path: Path) -> str | None:
    """Why a ``--json`` report cannot be written to ``path`` (checked before the work), or None."""
    from tadisr_core.files import file_target_problem

    return file_target_problem(path, "--json", "report.json")


def write_json(path: Path, report: dict) -> None:
    """Write ``report`` to ``path`` (its folder made) as valid UTF-8 JSON, whole or not at all (`files.atomic_path`):
    NaN and infinities become null."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_json_safe(report), indent=2, ensure_ascii=False) + "\n"
    # a file name a non-UTF-8 locale could not decode goes back to its own bytes when they are UTF-8 (a C locale
    # reading UTF-8 names); names that are not UTF-8 at all stay JSON escapes ("\udcff"), so the file stays valid
    data = text.encode("utf-8", "surrogateescape")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        data = text.encode("utf-8", "backslashreplace")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def tolerant_stdout() -> None:
    """Let a terminal that cannot show a character (Windows' cp1252 console) print it escaped (``\\u4e2d``)
    rather than stop the command with a UnicodeEncodeError (a C locale's surrogateescape is kept: it prints the
    bytes of the file names it could not decode as they are)."""
    if getattr(sys.stdout, "errors", None) == "strict" and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")


@command_line()
def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (0 ok, 1 some pair failed, 2 nothing evaluated)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if problem := missing_extras("training.evaluate", "kornia", *(() if args.no_ocr else ("Levenshtein",))):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.crop_border < 0:
        parser.error(f"--crop-border {args.crop_border}: pixels dropped per side, 0 or more")
    for name in ("pred", "gt"):
        if not getattr(args, name).is_dir():
            print(f"error: --{name} {getattr(args, name)} is not a folder", file=sys.stderr)
            return 2
    if same_file(args.pred, args.gt):
        print(f"error: --pred {args.pred} and --gt {args.gt} are the same folder: give the super-resolved images "
              f"as --pred and the ground truth as --gt", file=sys.stderr)
        return 2
    if args.list is not None and not args.list.is_file():
        print(f"error: --list {args.list} is not a file", file=sys.stderr)
        return 2
    if args.json and (problem := json_target_problem(args.json)):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        if args.fid_weights is not None:
            require_readable(args.fid_weights, "FID weights")
        report = run(args)
    except (OSError, RuntimeError, ValueError) as e:  # FID or LPIPS weights missing or damaged, OCR backend
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:  # first: a table the terminal cannot show must not cost the report
        write_json(args.json, report)
    tolerant_stdout()
    print_table(report)
    if not report["pairs"]:
        print(f"error: none of the {len(report['failed'])} pairs could be evaluated (the FAILED lines say why)",
              file=sys.stderr)
        return 2
    um = report["unmatched"]
    if (um["gt_only"] or um["pred_only"]) and not args.allow_partial:
        n_gt = len(report["pairs"]) + len(report["failed"]) + len(um["gt_only"])
        print(f"error: the mean covers {len(report['pairs'])} of {n_gt} ground-truth images ({len(um['gt_only'])} "
              f"without a prediction, {len(um['pred_only'])} predictions without ground truth); pass "
              f"--allow-partial to accept a subset", file=sys.stderr)
        return 1
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
