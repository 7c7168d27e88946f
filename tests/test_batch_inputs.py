"""What batch upscaling takes from folders and how it names outputs: every format Pillow reads (not just a
fixed list), advice for HEIC photos, empty files said to be empty, names that differ only in case."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from tadisr_core import cli, images
from tadisr_core.batch import collect_inputs, plan_jobs
from tests.cli_runs import FAST, run_reported

# (file name, Pillow mode, save format): suffixes a fixed list left out, though Pillow reads them here
EXTRA_FORMATS = [("a.jfif", "RGB", "JPEG"), ("b.jpe", "RGB", "JPEG"), ("c.pgm", "L", "PPM"), ("d.ppm", "RGB", "PPM"),
                 ("e.pnm", "RGB", "PPM"), ("f.pbm", "1", "PPM")]
EXTRA_FORMATS += [("g.avif", "RGB", "AVIF")] if features.check("avif") else []
EXTRA_FORMATS += [("h.jp2", "RGB", "JPEG2000")] if features.check("jpg_2000") else []


def _save(path: Path, mode: str = "RGB", fmt: str | None = None, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).convert(mode).save(path, format=fmt)
    return path


def _upscale(argv: list[str], capsys, model) -> tuple[int, dict | None, str]:
    return run_reported(["upscale", *argv, *FAST, "-q", "--json"], capsys, model=model)


def test_the_readable_suffixes_come_from_pillow_and_leave_out_what_it_cannot_decode():
    """Defect: a fixed suffix list (png, jpg, webp, bmp, tif, gif, tga) left out formats Pillow reads."""
    suffixes = images.image_suffixes()
    assert images.IMAGE_SUFFIXES <= suffixes
    assert {name[name.rindex("."):] for name, _, _ in EXTRA_FORMATS} <= suffixes
    assert ".mpo" in suffixes  # a JPEG-family photo (3D cameras), opened by JPEG's opener
    # videos, data, documents, layered files, brushes, raw dumps: formats Pillow registers that are no pictures
    assert not {".mpg", ".mpeg", ".h5", ".grib", ".bufr", ".fits", ".ps", ".eps", ".pdf", ".psd", ".gbr", ".fli",
                ".rgb", ".im"} & suffixes
    assert images.is_image_file("scan.JFIF") and not images.is_image_file("notes.txt")


def test_a_folder_of_formats_outside_the_old_list_is_upscaled(tiny_model, tmp_path, capsys):
    """Defect: a folder of .jfif / .pgm / .avif... files stopped with "nothing to upscale" (exit 2), while the
    same files named one by one were upscaled."""
    d = tmp_path / "in"
    d.mkdir()
    for k, (name, mode, fmt) in enumerate(EXTRA_FORMATS):
        _save(d / name, mode, fmt, seed=k)
    rc, rep, err = _upscale([str(d), "-o", str(tmp_path / "o")], capsys, tiny_model)
    assert rc == cli.EXIT_OK, err
    assert [Path(f["input"]).name for f in rep["files"]] == [name for name, _, _ in EXTRA_FORMATS]
    assert all(f["ok"] for f in rep["files"]) and "not images we read" not in err
    assert {p.name for p in (tmp_path / "o").iterdir()} >= {f"{Path(n).stem}_x4.png" for n, _, _ in EXTRA_FORMATS}


@pytest.mark.skipif(importlib.util.find_spec("pillow_heif") is not None, reason="pillow-heif reads HEIC files")
def test_heic_photos_left_out_or_named_say_to_install_pillow_heif(tmp_path, caplog):
    """Defect: an iPhone's .heic photos were "not images we read" / "not an image format Pillow knows", with no
    word of the plugin that reads them."""
    d = tmp_path / "phone"
    d.mkdir()
    _save(d / "a.png")
    heic = d / "IMG_0001.HEIC"
    heic.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64))
    with caplog.at_level(logging.WARNING, logger="tadisr"):
        found = collect_inputs([d])
    advice = ("HEIC/HEIF photos need the pillow-heif package (pip install pillow-heif), or convert them to PNG "
              "or JPEG")
    assert [p.name for p, _, _ in found] == ["a.png"]
    assert f"left out 1 file(s) that are not images we read (IMG_0001.HEIC); 1 HEIC/HEIF file(s): {advice}" \
           in caplog.text
    with pytest.raises(images.ImageReadError) as err:
        images.read_image(heic)
    assert str(err.value) == f"cannot read {heic} as an image: {advice}"


def test_an_empty_file_is_said_to_be_empty(tmp_path):
    """Defect: a zero-byte file (an interrupted copy) read as "not an image format Pillow knows"."""
    empty = tmp_path / "copied.png"
    empty.write_bytes(b"")
    with pytest.raises(images.ImageReadError) as err:
        images.read_image(empty)
    assert str(err.value) == f"cannot read {empty} as an image: empty file (0 bytes)"


def test_names_that_differ_only_in_case_get_numbered_apart(tmp_path):
    """Defect: cs1/Scan.png and cs2/scan.png planned into one folder got Scan_x4.png and scan_x4.png: one file on
    macOS, Windows and exFAT, so the second overwrote the first. Names are now compared ignoring case."""
    for folder, name in (("cs1", "Scan.png"), ("cs2", "scan.png"), ("cs2", "other.png")):
        (tmp_path / folder).mkdir(exist_ok=True)
        _save(tmp_path / folder / name)
    found = collect_inputs([tmp_path / "cs1", tmp_path / "cs2"])
    jobs = plan_jobs(found, tmp_path / "out", 4)
    assert [(j.image.name, j.mask.name) for j in jobs] == [("Scan_x4.png", "Scan_text_mask.png"),
                                                           ("other_x4.png", "other_text_mask.png"),
                                                           ("scan-2_x4.png", "scan-2_text_mask.png")]
    assert [j.shared for j in jobs] == [True, False, True]


def test_outputs_an_earlier_run_wrote_apart_by_case_keep_their_names(tmp_path):
    """Defect of the fix above: on a case-sensitive disk, outputs of an earlier run named Scan_x4.png and
    scan_x4.png (both there, each recording its input) were taken as one name, so scan.png moved to
    scan-2_x4.png and left its old outputs behind."""
    import torch

    from tadisr_core.batch import source_tag
    from tadisr_core.images import save_images

    inputs = [_save(tmp_path / folder / name) for folder, name in (("cs1", "Scan.png"), ("cs2", "scan.png"))
              if (tmp_path / folder).mkdir() or True]
    out = tmp_path / "out"
    out.mkdir()
    for path in inputs:  # what the run before the fix wrote
        image = torch.rand(1, 3, 40, 48)
        save_images([(image, out / f"{path.stem}_x4.png"), (image[:, :1], out / f"{path.stem}_text_mask.png")], 95,
                    source_tag(path))
    jobs = plan_jobs(collect_inputs([tmp_path / "cs1", tmp_path / "cs2"]), out, 4)
    assert [(j.input, j.image.name) for j in jobs] == [(inputs[0], "Scan_x4.png"), (inputs[1], "scan_x4.png")]


def test_an_input_run_alone_never_takes_the_name_of_another_folders_file(tmp_path):
    """Review: `x/page.png` and `y/page.png` ran together (page_x4, page-2_x4); `y/page.png`, edited and run alone,
    took page_x4.png and replaced x's result. A copy of x's file (same name, size and time) elsewhere, or x's
    folder moved, is still x's file: it keeps x's name (its outputs are the same)."""
    import os
    import shutil

    import torch

    from tadisr_core.images import recorded_source, save_images

    def run(*folders: Path) -> list[str]:
        jobs = plan_jobs(collect_inputs(list(folders)), out, 4)
        for job in jobs:
            image = torch.rand(1, 3, 40, 48)
            save_images([(image, job.image), (image[:, :1], job.mask)], 95, job.source)
        return [job.image.name for job in jobs]

    for folder in ("x", "y", "z"):
        (tmp_path / folder).mkdir()
    x, y = _save(tmp_path / "x" / "page.png"), _save(tmp_path / "y" / "page.png", seed=1)
    out = tmp_path / "out"
    assert run(x.parent, y.parent) == ["page_x4.png", "page-2_x4.png"]
    x_result = (out / "page_x4.png").read_bytes()
    _save(y, seed=2)
    os.utime(y, (y.stat().st_mtime + 60,) * 2)                   # edited: its own name, replaced
    assert run(y.parent) == ["page-2_x4.png"] and (out / "page_x4.png").read_bytes() == x_result
    z = shutil.copy2(x, tmp_path / "z" / "page.png")             # x's copy: same name, bytes and time
    assert run(Path(z).parent) == ["page_x4.png"] and run(x.parent) == ["page_x4.png"]
    _save(z, seed=3)
    os.utime(z, (z.stat().st_mtime + 90,) * 2)                   # now another file: a name of its own
    assert run(Path(z).parent) == ["page-3_x4.png"] and run(x.parent) == ["page_x4.png"]
    assert recorded_source(out / "page-3_x4.png").split(" in ")[0] != recorded_source(out / "page_x4.png").split(
        " in ")[0]


def test_a_long_name_is_written_or_refused_before_the_upscale(tmp_path):
    """Review: a 248-byte output name (legal) failed after the whole upscale, with "[Errno 36] File name too long"
    naming its hidden temporary `.NAME.partial` (257 bytes); a name past the disk's limit is now refused
    when the run is planned."""
    import torch

    from tadisr_core.images import save_images

    (tmp_path / "in").mkdir()
    fits = _save(tmp_path / "in" / ("路" * 80 + ".png"))            # 240-byte stem: outputs of 247 and 254 bytes
    too_long = _save(tmp_path / "in" / ("字" * 81 + ".png"))        # 243: its text mask's name would be 257
    out = tmp_path / "out"
    jobs = {job.input: job for job in plan_jobs(collect_inputs([fits, too_long]), out, 4)}
    assert jobs[fits].error is None
    image = torch.rand(1, 3, 8, 8)
    save_images([(image, jobs[fits].image), (image[:, :1], jobs[fits].mask)], 95, jobs[fits].source)
    assert sorted(p.name for p in out.iterdir()) == sorted([jobs[fits].image.name, jobs[fits].mask.name])
    mask = "字" * 81 + "_text_mask.png"
    assert jobs[too_long].error == (f"{mask}: the output's name is 257 bytes, longer than the 255 its disk takes "
                                    f"(in {out}); give the input a shorter name")


def test_the_pages_left_out_of_a_multi_page_file_are_in_the_report_and_the_summary(tiny_model, tmp_path, capsys):
    """Review: a 3-page scan (TIFF) gave its first page with a warning at its read only; `--json` and the
    closing summary, what a batch's user reads, did not say that two pages were left out."""
    from tests.cli_runs import run_cli

    d = tmp_path / "in"
    d.mkdir()
    pages = [Image.fromarray(np.full((12, 10, 3), 60 * k, np.uint8)) for k in range(3)]
    pages[0].save(d / "scan.tif", save_all=True, append_images=pages[1:])
    _save(d / "photo.png")
    rc, rep, _ = _upscale([str(d), "-o", str(tmp_path / "o")], capsys, tiny_model)
    assert rc == 0 and {Path(f["input"]).name: f["frames"] for f in rep["files"]} == {"scan.tif": 3, "photo.png": 1}
    rc, _, err = run_cli(["upscale", str(d), "-o", str(tmp_path / "o2"), *FAST], capsys, model=tiny_model)
    assert rc == 0 and (f"  1 file(s) had several frames or pages, of which only the first was upscaled: "
                        f"{d / 'scan.tif'}\n") in err


def test_a_moved_folder_keeps_its_outputs_and_older_outputs_keep_their_inputs(tiny_model, tmp_path, capsys):
    """Review of the change above: the same file from a renamed, moved or temporary folder got `page-2`,
    `page-3`... and was redone by --skip-existing; and `a.png` run alone took `a_x4.png`, `a.jpg`'s result of
    an older version (whose tag records no folder), replacing it."""
    import shutil

    import torch

    from tadisr_core.batch import source_tag
    from tadisr_core.images import save_images

    (tmp_path / "tmp0").mkdir()
    page = _save(tmp_path / "tmp0" / "page.png")
    for k in range(3):
        folder = tmp_path / f"tmp{k}"
        if k:
            folder.mkdir()
            shutil.copy2(page, folder / "page.png")
        rc, rep, _ = _upscale([str(folder), "-o", str(tmp_path / "o"), "--skip-existing"], capsys, tiny_model)
        [done] = rep["files"]
        assert rc == 0 and Path(done["outputs"]["image"]).name == "page_x4.png" and done["skipped"] == (k > 0)

    old = tmp_path / "old"
    (tmp_path / "in").mkdir()
    a_png = _save(tmp_path / "in" / "a.png")
    image = torch.rand(1, 3, 40, 48)
    for stem, tag in (("a", "a.jpg 768 bytes 1700000000"), ("a-2", source_tag(a_png).split(" in ")[0])):
        save_images([(image, old / f"{stem}_x4.png"), (image[:, :1], old / f"{stem}_text_mask.png")], 95, tag)
    [job] = plan_jobs(collect_inputs([a_png]), old, 4)
    assert job.image.name == "a-2_x4.png"
