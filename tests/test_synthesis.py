"""FTSR-style synthesis: pixel-exact masks, CJK rendering, text crops, determinism, the CLI."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from training import synthesize
from training.data import synthesis as S

SIZE = 128


@pytest.fixture(scope="module")
def backgrounds(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("backgrounds")
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(getattr(skimage.data, name)()).save(d / f"{name}.png")
    return d


@pytest.fixture(scope="module")
def fonts() -> list[S.FontSpec]:
    found = S.system_fonts()
    if not found:
        pytest.skip("no system fonts found by fc-match (install fonts-dejavu / fonts-noto-cjk)")
    return found


def _noto_cjk() -> S.FontSpec | None:
    try:
        out = subprocess.run(["fc-match", "-f", "%{file}\t%{index}\t%{family}", "Noto Sans CJK SC"],
                             capture_output=True, text=True, check=False).stdout
    except FileNotFoundError:
        return None
    path, index, family = (out.split("\t") + ["", "", ""])[:3]
    if "Noto Sans CJK" not in family:
        return None
    return S.FontSpec(path, int(index or 0), latin=True, cjk=True)


@pytest.fixture(scope="module")
def cjk_font() -> S.FontSpec:
    spec = _noto_cjk()
    if spec is None:
        pytest.skip("Noto Sans CJK SC not installed (run scripts/install_test_deps.sh: fonts-noto-cjk)")
    return spec


@pytest.fixture(scope="module")
def text_crops(tmp_path_factory) -> Path:
    """TextSeg- and BTS-style folders of text crops with masks (0/255 and 0/1 masks)."""
    root = tmp_path_factory.mktemp("crops")
    rng = np.random.default_rng(0)
    for img_dir, mask_dir, mask_max in (("textseg/train_images", "textseg/train_gt", 255),
                                        ("bts/TRAIN/image", "bts/TRAIN/semantic_label", 1)):
        (root / img_dir).mkdir(parents=True)
        (root / mask_dir).mkdir(parents=True)
        for i in range(2):
            img = rng.integers(0, 255, (40, 90, 3), dtype=np.uint8)
            mask = np.zeros((40, 90), np.uint8)
            mask[10:30, 10 + 20 * i: 60 + 20 * i] = mask_max
            Image.fromarray(img).save(root / img_dir / f"c{i}.jpg")
            Image.fromarray(mask).save(root / mask_dir / f"c{i}.png")
    orphan = root / "textseg/train_images/orphan.jpg"  # an image without a mask
    orphan.write_bytes((root / "textseg/train_images/c0.jpg").read_bytes())
    return root


def test_mask_is_exactly_the_changed_pixels(backgrounds, fonts):
    synth = S.TextSynthesizer(S.list_images(backgrounds), fonts, config=S.SynthesisConfig(size=SIZE))
    placed = 0
    for seed in range(6):
        s = synth.compose(seed)
        assert s.hr.shape == (SIZE, SIZE, 3) and s.hr.dtype == np.uint8
        assert set(np.unique(s.mask)) <= {0, 255}
        changed = (s.hr != s.background).any(-1)
        assert np.array_equal(changed, s.mask > 0), f"seed {seed}: mask != changed pixels"
        for item in s.items:
            x0, y0, x1, y1 = item["box"]
            assert (s.mask[y0:y1, x0:x1] > 0).any()  # every placed item left ink in its box
            placed += 1
        inside = np.zeros_like(changed)
        for x0, y0, x1, y1 in (it["box"] for it in s.items):
            inside[y0:y1, x0:x1] = True
        assert not (changed & ~inside).any()
    assert placed >= 6


def test_text_colour_equal_to_the_background_still_changes_pixels(tmp_path, fonts, monkeypatch):
    # Text drawn in exactly the background colour would change nothing; it is nudged by one level.
    colour = (120, 60, 30)
    Image.fromarray(np.full((SIZE, SIZE, 3), colour, np.uint8)).save(tmp_path / "flat.png")
    monkeypatch.setattr(S, "_text_colour", lambda rng, under, min_contrast: colour)
    synth = S.TextSynthesizer([tmp_path / "flat.png"], fonts, config=S.SynthesisConfig(size=SIZE))
    s = synth.compose(0)
    ink = s.mask > 0
    assert ink.any()
    assert np.array_equal((s.hr != s.background).any(-1), ink)
    assert (s.hr[ink] == (121, 60, 30)).all()


def test_cjk_text_renders_with_noto(cjk_font):
    font = S.load_font(cjk_font.path, cjk_font.index, 32)
    assert S.font_renders(font, "中文字体测试")
    ink = S.render_text_mask(["中文字体"], font)
    assert ink.dtype == bool and ink.sum() > 200
    assert ink.shape[1] > 3 * ink.shape[0]  # one horizontal line of 4 square glyphs
    vertical = S.render_text_mask(["中文字体"], font, vertical=True)
    assert vertical.shape[0] > 3 * vertical.shape[1]
    rotated = S.render_text_mask(["中文字体"], font, angle=90)
    assert abs(rotated.shape[0] - ink.shape[1]) <= 3 and abs(rotated.shape[1] - ink.shape[0]) <= 3
    two = S.render_text_mask(["中文", "字体"], font)
    assert two.shape[0] > 1.5 * ink.shape[0]  # multi-line


@pytest.mark.parametrize("size", [32, 48, 61])
def test_vertical_text_keeps_the_descenders_of_its_last_glyph(cjk_font, size):
    """Defect: the vertical layer ended at the last glyph's cell, so a descender there was cut from the
    image and the mask alike (a "y" drawn as a "v")."""
    font = S.load_font(cjk_font.path, cjk_font.index, size)
    for glyph in "ygjpq":
        alone = S.render_text_mask([glyph], font)
        assert S.render_text_mask([glyph], font, vertical=True).shape == alone.shape
        column = S.render_text_mask(["D" + glyph], font, vertical=True)
        assert column.sum() == S.render_text_mask(["D"], font).sum() + alone.sum()


def test_font_probe_tells_latin_from_cjk(cjk_font):
    assert S.probe_font(cjk_font.path, cjk_font.index).cjk
    dejavu = [f for f in S.system_fonts(("DejaVu Sans",))]
    if dejavu:  # DejaVu has no CJK glyphs: its .notdef box must not count as rendered text
        assert dejavu[0].latin and not dejavu[0].cjk


def test_synthesis_is_deterministic(backgrounds, fonts):
    synth = S.TextSynthesizer(S.list_images(backgrounds), fonts, config=S.SynthesisConfig(size=SIZE))
    a, b, c = synth.sample(11), synth.sample(11), synth.sample(12)
    assert np.array_equal(a.hr, b.hr) and np.array_equal(a.mask, b.mask) and np.array_equal(a.lr, b.lr)
    assert a.items == b.items
    assert not np.array_equal(a.hr, c.hr)
    assert a.lr.shape == (SIZE // 4, SIZE // 4, 3)


def test_find_text_crops_matches_by_stem(text_crops):
    pairs = S.find_text_crops(text_crops)
    assert len(pairs) == 4  # the orphan image without a mask is skipped
    assert all(img.stem == mask.stem for img, mask in pairs)
    assert S.load_mask(pairs[0][1]).dtype == bool
    with pytest.raises(FileNotFoundError, match="no text crops found"):
        S.find_text_crops(text_crops / "textseg" / "train_gt")


def test_crops_are_pasted_with_binary_masks(backgrounds, text_crops):
    synth = S.TextSynthesizer(S.list_images(backgrounds), text_crops=S.find_text_crops(text_crops),
                              config=S.SynthesisConfig(size=SIZE))
    s = synth.compose(5)
    assert s.items and all(it["kind"] == "crop" for it in s.items)
    assert set(np.unique(s.mask)) == {0, 255}
    for it in s.items:
        x0, y0, x1, y1 = it["box"]
        m = s.mask[y0:y1, x0:x1] > 0
        assert m.any() and not m.all()  # the crop's text mask, not its rectangle
        assert (s.hr[y0:y1, x0:x1] != s.background[y0:y1, x0:x1]).any()


def test_background_text_filter(backgrounds, fonts):
    files = S.list_images(backgrounds)
    calls = []

    def has_text(img: np.ndarray) -> bool:
        calls.append(img.shape)
        return img.shape[:2] == (512, 512)  # "astronaut has text"

    synth = S.TextSynthesizer(files, fonts, has_text=has_text, config=S.SynthesisConfig(size=SIZE))
    assert len(calls) == 3 and all(c[2] == 3 for c in calls)
    assert sorted(p.name for p in synth.backgrounds) == ["chelsea.png", "coffee.png"]
    with pytest.raises(ValueError, match="contain text"):
        S.TextSynthesizer(files, fonts, has_text=lambda img: True)
    with pytest.raises(ValueError, match="no text source"):
        S.TextSynthesizer(files)


def test_sample_seed_is_stable_and_distinct():
    assert S.sample_seed(0, 1) == S.sample_seed(0, 1)
    assert len({S.sample_seed(0, i) for i in range(100)} | {S.sample_seed(1, 0)}) == 101
    assert 0 <= S.sample_seed(3, 2, 1) < 2**63


def test_cli_writes_triplets_and_manifest(tmp_path, backgrounds, fonts, capsys):
    out = tmp_path / "ftsr"
    rc = synthesize.main(["--backgrounds", str(backgrounds), "--out", str(out), "--count", "3",
                          "--size", str(SIZE), "--seed", "5", "--preset", "realesrgan"])
    assert rc == 0
    for sub, shape in (("hr", (SIZE, SIZE, 3)), ("lr", (SIZE // 4, SIZE // 4, 3)), ("mask", (SIZE, SIZE))):
        files = sorted((out / sub).iterdir())
        assert [f.name for f in files] == ["000001.png", "000002.png", "000003.png"]
        assert all(np.asarray(Image.open(f)).shape == shape for f in files)
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [rec["id"] for rec in lines] == ["000001", "000002", "000003"]
    for rec in lines:
        assert Path(rec["background"]).parent == backgrounds
        assert len(rec["texts"]) == len(rec["boxes"]) == len(rec["fonts"]) >= 1
        assert isinstance(rec["seed"], int)
        mask = np.asarray(Image.open(out / "mask" / f"{rec['id']}.png"))
        for x0, y0, x1, y1 in rec["boxes"]:
            assert mask[y0:y1, x0:x1].any()
    # Same seed, same data.
    again = tmp_path / "again"
    synthesize.main(["--backgrounds", str(backgrounds), "--out", str(again), "--count", "1",
                     "--size", str(SIZE), "--seed", "5", "--preset", "realesrgan"])
    assert (again / "hr/000001.png").read_bytes() == (out / "hr/000001.png").read_bytes()
    # A new set into the same folder replaces the old one (defect: the old files stayed beside the new,
    # the manifest naming only the new); files it did not write are refused, and kept.
    (out / "manifest.jsonl").write_text('{"id": "000001"}\n{"id": "0000')  # a set cut short by a stop
    (out / "hr" / ".DS_Store").write_bytes(b"")
    synthesize.main(["--backgrounds", str(backgrounds), "--out", str(out), "--count", "2", "--size", str(SIZE)])
    assert sorted(f.name for f in (out / "hr").iterdir()) == [".DS_Store", "000001.png", "000002.png"]
    assert len((out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()) == 2
    (out / "mask" / "mine.png").write_bytes(b"a mask of my own")
    assert synthesize.main(["--backgrounds", str(backgrounds), "--out", str(out), "--count", "1",
                            "--size", str(SIZE)]) == 2
    assert (out / "mask" / "mine.png").read_bytes() == b"a mask of my own" and len(list((out / "hr").iterdir())) == 3
    # a user's folder is refused before the built-in backgrounds are written into it (defect: they were left there)
    mine = tmp_path / "mine"
    (mine / "hr").mkdir(parents=True)
    (mine / "hr" / "scan.png").write_bytes(b"my own")
    assert synthesize.main(["--backgrounds", "skimage", "--out", str(mine), "--count", "1", "--size", str(SIZE)]) == 2
    assert sorted(p.relative_to(mine).as_posix() for p in mine.rglob("*")) == ["hr", "hr/scan.png"]
    assert f"--out {mine} holds 1 file this command did not write" in capsys.readouterr().err


def test_cli_fails_clearly_without_fonts(tmp_path, backgrounds, capsys):
    empty = tmp_path / "no_fonts"
    empty.mkdir()
    with pytest.raises(SystemExit) as e:
        synthesize.main(["--backgrounds", str(backgrounds), "--out", str(tmp_path / "o"), "--count", "1",
                         "--fonts", str(empty)])
    assert e.value.code == 2
    assert "no usable fonts" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        synthesize.main(["--backgrounds", str(tmp_path / "missing"), "--out", str(tmp_path / "o"),
                         "--count", "1"])
    assert (f"--backgrounds {tmp_path / 'missing'}: no such folder; give a folder of photos or a built-in set: "
            "skimage, skimage-all") in capsys.readouterr().err  # defect: a typo of skimage-all was not told apart


def test_an_output_that_is_a_file_is_named_before_any_work(tmp_path, capsys):
    """Defect: --out notes.txt ended in a NotADirectoryError traceback (after writing the backgrounds' folder)."""
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for out, message in ((notes, f"--out {notes} is a file; give a folder"),
                         (notes / "set", f"--out {notes / 'set'}: {notes} is a file, not a folder")):
        with pytest.raises(SystemExit) as e:
            synthesize.main(["--backgrounds", "skimage", "--out", str(out), "--count", "1", "--size", "64"])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert notes.read_text() == "mine"


def test_a_set_written_inside_its_backgrounds_folder_is_not_drawn_on_again(tmp_path, backgrounds, fonts, capsys):
    """Defect: backgrounds are listed recursively, so a second run into `--out` inside `--backgrounds`
    took the first set's HR images and text masks as "text-free" backgrounds."""
    photos = tmp_path / "photos"
    shutil.copytree(backgrounds, photos)
    argv = ["--backgrounds", str(photos), "--out", str(photos / "synth"), "--count", "6", "--size", str(SIZE)]
    assert synthesize.main(argv) == 0
    capsys.readouterr()
    assert synthesize.main(argv) == 0
    assert "left out" not in capsys.readouterr().err
    lines = (photos / "synth" / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    assert {Path(json.loads(line)["background"]).parent for line in lines} == {photos}


@pytest.mark.parametrize("size, scale, says", [(0, 4, "size 0 must be a positive multiple of scale 4"),
                                              (128, 0, "scale must be at least 1, got 0"),
                                              (130, 4, "size 130 must be a positive multiple of scale 4")])
def test_sizes_that_are_no_multiple_of_the_scale_are_refused_before_any_file(tmp_path, capsys, size, scale, says):
    """Defect: `--size 0` or `--scale 0` ended in ZeroDivisionError, after writing the built-in backgrounds."""
    with pytest.raises(SystemExit) as e:
        synthesize.main(["--backgrounds", "skimage", "--out", str(tmp_path / "o"), "--count", "1",
                         "--size", str(size), "--scale", str(scale)])
    assert e.value.code == 2 and f"--size / --scale: {says}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()



@pytest.mark.parametrize("low, high", [("0.5", "0.1"), ("0", "0")])
def test_a_font_scale_range_training_refuses_is_refused_before_any_file(tmp_path, capsys, low, high):
    """Defect: `--font-scale 0.5 0.1` and `0 0` ran (exit 0) while training refuses that data.font_scale."""
    with pytest.raises(SystemExit) as e:
        synthesize.main(["--backgrounds", "skimage", "--out", str(tmp_path / "o"), "--count", "1",
                         "--font-scale", low, high])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        f"error: --font-scale must be [smallest, largest] font size / canvas side, with 0 < smallest <= largest, "
        f"got [{float(low)}, {float(high)}]")
    assert not (tmp_path / "o").exists()

def test_built_in_backgrounds_are_rewritten_for_another_size(tmp_path):
    """Defect: a backgrounds folder written for 128 px was reused at any later size (GT upscaled from
    thumbnails, and the warning blamed the photos)."""
    from training.builders import write_backgrounds

    folder = write_backgrounds("procedural", tmp_path / "bg", 128, 0)
    assert {Image.open(p).size for p in folder.glob("*.png")} == {(128, 128)}
    write_backgrounds("procedural", folder, 256, 0)
    assert {Image.open(p).size for p in folder.glob("*.png")} == {(256, 256)}
    (folder / "COMPLETE").write_text("field_0\nfield_1\n")            # a folder of an older version: names only
    write_backgrounds("procedural", folder, 64, 0)
    assert {Image.open(p).size for p in folder.glob("*.png")} == {(64, 64)}
    write_backgrounds("skimage", folder, 64, 0)                       # another kind: none of the old images stay
    assert not list(folder.glob("field_*.png")) and len(list(folder.glob("*.png"))) == 5


def test_the_astronaut_background_leaves_out_the_text_on_her_suit(tmp_path):
    """Defect: scikit-image's astronaut, a "text-free" background, wears a mission patch ("COLLINS
    ASHBY ...") and a name tag below row 330, which synthesis labelled as background; a folder written
    before still holds the whole photo and is written again."""
    from training.builders import write_backgrounds

    folder = tmp_path / "bg"
    folder.mkdir()
    Image.fromarray(skimage.data.astronaut()).save(folder / "astronaut.png")
    (folder / "COMPLETE").write_text(json.dumps({"kind": "skimage", "max_side": 512, "seed": 0,
                                                 "images": ["astronaut"]}) + "\n")
    write_backgrounds("skimage", folder, 512, 0)
    kept = np.asarray(Image.open(folder / "astronaut.png"))
    assert np.array_equal(kept, skimage.data.astronaut()[:330])
