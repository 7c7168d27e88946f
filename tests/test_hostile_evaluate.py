"""`training.evaluate` reads images as the user sees them, pairs the CLI's outputs, refuses a partial mean."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from training import evaluate

FAST = ["--no-lpips", "--no-ocr"]


def _photo(seed=0, shape=(24, 32, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _run(pred, gt, tmp_path, *extra) -> tuple[int, dict]:
    out = tmp_path / "report.json"
    rc = evaluate.main(["--pred", str(pred), "--gt", str(gt), "--json", str(out), *FAST, *extra])
    return rc, json.loads(out.read_text())


def _dirs(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    return pred, gt


def test_exif_rotated_ground_truth_scores_as_identical(tmp_path):
    pred, gt = _dirs(tmp_path)
    stored = Image.fromarray(_photo())
    exif = stored.getexif()
    exif[0x0112] = 8                                   # displayed rotated 90 degrees counter-clockwise
    stored.save(gt / "p.png", exif=exif)
    Image.fromarray(np.rot90(_photo()).copy()).save(pred / "p.png")
    rc, report = _run(pred, gt, tmp_path)
    assert rc == 0 and report["pairs"][0]["psnr"] == evaluate.PSNR_CAP


def test_16_bit_gray_ground_truth_is_not_clipped_to_white(tmp_path):
    pred, gt = _dirs(tmp_path)
    gray = _photo(1, (20, 20))
    Image.fromarray(gray.astype(np.uint16) * 257).save(gt / "g.png")      # 16-bit version of the same image
    Image.fromarray(np.repeat(gray[..., None], 3, axis=2)).save(pred / "g.png")
    rc, report = _run(pred, gt, tmp_path)
    assert rc == 0 and report["pairs"][0]["psnr"] == evaluate.PSNR_CAP


def test_cli_outputs_pair_with_their_ground_truth(tmp_path):
    pred, gt = _dirs(tmp_path)
    for name in ("a", "b"):
        img = _photo(ord(name))
        Image.fromarray(img).save(gt / f"{name}.png")
        Image.fromarray(img).save(pred / f"{name}_x4.png")
        Image.fromarray(img[..., 0]).save(pred / f"{name}_text_mask.png")
    Image.fromarray(_photo(9)).save(pred / "a_attention.png")
    rc, report = _run(pred, gt, tmp_path)
    assert rc == 0 and [(r["name"], r["psnr"]) for r in report["pairs"]] == [("a", 100.0), ("b", 100.0)]
    assert report["unmatched"] == {"pred_only": [], "gt_only": [], "gt_folders_left_out": {}}
    assert evaluate.prediction_stem("scan_2_x2.5") == "scan_2" and evaluate.prediction_stem("x4") == "x4"


def test_a_mean_over_part_of_the_ground_truth_is_refused(tmp_path, capsys):
    pred, gt = _dirs(tmp_path)
    for i in range(10):
        Image.fromarray(_photo(i)).save(gt / f"{i}.png")
    Image.fromarray(_photo(0)).save(pred / "0.png")
    rc, report = _run(pred, gt, tmp_path)
    assert rc == 1 and len(report["unmatched"]["gt_only"]) == 9
    assert "the mean covers 1 of 10 ground-truth images" in capsys.readouterr().err
    rc, _ = _run(pred, gt, tmp_path, "--allow-partial")
    assert rc == 0


def test_a_crop_border_that_leaves_less_than_the_ssim_window_fails_the_pair(tmp_path, capsys):
    # defect: 30 px images with --crop-border 10 gave SSIM NaN, a NaN mean and exit 0 (fewer px: a torch error)
    pred, gt = _dirs(tmp_path)
    img = _photo(2, (30, 30, 3))
    Image.fromarray(img).save(gt / "a.png")
    Image.fromarray(img).save(pred / "a.png")
    rc, report = _run(pred, gt, tmp_path, "--crop-border", "10")
    assert rc == 2 and report["pairs"] == [] and [f["name"] for f in report["failed"]] == ["a"]
    assert "smaller than SSIM's 11x11 window: use a crop border of at most 9 pixels" in report["failed"][0]["error"]
    assert "FAILED a:" in capsys.readouterr().out
    rc, report = _run(pred, gt, tmp_path, "--crop-border", "9")   # 12 px left: the window fits
    assert rc == 0 and report["mean"]["ssim"] == 1.0


def test_sub_folders_pair_by_their_path(tmp_path):
    # defect: sub-folders (which `tadisr upscale --recursive` mirrors) were left out without a word
    pred, gt = _dirs(tmp_path)
    for key in ("top", "sub/a", "sub/deeper/b"):
        (gt / key).parent.mkdir(parents=True, exist_ok=True)
        (pred / key).parent.mkdir(parents=True, exist_ok=True)
        img = _photo(len(key))
        Image.fromarray(img).save(gt / f"{key}.png")
        Image.fromarray(img).save(pred / f"{key}_x4.png")
        Image.fromarray(img[..., 0]).save(pred / f"{key}_text_mask.png")
    Image.fromarray(_photo(7)).save(gt / "a.png")              # the same stem at the top is another image
    Image.fromarray(_photo(7)).save(pred / "a_x4.png")
    rc, report = _run(pred, gt, tmp_path)
    assert rc == 0 and [(r["name"], r["psnr"]) for r in report["pairs"]] == \
        [("a", 100.0), ("sub/a", 100.0), ("sub/deeper/b", 100.0), ("top", 100.0)]
    # predictions kept inside the ground-truth folder are not ground truth
    (gt / "sub" / "sr").mkdir()
    Image.fromarray(_photo(len("sub/a"))).save(gt / "sub" / "sr" / "a_x4.png")
    rc, report = _run(gt / "sub" / "sr", gt / "sub", tmp_path)
    assert rc == 0 and [r["name"] for r in report["pairs"]] == ["a"]
    # ... nor is another method's folder beside them, or any sub-folder the predictions lack (review)
    (gt / "sub" / "other").mkdir()
    Image.fromarray(_photo(9)).save(gt / "sub" / "other" / "a_x4.png")
    rc, report = _run(gt / "sub" / "sr", gt / "sub", tmp_path)
    assert rc == 0 and report["unmatched"] == {"pred_only": [], "gt_only": [],
                                               "gt_folders_left_out": {"deeper": 1, "other": 1}}


def test_ground_truth_folders_and_images_left_out_of_a_mean_are_said(tmp_path, capsys, lpips_dir):
    """Defects (review): a ground-truth sub-folder the predictions lack was left out of the mean without a
    word, exit 0; an image too small for LPIPS left the LPIPS mean over fewer images than PSNR's, unsaid."""
    pred, gt = _dirs(tmp_path)
    for folder in ("a", "b"):
        (gt / folder).mkdir()
        for k, side in enumerate((24, 64)):
            Image.fromarray(_photo(k, (side, side, 3))).save(gt / folder / f"{k}.png")
    (pred / "a").mkdir()
    for k, side in enumerate((24, 64)):
        Image.fromarray(_photo(k, (side, side, 3))).save(pred / "a" / f"{k}_x4.png")
    rc = evaluate.main(["--pred", str(pred), "--gt", str(gt), "--no-ocr", "--lpips-weights", str(lpips_dir)])
    out = capsys.readouterr().out
    assert rc == 0 and "left out: ground-truth sub-folders the predictions do not have: b/ (2 images)" in out
    assert "LPIPS over 1 of 2 images; the others are too small for its backbone" in out


def test_a_prediction_named_like_a_cli_output_pairs_with_its_own_name(tmp_path):
    # defect: `sign_x2.png` was taken for the CLI's output of `sign.png` and paired with nothing
    pred, gt = _dirs(tmp_path)
    for name in ("sign_x2", "plate"):
        Image.fromarray(_photo(len(name))).save(gt / f"{name}.png")
    Image.fromarray(_photo(len("sign_x2"))).save(pred / "sign_x2.png")
    Image.fromarray(_photo(len("plate"))).save(pred / "plate_x2.png")
    rc, report = _run(pred, gt, tmp_path)
    assert rc == 0 and [(r["name"], r["psnr"]) for r in report["pairs"]] == [("plate", 100.0), ("sign_x2", 100.0)]


def test_a_json_target_that_is_a_folder_is_refused_before_the_work(tmp_path, capsys):
    # defect: IsADirectoryError traceback after the whole evaluation
    pred, gt = _dirs(tmp_path)
    Image.fromarray(_photo()).save(gt / "p.png")
    Image.fromarray(_photo()).save(pred / "p.png")
    assert evaluate.main(["--pred", str(pred), "--gt", str(gt), "--json", str(tmp_path), *FAST]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err == f"error: --json {tmp_path} is a folder: give a file name, e.g. " \
                                        f"{tmp_path / 'report.json'}\n"
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    assert evaluate.main(["--pred", str(pred), "--gt", str(gt), "--json", str(notes / "sub" / "r.json"), *FAST]) == 2
    assert capsys.readouterr().err == f"error: --json {notes / 'sub' / 'r.json'}: {notes} is a file, not a folder\n"


def test_damaged_lpips_weights_are_one_line_naming_the_file(tmp_path, capsys):
    # defect: a safetensors error traceback that named no file
    pred, gt = _dirs(tmp_path)
    Image.fromarray(_photo()).save(gt / "p.png")
    Image.fromarray(_photo()).save(pred / "p.png")
    junk = tmp_path / "lpips_alex.safetensors"
    junk.write_bytes(b"not weights")
    assert evaluate.main(["--pred", str(pred), "--gt", str(gt), "--no-ocr", "--lpips-weights", str(junk)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {junk} is not an LPIPS-alex weights file") and err.count("\n") == 1


def test_symlinked_sub_folders_pair_as_the_cli_walks_them(tmp_path):
    # defect: evaluate listed files with rglob, which does not enter symlinked sub-folders (Python 3.11),
    # while `tadisr upscale --recursive` follows them: the predictions of a linked folder were not compared
    from tadisr_core.batch import collect_inputs

    pred, gt = _dirs(tmp_path)
    img = _photo(3)
    for folder, name in ((tmp_path / "pred_linked", "a_x4.png"), (tmp_path / "gt_linked", "a.png")):
        folder.mkdir()
        Image.fromarray(img).save(folder / name)
        (folder / "loop").symlink_to(folder, target_is_directory=True)          # a cycle is walked once
    (pred / "sub").symlink_to(tmp_path / "pred_linked", target_is_directory=True)
    (gt / "sub").symlink_to(tmp_path / "gt_linked", target_is_directory=True)
    Image.fromarray(img).save(gt / "top.png")
    Image.fromarray(img).save(pred / "top_x4.png")
    rc, report = _run(pred, gt, tmp_path)
    assert rc == 0 and [r["name"] for r in report["pairs"]] == ["sub/a", "top"]
    assert [p for p, _, _ in collect_inputs([gt], recursive=True)] == [gt / "sub" / "a.png", gt / "top.png"]


def test_list_limits_the_pairs_to_the_names_it_lists(tmp_path, capsys):
    """Defect: evaluate had no way to score only a split (Real-CE ships its test list); now --list reads a list
    file as the dataset does (UTF-8 BOM, backslashes, folders and extensions dropped) and keeps only those."""
    pred, gt = _dirs(tmp_path)
    for i in range(4):
        Image.fromarray(_photo(i)).save(gt / f"img_{i}.png")
    Image.fromarray(_photo(0)).save(pred / "img_0_x1.png")
    Image.fromarray(_photo(9)).save(pred / "img_1_x1.png")   # not listed: its low PSNR must not count
    Image.fromarray(_photo(2)).save(pred / "img_2_x1.png")
    listed = tmp_path / "test.txt"
    listed.write_bytes(b"\xef\xbb\xbf" + "52mm_aligned_1024\\img_0.JPG\r\n\r\nimg_2.JPG\r\n".encode())
    rc, report = _run(pred, gt, tmp_path, "--list", str(listed))
    assert rc == 0 and [(r["name"], r["psnr"]) for r in report["pairs"]] == [("img_0", 100.0), ("img_2", 100.0)]
    assert report["unmatched"] == {"pred_only": [], "gt_only": [], "gt_folders_left_out": {}}
    assert report["settings"]["list"] == str(listed)
    assert f"limited to the images listed in {listed}" in capsys.readouterr().out
    listed.write_text("img_0.JPG\nimg_3.JPG\n")                 # listed, no prediction: a partial mean
    rc, report = _run(pred, gt, tmp_path, "--list", str(listed))
    assert rc == 1 and report["unmatched"] == {"pred_only": [], "gt_only": ["img_3"], "gt_folders_left_out": {}}
    assert "the mean covers 1 of 2 ground-truth images" in capsys.readouterr().err
    listed.write_text("img_0.JPG\nimg_7.JPG\n")                 # listed, no ground truth: another split's list
    assert evaluate.main(["--pred", str(pred), "--gt", str(gt), "--list", str(listed), *FAST]) == 2
    assert capsys.readouterr().err == (f"error: --list {listed} names 1 image(s) that --gt {gt} does not hold: "
                                       "img_7; is it the list of this split?\n")
    assert evaluate.main(["--pred", str(pred), "--gt", str(gt), "--list", str(tmp_path / "nope.txt"), *FAST]) == 2
    assert capsys.readouterr().err == f"error: --list {tmp_path / 'nope.txt'} is not a file\n"


def test_nothing_paired_says_why_in_one_line_before_loading_models(tmp_path, capsys, monkeypatch):
    """Defect: `--pred out` (the predictions in out/tiny), swapped folders or names that do not pair printed an
    empty table and exited 2 without an error line. Now one line says why, before LPIPS or OCR load."""
    monkeypatch.setattr("training.lpips.LPIPS", lambda *a, **k: pytest.fail("LPIPS loaded for nothing"))
    pred, gt = _dirs(tmp_path)
    (pred / "tiny").mkdir()
    for name in ("0001", "0002"):
        Image.fromarray(_photo()).save(gt / f"{name}.png")
        Image.fromarray(_photo()).save(pred / "tiny" / f"{name}_x4.png")
    Image.fromarray(_photo()).save(pred / "stray_x4.png")

    def error(*folders) -> str:
        args = [arg for flag, folder in zip(("--pred", "--gt"), folders) for arg in (flag, str(folder))]
        assert evaluate.main([*args, "--no-ocr"]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1
        return err.strip()

    head = f"error: nothing to evaluate: no image in --pred {pred} pairs with one in --gt {gt}"
    assert error(pred, gt) == (f"{head}; the predictions in its sub-folder tiny/ match the ground truth's names: "
                               f"give --pred {pred / 'tiny'}")
    assert error(gt, pred / "tiny") == (f"error: nothing to evaluate: no image in --pred {gt} pairs with one in "
                                        f"--gt {pred / 'tiny'}; with the two folders swapped they pair: give the "
                                        "predictions as --pred")
    (gt / "sub").mkdir()  # as `upscale --recursive` mirrors sub-folders (review: "ground truth []", no hint)
    (pred / "tiny" / "sub").mkdir()
    Image.fromarray(_photo()).save(gt / "sub" / "0003.png")
    Image.fromarray(_photo()).save(pred / "tiny" / "sub" / "0003_x4.png")
    (gt / "0001.png").rename(tmp_path / "moved.png")
    (gt / "0002.png").rename(tmp_path / "moved2.png")
    assert error(pred, gt) == (f"{head}; the predictions in its sub-folder tiny/ match the ground truth's names: "
                               f"give --pred {pred / 'tiny'}")
    (tmp_path / "moved.png").rename(gt / "0001.png")
    (tmp_path / "moved2.png").rename(gt / "0002.png")
    (pred / "other").mkdir()
    Image.fromarray(_photo()).save(pred / "other" / "scan_x4.png")
    assert error(pred / "other", gt) == (
        f"error: nothing to evaluate: no image in --pred {pred / 'other'} pairs with one in --gt {gt}: a prediction "
        "NAME.png or NAME_x4.png pairs with ground truth NAME.png (any image suffix, same sub-folder); "
        "predictions ['scan'], ground truth ['0001', '0002']")


def test_pairs_that_all_fail_end_with_an_error_line(tmp_path, capsys):
    """Defect: every pair failing printed its FAILED lines and exited 2 without an error line."""
    pred, gt = _dirs(tmp_path)
    Image.fromarray(_photo(0, (24, 32, 3))).save(gt / "a.png")
    Image.fromarray(_photo(0, (20, 32, 3))).save(pred / "a.png")
    assert evaluate.main(["--pred", str(pred), "--gt", str(gt), *FAST]) == 2
    out, err = capsys.readouterr()
    assert "FAILED a:" in out and err == "error: none of the 1 pairs could be evaluated (the FAILED lines say why)\n"


def test_a_device_this_machine_lacks_is_one_line_before_any_model_loads(tmp_path, capsys, monkeypatch):
    """Defect: `--device cuda` on a CPU machine was a torch AssertionError traceback, `--device gpu` torch's
    long message; now the words of `tadisr --device`, exit 2, before LPIPS loads."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("training.lpips.LPIPS", lambda *a, **k: pytest.fail("LPIPS loaded for a refused device"))
    pred, gt = _dirs(tmp_path)
    Image.fromarray(_photo()).save(gt / "a.png")
    Image.fromarray(_photo()).save(pred / "a.png")
    for device, words in (("cuda", "CUDA is not available in this torch build / machine"),
                          ("gpu", "not a device; use auto, cpu, cuda, cuda:N or mps")):
        assert evaluate.main(["--pred", str(pred), "--gt", str(gt), "--no-ocr", "--device", device]) == 2
        assert capsys.readouterr().err == f"error: --device {device}: {words}\n"
    assert evaluate.main(["--pred", str(pred), "--gt", str(gt), *FAST, "--device", "auto"]) == 0


def test_evaluates_errors_name_its_own_flags_not_python_parameters_or_training_keys(tmp_path, capsys, monkeypatch):
    """Defect: missing --lpips-weights were advised as `point loss.lpips_weights at ...` / `pass weights_path`,
    a missing paddleocr as `use backend='rapidocr'` and a too-large --crop-border as `crop_border 100`."""
    import sys

    from training.lpips import default_weights_dir

    pred, gt = _dirs(tmp_path)
    Image.fromarray(_photo()).save(gt / "a.png")
    Image.fromarray(_photo()).save(pred / "a.png")
    pair = ["--pred", str(pred), "--gt", str(gt)]
    mine = tmp_path / "w" / "mine.safetensors"
    assert evaluate.main([*pair, "--no-ocr", "--lpips-weights", str(mine)]) == 2
    made = tmp_path / "w" / "lpips_alex.safetensors"
    assert capsys.readouterr().err == (
        f"error: LPIPS weights not found at {mine}. Create them with `python -m training.convert_lpips_weights "
        f"--download --out {mine.parent}`, then point --lpips-weights at {made} (or leave --lpips-weights out: "
        f"the weights in {default_weights_dir()} are fetched on first use), or pass --no-lpips.\n")
    monkeypatch.setitem(sys.modules, "paddleocr", None)
    monkeypatch.setenv("TADISR_PADDLEOCR_DIR", str(tmp_path))
    assert evaluate.main([*pair, "--no-lpips", "--ocr-backend", "paddleocr"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: paddleocr backend needs") and err.endswith(
        "install them or use the rapidocr backend.\n"), err
    assert evaluate.main([*pair, *FAST, "--crop-border", "100"]) == 2
    assert ("FAILED a: ValueError: a crop border of 100 pixels leaves nothing of a 32x24 image (0 to 11 pixels a "
            "side)") in capsys.readouterr().out
