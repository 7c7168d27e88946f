"""Output names of batch runs: nothing overwritten that TADiSR did not write, nothing re-processed, names
that hold across runs (files of one name joining or leaving, another format or scale), resumed runs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tadisr_core import cli, images
from tests.cli_runs import FAST, random_png, run_cli
from tests.cli_runs import run_reported as run

SHOWN = FAST  # with progress bars
FAST = [*FAST, "-q"]


def test_output_into_the_input_folder_overwrites_nothing_and_reprocesses_nothing(tiny_model, tmp_path, capsys):
    d = tmp_path / "photos"
    d.mkdir()
    random_png(d / "a.png", 0)
    random_png(d / "b.png", 1)
    user = random_png(d / "b_x4.png", 2)                         # the user's own file with an output-like name
    before = user.read_bytes()
    rc, rep, err = run(["upscale", str(d), "-o", str(d), *FAST, "--json"], capsys, model=tiny_model)
    assert rc == cli.EXIT_FAILED and user.read_bytes() == before
    by = {Path(f["input"]).name: f for f in rep["files"]}
    assert sorted(by) == ["a.png", "b.png"]                # b_x4.png is not taken as an input
    assert "b_x4.png exists and was not written by TADiSR" in by["b.png"]["error"]
    names = sorted(p.name for p in d.iterdir())
    assert names == ["a.png", "a_text_mask.png", "a_x4.png", "b.png", "b_x4.png"]
    for extra in (["--skip-existing"], []):                # re-runs never upscale the outputs again
        rc, rep, _ = run(["upscale", str(d), "-o", str(d), *FAST, "--json", *extra], capsys, model=tiny_model)
        assert sorted(Path(f["input"]).name for f in rep["files"]) == ["a.png", "b.png"]
        assert sorted(p.name for p in d.iterdir()) == names
    assert rep["files"][0]["ok"] and not rep["files"][0]["skipped"]


def test_skip_existing_redoes_incomplete_outputs(tiny_model, tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    random_png(d / "a.png")
    out = tmp_path / "out"
    argv = ["upscale", str(d), "-o", str(out), *FAST, "--json", "--skip-existing"]
    assert run(argv, capsys, model=tiny_model)[0] == 0
    sr = out / "a_x4.png"
    sr.write_bytes(sr.read_bytes()[:-20])                  # torn by a crash of some other writer
    rc, rep, _ = run(argv, capsys, model=tiny_model)
    assert rc == 0 and rep["files"][0]["skipped"] is False and images.written_by_us(sr)


def test_a_skipped_file_shows_no_tile_bar(tiny_model, tmp_path, capsys):
    """Defect: `--skip-existing` drew an empty tile bar (`a.png: 0tile [00:00, ?tile/s]`) for each file it
    skipped; an upscaled file still shows its bar."""
    random_png(tmp_path / "a.png")
    argv = ["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), *SHOWN, "--skip-existing"]
    rc, _, err = run_cli(argv, capsys, model=tiny_model)
    assert rc == 0 and "a.png: 100%" in err
    rc, _, err = run_cli(argv, capsys, model=tiny_model)
    assert rc == 0 and "a.png" not in err.replace(str(tmp_path / "out"), ""), err


def test_recursive_walk_leaves_out_the_output_folder_and_follows_symlinked_folders(tiny_model, tmp_path, capsys):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    random_png(d / "a.png")
    other = tmp_path / "elsewhere"
    other.mkdir()
    random_png(other / "c.png")
    (d / "linked").symlink_to(other, target_is_directory=True)
    (other / "loop").symlink_to(d, target_is_directory=True)   # a cycle must not loop forever
    for _ in range(2):
        rc, rep, _ = run(["upscale", str(d), "--recursive", "-o", str(d / "out"), *FAST, "--json"], capsys,
                         model=tiny_model)
        got = sorted(str(Path(f["input"]).relative_to(d)) for f in rep["files"])
        assert rc == 0 and got == ["a.png", "linked/c.png"]
    assert not (d / "out" / "out").exists()


def test_an_explicit_input_is_never_overwritten_by_another_inputs_output(tiny_model, tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    x, x4 = random_png(d / "x.png", 0), random_png(d / "x_x4.png", 1)
    before = x4.read_bytes()
    rc, rep, _ = run(["upscale", str(x), str(x4), "-o", str(d), *FAST, "--json"], capsys, model=tiny_model)
    by = {Path(f["input"]).name: f for f in rep["files"]}
    assert "also an input of this run" in by["x.png"]["error"] and x4.read_bytes() == before
    assert by["x_x4.png"]["ok"] and (d / "x_x4_x4.png").is_file()


def test_a_file_given_twice_is_upscaled_once(tiny_model, tmp_path, capsys):
    """Defect: a file named twice (or a folder and one of its files) was upscaled twice, into `a` and `a-2`."""
    d = tmp_path / "in"
    d.mkdir()
    a = random_png(d / "a.png")
    random_png(d / "b.png", 1)
    rc, rep, err = run(["upscale", str(a), str(d), str(a), "-o", str(tmp_path / "o"), *FAST, "--json"], capsys,
                       model=tiny_model)
    assert rc == 0 and [Path(f["input"]).name for f in rep["files"]] == ["a.png", "b.png"]
    assert f"2 input(s) given more than once, upscaled once: {a}, {a}" in err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a_text_mask.png", "a_x4.png", "b_text_mask.png",
                                                                   "b_x4.png"]


def test_skip_existing_reports_skipped_files_apart_from_written_ones(tiny_model, tmp_path, capsys):
    random_png(tmp_path / "a.png")
    argv = ["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), *[a for a in FAST if a != "-q"],
            "--skip-existing"]
    assert run(argv, capsys, model=tiny_model)[0] == 0
    rc, _, err = run(argv, capsys, model=tiny_model)
    assert rc == 0 and f"0 of 1 files written to {tmp_path / 'o'}, 1 skipped (their outputs exist)" in err


def test_skip_existing_redoes_outputs_another_model_or_colour_fix_made(tiny_model, tmp_path, capsys, monkeypatch):
    """Review: outputs of `--model demo` were skipped in a later run with other weights (or another --color-fix)
    into the same folder: the outputs recorded only their input."""
    random_png(tmp_path / "a.png")
    argv = ["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), *FAST, "--json", "--skip-existing"]

    def skipped(*more: str) -> bool:
        rc, rep, _ = run([*argv, *more], capsys, model=tiny_model)
        assert rc == 0 and rep["files"][0]["outputs"]["image"] == str(tmp_path / "o" / "a_x4.png")
        return rep["files"][0]["skipped"]

    assert not skipped() and skipped()
    monkeypatch.setattr(tiny_model, "weights_id", ("other weights",), raising=False)
    assert not skipped() and skipped()                 # redone by the other model, on its name; then skipped
    assert not skipped("--color-fix", "none") and skipped("--color-fix", "none") and not skipped()


@pytest.mark.parametrize("fmt", ["jpg", "webp"])
def test_jpeg_and_webp_outputs_are_tagged_resumed_and_never_taken_as_inputs(tiny_model, tmp_path, capsys, fmt):
    """`--format jpg|webp`: the SR image in that format (the mask stays PNG), close to the PNG one, a
    fraction of its size at the default quality; re-runs skip it, redo a torn one, leave the user's
    own file of that name alone and never upscale it."""
    d = tmp_path / "in"
    d.mkdir()
    random_png(d / "a.png", size=(40, 48))
    png, out = tmp_path / "png", tmp_path / "out"
    assert run(["upscale", str(d), "-o", str(png), *FAST], capsys, model=tiny_model)[0] == 0
    argv = ["upscale", str(d), "-o", str(out), *FAST, "--json", "--skip-existing", "--format", fmt]
    rc, rep, _ = run(argv, capsys, model=tiny_model)
    sr = out / f"a_x4.{fmt}"
    assert rc == 0 and sorted(p.name for p in out.iterdir()) == ["a_text_mask.png", sr.name]
    assert rep["files"][0]["outputs"]["image"] == str(sr) and images.written_by_us(sr)
    with Image.open(sr) as im:
        assert im.format == {"jpg": "JPEG", "webp": "WEBP"}[fmt] and im.size == (192, 160) and im.mode == "RGB"
        got = np.asarray(im, dtype=np.float32)
    ref = np.asarray(Image.open(png / "a_x4.png"), dtype=np.float32)
    assert (out / "a_text_mask.png").read_bytes() == (png / "a_text_mask.png").read_bytes()
    if fmt == "jpg":  # 4:4:4 at quality 95, even on the random model's noise
        from PIL import JpegImagePlugin

        assert JpegImagePlugin.get_sampling(Image.open(sr)) == 0 and np.abs(got - ref).mean() < 6
        rc, _, _ = run([*argv[:3], str(tmp_path / "q50"), *argv[4:], "--quality", "50"], capsys, model=tiny_model)
        assert rc == 0 and (tmp_path / "q50" / sr.name).stat().st_size < sr.stat().st_size * 0.7
    else:             # WebP at quality 100 is lossless
        rc, _, _ = run([*argv[:3], str(tmp_path / "lossless"), *argv[4:], "--quality", "100"], capsys, model=tiny_model)
        assert rc == 0 and np.array_equal(np.asarray(Image.open(tmp_path / "lossless" / sr.name)), ref.astype(np.uint8))
    assert run(argv, capsys, model=tiny_model)[1]["files"][0]["skipped"] is True
    sr.write_bytes(sr.read_bytes()[:-30])                  # torn by a crash of some other writer
    assert not images.written_by_us(sr)
    rc, rep, _ = run(argv, capsys, model=tiny_model)
    if fmt == "jpg":  # its tag comes first, so a torn file is still known as ours, and redone
        assert rc == 0 and rep["files"][0]["skipped"] is False and images.written_by_us(sr)
    else:             # WebP keeps EXIF after the pixels: a torn file cannot be told from the user's, and stays
        assert rc == cli.EXIT_FAILED and "exists and was not written by TADiSR" in rep["files"][0]["error"]
        sr.unlink()
        assert run(argv, capsys, model=tiny_model)[0] == 0
    Image.open(png / "a_x4.png").save(sr)                  # the user's own file under that name
    rc, rep, _ = run(argv, capsys, model=tiny_model)
    assert rc == cli.EXIT_FAILED and f"a_x4.{fmt} exists and was not written by TADiSR" in rep["files"][0]["error"]
    rc, rep, _ = run(["upscale", str(out), "-o", str(tmp_path / "again"), *FAST, "--json"], capsys, model=tiny_model)
    assert rc == cli.EXIT_SETUP  # a folder holding only outputs has nothing to upscale


def test_a_screenshot_whose_alpha_is_opaque_everywhere_is_written_as_rgb_and_can_be_jpeg(tiny_model, tmp_path,
                                                                                         capsys):
    """Review: an RGBA screenshot (alpha 255 everywhere, as macOS writes them) failed `--format jpg` ("the image
    has an alpha channel") and gave a needless RGBA PNG; a palette image with a key no pixel uses, the same."""
    d = tmp_path / "in"
    d.mkdir()
    rgb = np.random.default_rng(4).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    Image.fromarray(np.dstack([rgb, np.full((12, 10), 255, np.uint8)]), "RGBA").save(d / "shot.png")
    palette = Image.fromarray(rgb).quantize(16)
    palette.save(d / "keyed.png", transparency=16)  # a key outside the image's 16 colours
    for fmt in ("jpg", "png"):
        rc, rep, _ = run(["upscale", str(d), "-o", str(tmp_path / fmt), *FAST, "--json", "--format", fmt], capsys,
                         model=tiny_model)
        assert rc == 0 and all(f["ok"] and f["channels"] == 3 for f in rep["files"]), rep["files"]
        for name in ("shot", "keyed"):
            with Image.open(tmp_path / fmt / f"{name}_x4.{fmt}") as im:
                assert im.mode == "RGB" and im.size == (40, 48)


@pytest.mark.parametrize("mode", ["LA", "L with a key no pixel uses"])
def test_a_gray_image_whose_alpha_is_opaque_everywhere_stays_gray(tmp_path, mode):
    """Review of the change above: a gray image with an opaque alpha came out in colour (three channels, read as
    RGB, are upscaled as colour), where gray with alpha gives gray."""
    gray = np.random.default_rng(5).integers(0, 256, (12, 10), dtype=np.uint8)
    if mode == "LA":
        Image.fromarray(np.dstack([gray, np.full_like(gray, 255)]), "LA").save(tmp_path / "g.png")
    else:
        Image.fromarray(gray | 1).save(tmp_path / "g.png", transparency=0)  # odd levels only: key 0 unused
    pixels = images.read_image(tmp_path / "g.png").pixels
    assert pixels.shape == (1, 1, 12, 10)


def test_an_alpha_image_is_refused_as_jpeg_before_it_is_upscaled_and_kept_as_webp(tiny_model, tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (12, 10, 4), dtype=np.uint8), "RGBA").save(d / "icon.png")
    random_png(d / "photo.png")
    out = tmp_path / "out"
    rc, rep, _ = run(["upscale", str(d), "-o", str(out), *FAST, "--json", "--format", "jpg"], capsys, model=tiny_model)
    by = {Path(f["input"]).name: f for f in rep["files"]}
    assert rc == cli.EXIT_FAILED and by["photo.png"]["ok"]
    assert "icon_x4.jpg: the image has an alpha channel, which JPEG cannot keep" in by["icon.png"]["error"]
    # the file names, then the message: no "ValueError:" between them
    assert by["icon.png"]["error"].startswith(f"{d / 'icon.png'}: {out / 'icon_x4.jpg'}: the image has")
    assert "upscale" not in by["icon.png"]["seconds"] and not (out / "icon_text_mask.png").exists()
    rc, _, _ = run(["upscale", str(d / "icon.png"), "-o", str(out), *FAST, "--format", "webp", "--quality", "100"],
                   capsys, model=tiny_model)
    with Image.open(out / "icon_x4.webp") as im:
        assert rc == 0 and im.mode == "RGBA"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["upscale", "x.png", "-o", str(out), "--quality", "0"])
    assert "expected a whole number from 1 to 100, got '0'" in capsys.readouterr().err


def test_outputs_keep_their_names_when_a_file_of_the_same_name_joins(tiny_model, tmp_path, capsys):
    """Defect: names were given in sorted order, so adding `a.jpg` beside a processed `a.png` moved
    `a_x4.png` to `a.jpg`: --skip-existing reported `a.jpg` done with `a.png`'s result and never upscaled
    it (without the flag, `a.png`'s output was replaced by `a.jpg`'s)."""
    d, out = tmp_path / "in", tmp_path / "out"
    d.mkdir()
    random_png(d / "a.png", size=(16, 16))
    argv = ["upscale", str(d), "-o", str(out), *FAST, "--json", "--skip-existing"]
    assert run(argv, capsys, model=tiny_model)[0] == 0
    first = (out / "a_x4.png").read_bytes()
    Image.fromarray(np.full((24, 20, 3), 200, np.uint8)).save(d / "a.jpg")
    rc, rep, _ = run(argv, capsys, model=tiny_model)
    by_input = {Path(f["input"]).name: f for f in rep["files"]}
    assert rc == 0 and by_input["a.png"]["skipped"] and by_input["a.png"]["outputs"]["image"] == str(out / "a_x4.png")
    assert not by_input["a.jpg"]["skipped"] and by_input["a.jpg"]["outputs"]["image"] == str(out / "a-2_x4.png")
    assert (out / "a_x4.png").read_bytes() == first
    with Image.open(out / "a-2_x4.png") as im:
        assert im.size == (80, 96)                                 # a.jpg's, not a.png's 64 x 64
    rc, rep, _ = run(argv[:-1], capsys, model=tiny_model)          # without --skip-existing: each keeps its own
    assert rc == 0 and {Path(f["input"]).name: Path(f["outputs"]["image"]).name for f in rep["files"]} == {
        "a.jpg": "a-2_x4.png", "a.png": "a_x4.png"}
    (d / "a.png").unlink()                                         # a.jpg stays where it is
    rc, rep, _ = run(argv, capsys, model=tiny_model)
    assert rc == 0 and rep["files"][0]["skipped"] and rep["files"][0]["outputs"]["image"] == str(out / "a-2_x4.png")


def test_names_and_masks_hold_across_another_format_or_scale(tiny_model, tmp_path, capsys):
    """Defects: the text mask's name carries no format or scale, but an input's earlier name was found by
    its image at this run's format and scale only. So `a.jpg` joining `a.png` in a WebP run took the name
    `a`, and its mask replaced `a.png`'s beside `a_x4.png`; and a mask left by a run at another scale was
    kept by --skip-existing beside an image of another size."""
    d, out = tmp_path / "in", tmp_path / "out"
    d.mkdir()
    random_png(d / "a.png", size=(16, 16))
    assert run(["upscale", str(d), "-o", str(out), *FAST, "--json"], capsys, model=tiny_model)[0] == 0
    Image.fromarray(np.full((24, 20, 3), 200, np.uint8)).save(d / "a.jpg")
    rc, rep, _ = run(["upscale", str(d), "-o", str(out), *FAST, "--json", "--format", "webp"], capsys,
                     model=tiny_model)
    assert rc == 0 and {Path(f["input"]).name: Path(f["outputs"]["mask"]).name for f in rep["files"]} == {
        "a.jpg": "a-2_text_mask.png", "a.png": "a_text_mask.png"}
    with Image.open(out / "a_text_mask.png") as mask, Image.open(out / "a_x4.png") as image:
        assert mask.size == image.size == (64, 64)                  # a.png's, not a.jpg's 80 x 96
    one = d / "one"
    one.mkdir()
    random_png(one / "b.png", size=(16, 16))
    argv = ["upscale", str(one), "-o", str(out), *FAST, "--json"]
    assert run([*argv, "--scale", "2"], capsys, model=tiny_model)[0] == 0  # b_x2.png, b_text_mask.png 32 x 32
    assert run(argv, capsys, model=tiny_model)[0] == 0                     # b_x4.png, the mask now 64 x 64
    assert run([*argv, "--scale", "2"], capsys, model=tiny_model)[0] == 0  # the mask 32 x 32 again
    rc, rep, _ = run([*argv, "--skip-existing"], capsys, model=tiny_model)
    assert rc == 0 and not rep["files"][0]["skipped"]                     # redone: the mask did not fit
    with Image.open(out / "b_text_mask.png") as mask:
        assert mask.size == (64, 64)
    rc, rep, _ = run([*argv, "--skip-existing"], capsys, model=tiny_model)
    assert rc == 0 and rep["files"][0]["skipped"]


def test_an_output_too_large_for_webp_is_refused_before_the_upscale(tiny_model, tmp_path, capsys, monkeypatch):
    """Defect: a 4100 px wide input as WebP (16383 px a side at most) failed only after the whole upscale."""
    import tadisr_core.batch

    def no_upscale(*args, **kwargs):
        raise AssertionError("the upscale ran")

    monkeypatch.setattr(tadisr_core.batch, "upscale", no_upscale)
    Image.fromarray(np.zeros((2, 4100, 3), np.uint8)).save(tmp_path / "wide.png")
    rc, rep, _ = run(["upscale", str(tmp_path / "wide.png"), "-o", str(tmp_path / "o"), *FAST, "--json",
                      "--format", "webp"], capsys, model=tiny_model)
    error = rep["files"][0]["error"]
    assert rc == cli.EXIT_FAILED and "16400x8 image is too large for WEBP" in error and "--format png" in error


def test_recorded_inputs_hold_for_any_file_name(tiny_model, tmp_path, capsys):
    """Review of the recorded inputs: a name that is not UTF-8 failed its outputs, and a CJK name was never
    skipped as JPEG (EXIF holds ASCII only)."""
    d, out = tmp_path / "in", tmp_path / "out"
    d.mkdir()
    for name in (os.fsdecode(b"caf\xe9.png"), "招牌.png"):
        random_png(d / name, size=(16, 16))
    for fmt in ("png", "jpg"):
        argv = ["upscale", str(d), "-o", str(out / fmt), *FAST, "--json", "--skip-existing", "--format", fmt]
        assert run(argv, capsys, model=tiny_model)[0] == 0
        rc, rep, _ = run(argv, capsys, model=tiny_model)
        assert rc == 0 and all(f["skipped"] for f in rep["files"]), fmt


def test_names_after_a_gap_stay(tiny_model, tmp_path, capsys):
    """Review: a name missing from the middle of `a`, `a-2`, `a-3` moved the names after it (and redid them)."""
    gap = tmp_path / "gap"
    gap.mkdir()
    for i, suffix in enumerate(("bmp", "jpg", "png")):
        Image.fromarray(np.full((8 + 2 * i, 8, 3), 60 * i, np.uint8)).save(gap / f"a.{suffix}")
    argv = ["upscale", str(gap), "-o", str(tmp_path / "gap_out"), *FAST, "--json", "--skip-existing"]
    assert run(argv, capsys, model=tiny_model)[0] == 0                   # a.bmp: a, a.jpg: a-2, a.png: a-3
    for gone in (gap / "a.bmp", tmp_path / "gap_out" / "a_x4.png", tmp_path / "gap_out" / "a_text_mask.png"):
        gone.unlink()                                                    # a.bmp and its outputs removed
    rc, rep, _ = run(argv, capsys, model=tiny_model)
    assert rc == 0 and {Path(f["input"]).name: (f["skipped"], Path(f["outputs"]["image"]).name)
                        for f in rep["files"]} == {"a.jpg": (True, "a-2_x4.png"), "a.png": (True, "a-3_x4.png")}


def test_two_files_of_one_name_and_size_are_told_apart(tiny_model, tmp_path, capsys):
    """Review: `day2/scan.png` was skipped on `day1/scan.png`'s result (same name and byte size); then it
    replaced that result (a later review): it takes a name of its own."""
    twins = [tmp_path / day / "scan.png" for day in ("day1", "day2")]
    for i, twin in enumerate(twins):
        twin.parent.mkdir()
        random_png(twin, seed=0, size=(16, 16))
        os.utime(twin, (1_700_000_000 + 86_400 * i,) * 2)               # same name and size, another day
    argv = ["upscale", "-o", str(tmp_path / "scans"), *FAST, "--json", "--skip-existing"]
    assert run([*argv, str(twins[0])], capsys, model=tiny_model)[0] == 0
    first = (tmp_path / "scans" / "scan_x4.png").read_bytes()
    rc, rep, _ = run([*argv, str(twins[1])], capsys, model=tiny_model)
    assert rc == 0 and not rep["files"][0]["skipped"] and rep["files"][0]["outputs"]["image"].endswith("scan-2_x4.png")
    assert (tmp_path / "scans" / "scan_x4.png").read_bytes() == first


def test_outputs_of_older_versions_are_not_skipped_for_another_input(tiny_model, tmp_path, capsys):
    """Review: outputs that record no input (older versions) counted as any input's, so a new `a.jpg` was
    skipped on the old `a.png` result."""
    old = tmp_path / "old"
    (old / "in").mkdir(parents=True)
    random_png(old / "in" / "a.png", size=(8, 8))
    images.save_images([(torch.rand(3, 32, 32), old / "out" / "a_x4.png"),
                        (torch.rand(1, 32, 32), old / "out" / "a_text_mask.png")])   # as older versions wrote them
    argv = ["upscale", str(old / "in"), "-o", str(old / "out"), *FAST, "--json", "--skip-existing"]
    rc, rep, _ = run(argv, capsys, model=tiny_model)
    assert rc == 0 and rep["files"][0]["skipped"]                         # alone, it is still taken as a.png's
    Image.fromarray(np.zeros((6, 5, 3), np.uint8)).save(old / "in" / "a.jpg")
    rc, rep, _ = run(argv, capsys, model=tiny_model)
    assert rc == 0 and not any(f["skipped"] for f in rep["files"])
    with Image.open(old / "out" / "a_x4.png") as a, Image.open(old / "out" / "a-2_x4.png") as b:
        assert (a.size, b.size) == ((20, 24), (32, 32))                  # a.jpg's and a.png's own results
