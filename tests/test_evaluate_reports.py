"""`training.evaluate`'s report: written whatever the terminal, setup errors said before the work, pairs it
can score in part (transparency, images under SSIM's window) scored, and failures that say what to do."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.processes import REPO, subprocess_env
from training import evaluate

FAST = ["--no-lpips", "--no-ocr"]


def _photo(seed=0, shape=(24, 32, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _dirs(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    return pred, gt


def _run(pred, gt, tmp_path, *extra) -> tuple[int, dict]:
    out = tmp_path / "report.json"
    rc = evaluate.main(["--pred", str(pred), "--gt", str(gt), "--json", str(out), *FAST, *extra])
    return rc, json.loads(out.read_text(encoding="utf-8"))


@pytest.mark.parametrize("env", [{"PYTHONIOENCODING": "cp1252"},                     # a Windows console
                                 {"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}],  # a C locale
                         ids=["cp1252-stdout", "c-locale"])
def test_the_report_is_written_whatever_the_terminal_can_show(tmp_path, env):
    # defect: the table was printed first (a UnicodeEncodeError on a cp1252 console lost the JSON) and the JSON
    # written in the locale's encoding (ASCII in a C locale: a 0-byte file after all the work)
    pred, gt = _dirs(tmp_path)
    Image.fromarray(_photo()).save(gt / "中文.png")
    Image.fromarray(_photo()).save(pred / "中文_x4.png")
    out = tmp_path / "report.json"
    base = {k: v for k, v in subprocess_env().items() if k not in ("PYTHONIOENCODING", "LC_ALL", "PYTHONUTF8")}
    done = subprocess.run([sys.executable, "-m", "training.evaluate", "--pred", str(pred), "--gt", str(gt),
                           "--json", str(out), *FAST], cwd=REPO, env={**base, **env}, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    report = json.loads(out.read_text(encoding="utf-8"))
    assert [(r["name"], r["psnr"]) for r in report["pairs"]] == [("中文", 100.0)]
    shown = "\\u4e2d\\u6587" if "PYTHONIOENCODING" in env else "中文"  # escaped; a C locale's bytes as they were
    assert done.stdout.decode("utf-8").splitlines()[1].split() == [shown, "100.000", "1.0000", "-", "-", "-"]


def test_the_same_folder_as_pred_and_gt_is_refused(tmp_path, capsys):
    # defect: `--pred x/sr --gt x/sr/../sr` scored every image 100 dB against itself, exit 0
    sr = tmp_path / "x" / "sr"
    sr.mkdir(parents=True)
    Image.fromarray(_photo()).save(sr / "a.png")
    same = tmp_path / "x" / "sr" / ".." / "sr"
    assert evaluate.main(["--pred", str(sr), "--gt", str(same), "--json", str(tmp_path / "r.json"), *FAST]) == 2
    assert capsys.readouterr().err == (f"error: --pred {sr} and --gt {same} are the same folder: give the "
                                       f"super-resolved images as --pred and the ground truth as --gt\n")
    assert not (tmp_path / "r.json").exists()


def test_colour_under_transparent_pixels_does_not_count(tmp_path):
    # defect: alpha was dropped, so a prediction identical in every visible pixel scored 8.9 dB
    pred, gt = _dirs(tmp_path)
    truth = _photo(0, (24, 32, 4))
    truth[..., 3] = 255
    truth[:12, :, 3] = 0                                      # the top half fully transparent
    truth[12:14, :, 3] = 128                                  # two rows half
    hidden = truth.copy()
    hidden[:12, :, :3] = _photo(1, (12, 32, 3))               # other colour where nothing shows
    Image.fromarray(truth).save(gt / "a.png")
    Image.fromarray(hidden).save(pred / "a.png")
    over_white = evaluate.load_rgb(gt / "a.png")
    assert (over_white[:12] == 255).all()
    assert np.array_equal(over_white[14:], truth[14:, :, :3])
    Image.fromarray(over_white).save(pred / "b.png")          # the ground truth as shown, without alpha
    Image.fromarray(truth).save(gt / "b.png")
    seen = hidden.copy()
    seen[20, 5, 0] ^= 0xFF                                    # one visible value changed
    Image.fromarray(seen).save(pred / "c.png")
    Image.fromarray(truth).save(gt / "c.png")
    rc, report = _run(pred, gt, tmp_path)
    assert rc == 0 and [(r["name"], r["psnr"]) for r in report["pairs"][:2]] == [("a", 100.0), ("b", 100.0)]
    diff = abs(int(seen[20, 5, 0]) - int(truth[20, 5, 0])) / 255
    assert report["pairs"][2]["psnr"] == pytest.approx(10 * math.log10(24 * 32 * 3 / diff ** 2), abs=1e-4)
    assert report["settings"]["transparency"] == "composited over 1 (white)"


def test_missing_fid_weights_are_a_setup_error_before_the_work(tmp_path, capsys):
    # defect: said after every metric, as "not a loadable TorchScript module (ValueError)", exit 0
    pred, gt = _dirs(tmp_path)
    for name in ("a", "b"):
        Image.fromarray(_photo(ord(name))).save(gt / f"{name}.png")
        Image.fromarray(_photo(ord(name))).save(pred / f"{name}.png")
    missing = tmp_path / "inception.pt"
    assert evaluate.main(["--pred", str(pred), "--gt", str(gt), "--json", str(tmp_path / "r.json"),
                          "--fid-weights", str(missing), *FAST]) == 2
    assert capsys.readouterr() == ("", f"error: FID weights not found: {missing}\n")
    assert not (tmp_path / "r.json").exists()


def test_images_under_the_ssim_window_get_psnr_and_a_note(tmp_path, capsys):
    # defect: an 8x8 pair failed whole ("a crop border of 0 pixels leaves 8x8 ..."), though PSNR is computable
    pred, gt = _dirs(tmp_path)
    small, large = _photo(3, (8, 8, 3)), _photo(4)
    Image.fromarray(small).save(gt / "small.png")
    Image.fromarray(small // 2).save(pred / "small.png")
    Image.fromarray(large).save(gt / "large.png")
    Image.fromarray(large).save(pred / "large.png")
    rc, report = _run(pred, gt, tmp_path)
    assert rc == 0 and report["failed"] == []
    rows = {r["name"]: r for r in report["pairs"]}
    assert rows["small"]["ssim"] is None and rows["small"]["note"] == "SSIM left out: under 11 px"
    mse = np.mean(((small.astype(float) - small // 2) / 255) ** 2)
    assert rows["small"]["psnr"] == pytest.approx(10 * math.log10(1 / mse), abs=1e-4)
    assert (report["mean"]["ssim"], report["mean"]["ssim_n"], report["mean"]["n"]) == (1.0, 1, 2)
    assert "SSIM over 1 of 2 images; the others are smaller than its 11 px window\n" in capsys.readouterr().out


@pytest.mark.parametrize("pred_shape, why", [
    ((12, 16, 3), "size mismatch: prediction 16x12, ground truth 32x24: the prediction is 1/2 of its size a side "
                  "(upscaled by a factor 2 too small, or --pred holds the low-resolution inputs?); upscale by the "
                  "ground truth's factor"),
    ((96, 128, 3), "size mismatch: prediction 128x96, ground truth 32x24: the prediction is 4 times its size a side "
                   "(upscaled by a factor 4 too large, or --gt holds the low-resolution images?); give the "
                   "high-resolution ground truth as --gt"),
    ((24, 30, 3), "size mismatch: prediction 30x24, ground truth 32x24: each prediction must have its ground "
                  "truth's size")])
def test_a_size_mismatch_says_the_likely_cause(tmp_path, pred_shape, why):
    pred, gt = _dirs(tmp_path)
    Image.fromarray(_photo()).save(gt / "a.png")
    Image.fromarray(_photo(1, pred_shape)).save(pred / "a.png")
    rc, report = _run(pred, gt, tmp_path)
    assert rc == 2 and report["failed"][0]["error"] == f"ValueError: {why}"


def test_files_that_pair_as_one_image_are_named_with_their_folder(tmp_path):
    # defect: "several files share the stem: a.png, a_x4.png" said neither which folder nor what to do
    pred, gt = _dirs(tmp_path)
    Image.fromarray(_photo()).save(gt / "a.png")
    Image.fromarray(_photo()).save(gt / "a.jpg")
    Image.fromarray(_photo()).save(pred / "a.png")
    Image.fromarray(_photo()).save(pred / "a_x4.png")
    Image.fromarray(_photo(5)).save(gt / "b.png")
    Image.fromarray(_photo(5)).save(pred / "b.png")
    rc, report = _run(pred, gt, tmp_path)
    assert rc == 1 and report["failed"] == [{"name": "a", "error": (
        f"several files pair as the one image a: --pred {pred} holds a.png, a_x4.png; --gt {gt} holds a.jpg, a.png; "
        f"keep one of them there (move the others away)")}]


def test_the_table_keeps_its_columns_where_a_figure_is_missing():
    # defect: '-' was printed unpadded, so the columns after it shifted left
    row = {"name": "a", "psnr": 30.0, "ssim": None, "lpips": None}
    report = {"pairs": [row, {**row, "name": "b", "ssim": 0.5, "lpips": 0.25}],
              "mean": {"n": 2, "psnr": 30.0, "ssim": 0.5, "lpips": 0.25, "ssim_n": 1, "lpips_n": 1},
              "fid": {"skipped": "x"}, "failed": [], "unmatched": {"pred_only": [], "gt_only": []}}
    out = io.StringIO()
    evaluate.print_table(report, out)
    assert out.getvalue().splitlines()[:4] == [
        "image      PSNR    SSIM   LPIPS   OCR-A  boxes",
        "a        30.000       -       -       -  -",
        "b        30.000  0.5000  0.2500       -  -",
        "MEAN     30.000  0.5000  0.2500       -  -"]


def test_a_name_that_is_not_utf8_leaves_the_report_valid_json(tmp_path):
    """Review: a file name of bytes that are not UTF-8 (b'\\xffimg.png') was written back as its raw byte, so the
    report was not valid UTF-8 JSON. It is now an escape JSON readers take."""
    name = b"\xffimg".decode("utf-8", "surrogateescape")
    evaluate.write_json(tmp_path / "r.json", {"pairs": [{"name": name, "psnr": 30.0}]})
    assert json.loads((tmp_path / "r.json").read_bytes().decode("utf-8"))["pairs"][0]["name"] == "\udcffimg"
    evaluate.write_json(tmp_path / "u.json", {"name": "中文".encode().decode("ascii", "surrogateescape")})
    assert json.loads((tmp_path / "u.json").read_text(encoding="utf-8"))["name"] == "中文"  # a C locale's UTF-8 name
