"""The trainer's data: `tadisr-synthesize` and the synthesised training set (backgrounds left out by name,
validation crops), and Real-CE sets with and without text masks as configs name them."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.tiny_training import TINY, run, tiny_overrides, train_lines
from training.config import ConfigError, load_config


def test_synthesize_leaves_out_unreadable_backgrounds_up_front(tmp_path, capsys):
    import skimage.data
    from PIL import Image

    from training import synthesize
    from training.data.synthesis import system_fonts

    if not system_fonts():
        pytest.skip("no system fonts found by fc-match (install fonts-dejavu / fonts-noto-cjk)")
    folder = tmp_path / "backgrounds"
    folder.mkdir()
    Image.fromarray(skimage.data.coffee()).save(folder / "a_coffee.png")
    Image.fromarray(skimage.data.chelsea()).save(folder / "b_torn.png")
    torn = folder / "b_torn.png"
    torn.write_bytes(torn.read_bytes()[:2000])  # a truncated download
    out = tmp_path / "out"
    argv = ["--backgrounds", str(folder), "--out", str(out), "--count", "6", "--size", "64"]
    assert synthesize.main(argv) == 0
    assert len(list((out / "hr").glob("*.png"))) == 6
    said = capsys.readouterr()
    assert said.out == f"6 scenes written to {out}: hr/, lr/ and mask/ (x4), manifest.jsonl\n"  # it said nothing
    err = said.err
    assert "1 of 2 backgrounds cannot be read" in err and "b_torn.png" in err and "a_coffee.png" not in err
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert {Path(r["background"]).name for r in manifest} == {"a_coffee.png"}

    (folder / "a_coffee.png").write_bytes(b"not an image")
    empty_out = tmp_path / "none"
    assert synthesize.main(["--backgrounds", str(folder), "--out", str(empty_out), "--count", "2"]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "check backgrounds" not in ln]
    assert lines == [f"error: none of the 2 images in --backgrounds {folder} can be read"]
    assert not empty_out.exists()  # nothing half-written


def test_backgrounds_smaller_than_the_crop_are_named(tmp_path, capsys):
    """They are upscaled to the crop, blurring the ground truth: the synthesis command and the trainer say which."""
    import skimage.data
    from PIL import Image

    from training import synthesize
    from training.builders import build_datasets
    from training.data.synthesis import system_fonts

    if not system_fonts():
        pytest.skip("no system fonts found by fc-match (install fonts-dejavu / fonts-noto-cjk)")
    folder = tmp_path / "backgrounds"
    folder.mkdir()
    Image.fromarray(skimage.data.coffee()).save(folder / "coffee.png")  # 600x400
    Image.fromarray(skimage.data.chelsea()[:40, :48]).save(folder / "thumb.png")
    assert synthesize.main(["--backgrounds", str(folder), "--out", str(tmp_path / "out"), "--count", "1",
                            "--size", "64"]) == 0
    warning = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning")]
    assert warning == [f"warning: 1 of 2 backgrounds are under the 64 px crop (--size) on their short side and are "
                       f"upscaled to it, which blurs the ground truth: {folder / 'thumb.png'} (48x40). Use photos at "
                       f"least 64 px on the short side, or a smaller --size."]
    said = []
    cfg = load_config(TINY, [f"data.backgrounds={json.dumps(str(folder))}", "data.crop=64", "data.val_size=0"])
    build_datasets(cfg, tmp_path / "run", log=said.append)
    assert len(said) == 1 and "thumb.png (48x40)" in said[0] and "coffee" not in said[0]
    assert said[0].endswith("or a smaller data.crop.")
    build_datasets(load_config(TINY, [f"data.backgrounds={json.dumps(str(folder))}", "data.crop=32"]),
                   tmp_path / "run", log=said.append)
    assert len(said) == 1  # none under 32 px


def test_synthesised_validation_takes_data_val_crop(tmp_path):
    """Defect: `data.val_crop` was ignored for `data.kind: synth` (validation used data.crop). Validation
    scenes are val_crop wide, training ones crop wide; backgrounds under a larger val_crop are named."""
    from training.builders import build_datasets
    from training.data.synthesis import system_fonts

    if not system_fonts():
        pytest.skip("no system fonts found by fc-match (install fonts-dejavu / fonts-noto-cjk)")
    said = []
    train, val = build_datasets(load_config(TINY, ["data.val_crop=128", "data.val_size=1"]), tmp_path / "run",
                                log=said.append)
    assert not said
    for items, side in ((train, 64), (val, 128)):
        item = items[0]
        assert (tuple(item["hr"].shape[-2:]), tuple(item["lr"].shape[-2:])) == ((side, side), (side // 4, side // 4))
    assert tuple(build_datasets(load_config(TINY), tmp_path / "run", log=None)[1][0]["hr"].shape[-2:]) == (64, 64)
    build_datasets(load_config(TINY, ["data.val_crop=512"]), tmp_path / "run", log=said.append)  # photos of 256 px
    assert len(said) == 1 and said[0].startswith("warning: 5 of 5 backgrounds are under the 512 px crop "
                                                 "(data.val_crop)")


def test_a_damaged_background_is_left_out_of_training_by_name(tmp_path, caplog):
    """Defect: one unreadable photo in data.backgrounds failed every sample drawn on it, and its repeats
    counted as >100 different damaged samples, aborting the run. It is now named once and left out, when
    first drawn (not by reading every photo at each start), and a seed still gives the same scene."""
    import logging

    import skimage
    from PIL import Image

    from training.builders import build_datasets

    folder = tmp_path / "backgrounds"
    folder.mkdir()
    Image.fromarray(skimage.data.coffee()).save(folder / "coffee.png")
    (folder / "torn.jpg").write_bytes(b"\xff\xd8\xff\xe0 torn download")
    cfg = load_config(TINY, [f"data.backgrounds={json.dumps(str(folder))}", "data.crop=64", "data.val_size=0"])
    with caplog.at_level(logging.WARNING, logger="tadisr"):
        train, _ = build_datasets(cfg, tmp_path / "run", log=None)
        first = [train[i] for i in range(6)]
    left_out = [r.getMessage() for r in caplog.records if "background left out" in r.getMessage()]
    assert len(left_out) == 1 and "torn.jpg" in left_out[0]
    assert train.synth.unreadable == {folder / "torn.jpg"}
    fresh, _ = build_datasets(cfg, tmp_path / "run", log=None)  # has not met the torn file yet
    for i in (5, 0):
        assert torch.equal(fresh[i]["hr"], first[i]["hr"])
    (folder / "coffee.png").unlink()
    with pytest.raises(ValueError, match=r"none of the 1 backgrounds could be read \(e\.g\. .*torn\.jpg"):
        build_datasets(cfg, tmp_path / "run", log=None)[0][0]


def _realce_without_masks(root: Path) -> Path:
    """A tiny Real-CE set (LR registered at the HR size, list file) with no mask folder."""
    import skimage.data
    from PIL import Image

    for sub in ("13mm_aligned_1024", "52mm_aligned_1024"):
        (root / sub).mkdir(parents=True)
    hr = skimage.data.coffee()[100:164, 200:264]
    lr = Image.fromarray(hr).resize((16, 16), Image.BICUBIC).resize((64, 64), Image.BICUBIC)
    for i in range(2):
        Image.fromarray(hr).save(root / "52mm_aligned_1024" / f"img_{i}.png")
        lr.save(root / "13mm_aligned_1024" / f"img_{i}.png")
    (root / "list.txt").write_text("img_0.png\nimg_1.png\n")
    return root


def test_a_realce_set_without_masks_is_configured_in_yaml_and_trains_on_image_terms(tmp_path, lpips_dir, capsys):
    """Defect: RealCEDataset reads a set without text masks (`mask_dir=None`), but no config could say so
    (`data.mask_dir: null` was refused as not text, and Real-CE never read data.mask_dir). Now it can,
    and the loss terms that read the mask (all zero here) are refused by name, before any model is built."""
    import yaml

    from training.builders import build_datasets
    from training.train import Trainer
    from training.train import main as train_main

    root = _realce_without_masks(tmp_path / "realce")
    data = yaml.safe_load(TINY.read_text())
    data["data"] = {"kind": "realce", "root": str(root), "list_file": "list.txt", "mask_dir": None, "crop": 64,
                    "scale": 4}
    config = tmp_path / "realce.yaml"
    config.write_text(yaml.safe_dump(data))
    cfg = load_config(config, tiny_overrides(tmp_path / "run", lpips_dir, train__max_steps=1))
    assert cfg.data.mask_dir is None
    train, val = build_datasets(cfg, tmp_path / "run", log=None)
    assert len(train) == 2 and val is None
    assert train[0]["hr"].shape == (3, 64, 64) and train[0]["lr"].shape == (3, 16, 16)
    assert train[0]["mask"].shape == (1, 64, 64) and train[0]["mask"].sum() == 0

    with pytest.raises(ConfigError, match=r"the loss terms mfl, mask_mse, mask_focal, mask_dice read the text mask "
                                          r"\(loss\.preset = paper\): set them to 0 \(--set loss\.mfl=0 "):
        Trainer(cfg)
    assert not (tmp_path / "run").exists()  # refused before the run folder, the data or the model
    assert train_main(["--config", str(config), "--set", "loss.preset=release",
                       *[f"--set={o}" for o in tiny_overrides(tmp_path / "run", lpips_dir)]]) == 2
    assert "the loss terms mask_mse, mask_focal, mask_dice read" in capsys.readouterr().err
    image_only = load_config(config, tiny_overrides(tmp_path / "run", lpips_dir, train__max_steps=1, loss__mfl=0,
                                                    loss__mask_mse=0, loss__mask_focal=0, loss__mask_dice=0))
    assert run(image_only)["step"] == 1
    assert set(train_lines(tmp_path / "run")[0]) & {"mse", "lpips", "mfl", "mask_dice"} == {"mse", "lpips"}
    with pytest.raises(ConfigError, match=r"data\.mask_dir = null \(a set without text masks\) is for data\.kind = "
                                          r"realce; data\.kind = triplets needs its masks"):
        load_config(TINY, ["data.kind=triplets", f"data.root={json.dumps(str(root))}", "data.mask_dir=null"])


def test_realce_reads_the_folders_the_config_names(tmp_path):
    """Defect: data.hr_dir / lr_dir / mask_dir were ignored for data.kind = realce: a mask folder named
    but absent trained on the default mask-52mm-bts-1024-v2 without a word. Named folders are read now,
    and the defaults (hr, lr, mask) still read Real-CE's own folders."""
    import numpy as np
    from PIL import Image

    from training.builders import build_datasets

    root = _realce_without_masks(tmp_path / "realce")
    text = np.zeros((64, 64), np.uint8)
    text[8:24, 16:48] = 255
    (root / "mask-52mm-bts-1024-v2").mkdir()
    (root / "masks_v3").mkdir()
    for i in range(2):
        Image.fromarray(np.zeros_like(text)).save(root / "mask-52mm-bts-1024-v2" / f"img_{i}.png")
        Image.fromarray(text).save(root / "masks_v3" / f"img_{i}.png")
    shutil.copytree(root / "52mm_aligned_1024", root / "gt")
    shutil.copytree(root / "13mm_aligned_1024", root / "lq")
    realce = ["data.kind=realce", f"data.root={json.dumps(str(root))}", "data.list_file=list.txt", "data.crop=64"]

    default, _ = build_datasets(load_config(TINY, realce), tmp_path / "run", log=None)
    assert default.items[0][1] == {"lr": root / "13mm_aligned_1024" / "img_0.png",
                                   "hr": root / "52mm_aligned_1024" / "img_0.png",
                                   "mask": root / "mask-52mm-bts-1024-v2" / "img_0.png"}
    named, _ = build_datasets(load_config(TINY, [*realce, "data.hr_dir=gt", "data.lr_dir=lq",
                                                 "data.mask_dir=masks_v3"]), tmp_path / "run", log=None)
    assert named.items[0][1] == {"lr": root / "lq" / "img_0.png", "hr": root / "gt" / "img_0.png",
                                 "mask": root / "masks_v3" / "img_0.png"}
    assert int(named[0]["mask"].sum()) == 16 * 32
    with pytest.raises(FileNotFoundError, match=r"missing Real-CE folder \S*masks_v4 \(data\.mask_dir\); a set "
                                                r"without text masks: data\.mask_dir: null"):
        build_datasets(load_config(TINY, [*realce, "data.mask_dir=masks_v4"]), tmp_path / "run", log=None)
    with pytest.raises(ConfigError, match=r"data\.lr_dir = null \(LR degraded on the fly\) is for data\.kind = "
                                          r"triplets; data\.kind = realce reads its LR folder"):
        load_config(TINY, [*realce, "data.lr_dir=null"])


def test_realce_with_folders_named_hr_lr_mask_reads_them(tmp_path):
    """Defect: a Real-CE copy laid out as hr/, lr/, mask/, named so in the config, read Real-CE's default
    folders instead (the names equal the defaults), and the error named the wrong folder."""
    from training.builders import build_datasets

    root = _realce_without_masks(tmp_path / "realce")
    (root / "52mm_aligned_1024").rename(root / "hr")
    (root / "13mm_aligned_1024").rename(root / "lr")
    realce = ["data.kind=realce", f"data.root={json.dumps(str(root))}", "data.list_file=list.txt", "data.crop=64",
              "data.mask_dir=null"]
    for given in ([], ["data.hr_dir=hr", "data.lr_dir=lr"]):
        train, _ = build_datasets(load_config(TINY, [*realce, *given]), tmp_path / "run", log=None)
        assert train.items[0][1] == {"lr": root / "lr" / "img_0.png", "hr": root / "hr" / "img_0.png"}
