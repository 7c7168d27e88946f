"""Training datasets: FTSR triplet folders, Real-CE lists, on-the-fly synthesis; aligned shapes."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from PIL import Image

from training.data import datasets as DS
from training.data.synthesis import system_fonts

HR = 128


def _photos() -> list[np.ndarray]:
    return [skimage.data.astronaut()[:HR * 2:2, :HR * 2:2], skimage.data.coffee()[100:100 + HR, 200:200 + HR]]


def _area_down(hr: np.ndarray, scale: int) -> np.ndarray:
    t = torch.from_numpy(hr).permute(2, 0, 1)[None].float()
    return F.avg_pool2d(t, scale)[0].permute(1, 2, 0).round().byte().numpy()


def _text_mask(i: int) -> np.ndarray:
    m = np.zeros((HR, HR), np.uint8)
    m[20 + 10 * i: 60, 30: 100 - 10 * i] = 255
    return m


@pytest.fixture(scope="module")
def triplets(tmp_path_factory) -> Path:
    """hr/ + lr/ (exact 4x area downscale, so alignment is checkable) + mask/."""
    root = tmp_path_factory.mktemp("ftsr")
    for sub in ("hr", "lr", "mask"):
        (root / sub).mkdir()
    for i, hr in enumerate(_photos()):
        Image.fromarray(hr).save(root / "hr" / f"{i:06d}.png")
        Image.fromarray(_area_down(hr, 4)).save(root / "lr" / f"{i:06d}.png")
        Image.fromarray(_text_mask(i)).save(root / "mask" / f"{i:06d}.png")
    return root


def _check_item(item: dict, h: int, w: int, scale: int = 4) -> None:
    assert item["hr"].shape == (3, h, w) and item["lr"].shape == (3, h // scale, w // scale)
    assert item["mask"].shape == (1, h, w)
    for key in ("lr", "hr", "mask"):
        assert item[key].dtype == torch.float32 and 0 <= item[key].min() and item[key].max() <= 1
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert isinstance(item["name"], str)


def _assert_aligned(item: dict, scale: int = 4) -> None:
    down = F.avg_pool2d(item["hr"][None], scale)[0]
    assert (down - item["lr"]).abs().max() < 1.5 / 255


def test_triplets_full_and_cropped_are_aligned(triplets):
    ds = DS.TripletFolderDataset(triplets)
    assert len(ds) == 2 and ds[1]["name"] == "000001"
    item = ds[0]
    _check_item(item, HR, HR)
    _assert_aligned(item)
    assert item["mask"].sum() == (_text_mask(0) > 0).sum()
    cropped = DS.TripletFolderDataset(triplets, crop=64, seed=3)
    for i in range(2):
        item = cropped[i]
        _check_item(item, 64, 64)
        _assert_aligned(item)
    assert torch.equal(cropped[0]["hr"], cropped[0]["hr"])  # seeded: same crop every time
    crops = {tuple(DS.TripletFolderDataset(triplets, crop=64)[0]["lr"][0, 0, :4].tolist()) for _ in range(6)}
    assert len(crops) > 1  # unseeded: random crops


def test_triplets_without_lr_degrade_on_the_fly(triplets, tmp_path):
    root = tmp_path / "no_lr"
    for sub in ("hr", "mask"):
        (root / sub).mkdir(parents=True)
        for f in (triplets / sub).iterdir():
            (root / sub / f.name).write_bytes(f.read_bytes())
    ds = DS.TripletFolderDataset(root, crop=64, seed=0, preset="ftsr")
    a, b = ds[0], ds[0]
    _check_item(a, 64, 64)
    assert torch.equal(a["lr"], b["lr"]) and torch.equal(a["hr"], b["hr"])
    down = F.avg_pool2d(a["hr"][None], 4)[0]
    assert 0.005 < (down - a["lr"]).abs().mean() < 0.25  # degraded, but still the same picture


def test_whole_images_are_trimmed_to_the_latent_grid(tmp_path):
    """Defect: with data.crop null a whole image whose side was not a multiple of 8 x scale (132 x 100
    here) reached the model and crashed the run with a traceback ("multiples of 8"), naming no file."""
    hr = skimage.data.astronaut()[:100, :132]
    mask = np.zeros(hr.shape[:2], np.uint8)
    mask[10:40, 20:90] = 255
    for layout in ("lr", "no_lr"):
        root = tmp_path / layout
        for sub in ("hr", "mask") + (("lr",) if layout == "lr" else ()):
            (root / sub).mkdir(parents=True)
        Image.fromarray(hr).save(root / "hr" / "a.png")
        Image.fromarray(mask).save(root / "mask" / "a.png")
        if layout == "lr":
            Image.fromarray(_area_down(hr, 4)).save(root / "lr" / "a.png")  # 33 x 25
        item = DS.TripletFolderDataset(root, seed=0, preset="ftsr")[0]
        _check_item(item, 96, 128)  # trimmed at the bottom and right: 32 x 24 LR px, each 8-px cells
        assert torch.equal(item["mask"][0] > 0, torch.from_numpy(mask[:96, :128] > 0))
        if layout == "lr":
            _assert_aligned(item)
            assert torch.equal(item["hr"], torch.from_numpy(hr[:96, :128]).permute(2, 0, 1).float() / 255)


def test_triplet_errors_name_the_missing_thing(triplets, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing folder .*mask"):
        (tmp_path / "x" / "hr").mkdir(parents=True)
        DS.TripletFolderDataset(tmp_path / "x")
    root = tmp_path / "y"
    for sub in ("hr", "mask"):
        (root / sub).mkdir(parents=True)
    Image.fromarray(_photos()[0]).save(root / "hr" / "a.png")
    with pytest.raises(FileNotFoundError, match=r"no mask for .*a\.png"):
        DS.TripletFolderDataset(root)
    with pytest.raises(ValueError, match="not divisible"):
        DS.TripletFolderDataset(triplets, crop=62)
    with pytest.raises(ValueError, match="smaller than the LR crop"):
        DS.TripletFolderDataset(triplets, crop=256)[0]


@pytest.fixture(scope="module")
def realce(tmp_path_factory) -> Path:
    """Real-CE layout: LR registered at HR size (.JPG), HR (.JPG), masks (.png), list files."""
    root = tmp_path_factory.mktemp("realce")
    for sub in ("13mm_aligned_1024", "52mm_aligned_1024", "mask-52mm-bts-1024-v2"):
        (root / sub).mkdir()
    names = []
    for i, hr in enumerate(_photos()):
        name = f"img_{i}"
        lr_small = _area_down(hr, 4)
        lr_big = np.asarray(Image.fromarray(lr_small).resize((HR, HR), Image.BICUBIC))
        Image.fromarray(lr_big).save(root / "13mm_aligned_1024" / f"{name}.JPG", quality=98)
        Image.fromarray(hr).save(root / "52mm_aligned_1024" / f"{name}.JPG", quality=98)
        Image.fromarray(_text_mask(i)).save(root / "mask-52mm-bts-1024-v2" / f"{name}.png")
        names.append(name + ".JPG")
    (root / "aligned_list_train.txt").write_text("\n".join(names) + "\n\n")
    return root


def test_realce_pairs_are_downscaled_and_aligned(realce):
    ds = DS.RealCEDataset(realce, "aligned_list_train.txt")
    assert len(ds) == 2
    item = ds[1]
    _check_item(item, HR, HR)
    assert item["name"] == "img_1"
    down = F.avg_pool2d(item["hr"][None], 4)[0]
    assert (down - item["lr"]).abs().mean() < 0.05  # same content at the same place
    cropped = DS.RealCEDataset(realce, realce / "aligned_list_train.txt", crop=64, seed=1)[0]
    _check_item(cropped, 64, 64)
    assert (F.avg_pool2d(cropped["hr"][None], 4)[0] - cropped["lr"]).abs().mean() < 0.05
    no_mask = DS.RealCEDataset(realce, "aligned_list_train.txt", mask_dir=None)[0]
    assert no_mask["mask"].sum() == 0


def test_realce_errors(realce, tmp_path):
    with pytest.raises(FileNotFoundError, match="list file not found"):
        DS.RealCEDataset(realce, "nope.txt")
    bad = tmp_path / "list.txt"
    bad.write_text("ghost.JPG\n")
    with pytest.raises(FileNotFoundError, match="ghost.JPG .*13mm_aligned_1024"):
        DS.RealCEDataset(realce, bad)
    with pytest.raises(FileNotFoundError, match="missing Real-CE folder"):
        DS.RealCEDataset(realce, "aligned_list_train.txt", mask_dir="masks_v3")


def test_files_sharing_a_stem_are_refused_by_name(triplets, tmp_path):
    """Defect: gt/0001.png beside gt/0001.jpg silently trained on one of them."""
    import shutil

    root = tmp_path / "twice"
    shutil.copytree(triplets, root)
    first = sorted((root / "hr").iterdir())[0]
    Image.open(first).convert("RGB").save(first.with_suffix(".jpg"))
    with pytest.raises(ValueError, match=rf"several files share the stem '{first.stem}' in \S*hr: "
                                         rf"{first.stem}\.jpg, {first.stem}\.png; keep one"):
        DS.TripletFolderDataset(root)


def test_on_the_fly_synthesis(tmp_path):
    fonts = system_fonts()
    if not fonts:
        pytest.skip("no system fonts found by fc-match (install fonts-dejavu / fonts-noto-cjk)")
    Image.fromarray(skimage.data.chelsea()).save(tmp_path / "chelsea.png")
    ds = DS.OnTheFlySynthesisDataset(tmp_path, fonts=fonts, length=3, size=HR, seed=4)
    assert len(ds) == 3
    a = ds[1]
    _check_item(a, HR, HR)
    assert a["mask"].sum() > 0
    assert torch.equal(ds[1]["hr"], a["hr"]) and torch.equal(ds[1]["lr"], a["lr"])
    ds.set_epoch(1)
    assert not torch.equal(ds[1]["hr"], a["hr"])
    with pytest.raises(IndexError):
        ds[3]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["lr"].shape == (2, 3, HR // 4, HR // 4) and batch["mask"].shape == (2, 1, HR, HR)


def test_the_authors_ftsr_layout_is_read_with_its_upscaled_lr_as_the_model_input(tmp_path):
    """Defect: the released FTSR layout (gt/, sr_bicubic/: the LR bicubic-upscaled back to the HR size,
    mask/) could not be used: no config key named its folders, and LR files had to be 1/scale."""
    from tadisr_core.pipeline import upscale_canvas

    for sub in ("gt", "sr_bicubic", "mask"):
        (tmp_path / sub).mkdir()
    hr = _photos()[0]
    up = upscale_canvas(torch.from_numpy(_area_down(hr, 4)).permute(2, 0, 1)[None].float() / 255, 4)
    up_png = (up[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(up_png).save(tmp_path / "sr_bicubic" / "0000201.png")
    Image.fromarray(hr).save(tmp_path / "gt" / "0000201.png")
    Image.fromarray(_text_mask(0)).save(tmp_path / "mask" / "0000201.png")
    ds = DS.TripletFolderDataset(tmp_path, hr_dir="gt", lr_dir="sr_bicubic", mask_dir="mask")
    item = ds[0]
    assert item["lr"].shape == item["hr"].shape == (3, HR, HR)
    assert torch.equal(DS.model_input(item["lr"][None], (HR, HR), 4), item["lr"][None])  # taken as it is
    assert (item["lr"][None] - up).abs().max() <= 0.5 / 255  # the upscale the trainer would have made
    cropped = DS.TripletFolderDataset(tmp_path, crop=64, seed=2, hr_dir="gt", lr_dir="sr_bicubic")[0]
    assert cropped["lr"].shape == cropped["hr"].shape == (3, 64, 64)
    assert (F.avg_pool2d(cropped["hr"][None], 4) - F.avg_pool2d(cropped["lr"][None], 4)).abs().mean() < 0.05
    with pytest.raises(FileNotFoundError, match=r"missing LR folder .*sr_bicubc \(data\.lr_dir\); set data\.lr_dir: "
                                                r"null to degrade"):
        DS.TripletFolderDataset(tmp_path, hr_dir="gt", lr_dir="sr_bicubc")  # a typo is not taken for "degrade"
    degraded = DS.TripletFolderDataset(tmp_path, crop=64, seed=2, hr_dir="gt", lr_dir=None, preset="ftsr")[0]
    assert degraded["lr"].shape == (3, 16, 16) and degraded["hr"].shape == (3, 64, 64)
    with pytest.raises(FileNotFoundError, match=r"the authors' FTSR layout: set data\.hr_dir: gt and "
                                                r"data\.lr_dir: sr_bicubic"):
        DS.TripletFolderDataset(tmp_path)


def _realce_copy(realce: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(realce, dst)
    return dst


def test_realce_mask_of_another_shape_is_refused_not_stretched(realce, tmp_path):
    """Defect: any mask was resized to the HR size, so a sideways (EXIF) mask or the mask of another
    image was silently stretched; a mask at another resolution of the same aspect is still resized."""
    root = _realce_copy(realce, tmp_path / "rc")
    masks, hr_file = root / "mask-52mm-bts-1024-v2", root / "52mm_aligned_1024" / "img_0.JPG"
    for f in (hr_file, root / "13mm_aligned_1024" / "img_0.JPG"):  # 96 x 128: a sideways mask shows
        Image.fromarray(np.array(Image.open(f))[:, :96]).save(f, quality=98)
    Image.fromarray(_text_mask(0)[:, :96][::2, ::2]).save(masks / "img_0.png")  # half size: 48 x 64
    item = DS.RealCEDataset(root, "aligned_list_train.txt")[0]
    assert torch.equal(item["mask"][0] > 0, torch.from_numpy(_text_mask(0)[:, :96] > 0))
    Image.fromarray(np.ascontiguousarray(_text_mask(0)[:, :96].T)).save(masks / "img_0.png")  # 128 x 96
    with pytest.raises(ValueError) as err:
        DS.RealCEDataset(root, "aligned_list_train.txt")[0]
    assert str(err.value) == (f"mask {masks / 'img_0.png'} is 128x96, HR {hr_file} is 96x128: a different aspect "
                              "ratio; it is the HR turned sideways: likely an EXIF orientation one of them was "
                              "saved with, so save the mask upright as the HR displays")
    Image.fromarray(np.zeros((50, 300), np.uint8)).save(masks / "img_0.png")
    with pytest.raises(ValueError) as err:
        DS.RealCEDataset(root, "aligned_list_train.txt")[0]
    assert str(err.value) == (f"mask {masks / 'img_0.png'} is 300x50, HR {hr_file} is 96x128: a different aspect "
                              "ratio; is it the mask of another image?")


@pytest.mark.parametrize("rounding", ["floor", "ceil"])
def test_triplet_lr_of_a_rounded_quarter_is_accepted_and_aligned(tmp_path, rounding):
    """Defect: an HR side not divisible by 4 (250 x 255) with an LR of floor (62 x 63) or ceil (63 x 64)
    of a quarter was refused as damaged; now the pair is trimmed to the pixels both cover."""
    hr = skimage.data.astronaut()[:255, :250]
    mask = np.zeros(hr.shape[:2], np.uint8)
    mask[10:40, 20:90] = 255
    if rounding == "floor":
        lr = _area_down(hr[:252, :248], 4)
    else:
        lr = _area_down(np.pad(hr, ((0, 1), (0, 2), (0, 0)), mode="edge"), 4)
    assert lr.shape[:2] == ((63, 62) if rounding == "floor" else (64, 63))
    root = tmp_path / "t"
    for sub in ("hr", "lr", "mask"):
        (root / sub).mkdir(parents=True)
    Image.fromarray(hr).save(root / "hr" / "a.png")
    Image.fromarray(lr).save(root / "lr" / "a.png")
    Image.fromarray(mask).save(root / "mask" / "a.png")
    item = DS.TripletFolderDataset(root)[0]
    _check_item(item, 224, 224)  # 62 x 63 LR px, trimmed to whole 8-px latent cells: 56 x 56
    assert torch.equal(item["hr"], torch.from_numpy(hr[:224, :224]).permute(2, 0, 1).float() / 255)
    assert torch.equal(item["lr"], torch.from_numpy(lr[:56, :56]).permute(2, 0, 1).float() / 255)
    assert torch.equal(item["mask"][0] > 0, torch.from_numpy(mask[:224, :224] > 0))
    for i in range(6):  # random crops may reach the last LR pixel both cover, never the extra one
        item = DS.TripletFolderDataset(root, crop=240, seed=i)[0]
        _check_item(item, 240, 240)
        _assert_aligned(item)
    bad = _area_down(hr[:248, :248], 4)  # 62 x 62: 7 HR rows short of 255, more than one LR pixel
    Image.fromarray(bad).save(root / "lr" / "a.png")
    with pytest.raises(ValueError, match=r"LR .*a\.png is 62x62; expected 1/4 of HR .*a\.png \(250x255\)"):
        DS.TripletFolderDataset(root)[0]


def test_realce_list_file_bom_backslashes_and_utf16(realce, tmp_path):
    """Defect: a Notepad list file (UTF-8 BOM, Windows paths) named no image, and a UTF-16 one crashed
    with a UnicodeDecodeError."""
    listed = tmp_path / "list.txt"
    listed.write_bytes(b"\xef\xbb\xbf" + "52mm\\img_0.JPG\r\nsub\\img_1.JPG\r\n".encode())
    ds = DS.RealCEDataset(realce, listed)
    assert [stem for stem, _ in ds.items] == ["img_0", "img_1"]
    listed.write_text("img_0.JPG\n", encoding="utf-16")
    with pytest.raises(ValueError) as err:
        DS.RealCEDataset(realce, listed)
    assert str(err.value) == f"Real-CE list file {listed} is not UTF-8 text (UTF-16?); save it as UTF-8"


def test_realce_lr_resized_from_an_odd_hr_size_stays_aligned(tmp_path):
    """Defect: an LR registered at the size of a 70 x 67 HR was resized to 17 x 16 as it was (a factor of
    4.12 x 4.19), so LR pixel (i, j) drifted off HR block (4i, 4j) by up to 3 HR px; now the pair is first
    trimmed to 68 x 64 (top-left kept) and the LR downscaled by exactly 4."""
    hr = skimage.data.astronaut()[100:167, 150:220]  # 70 x 67: neither side divisible by 4
    mask = np.zeros(hr.shape[:2], np.uint8)
    mask[5:30, 10:60] = 255
    root = tmp_path / "rc"
    for sub, img in (("13mm_aligned_1024", hr), ("52mm_aligned_1024", hr), ("mask-52mm-bts-1024-v2", mask)):
        (root / sub).mkdir(parents=True)
        Image.fromarray(img).save(root / sub / "a.png")  # the LR is the HR itself: its exact downscale is known
    (root / "list.txt").write_text("a.png\n")
    item = DS.RealCEDataset(root, "list.txt")[0]
    quarter = np.asarray(Image.fromarray(hr[:64, :68]).resize((17, 16), Image.BICUBIC))
    assert torch.equal(item["lr"], DS.image_tensor(quarter[:16, :16]))  # 16 x 17 LR px -> whole latent cells
    assert torch.equal(item["hr"], DS.image_tensor(hr[:64, :64]))
    assert torch.equal(item["mask"], DS.mask_tensor(mask[:64, :64]))
    crop = DS.RealCEDataset(root, "list.txt", crop=48, seed=3)[0]
    lr_full = DS.image_tensor(quarter)
    hr_full = DS.image_tensor(hr[:64, :68])
    hits = [(y, x) for y in range(5) for x in range(6) if torch.equal(crop["lr"], lr_full[:, y:y + 12, x:x + 12])]
    assert len(hits) == 1
    y, x = hits[0]
    assert torch.equal(crop["hr"], hr_full[:, 4 * y:4 * y + 48, 4 * x:4 * x + 48])


@pytest.mark.parametrize("lr_size", [(17, 16), (18, 17)])  # floor and ceil of 70 x 67 / 4
def test_realce_takes_a_quarter_lr_rounded_either_way_as_triplets_do(tmp_path, lr_size):
    """Defect: Real-CE refused an LR of ceil(HR / 4) that triplets accept (the size rule was written twice);
    both now trim the pair to the pixels both cover."""
    hr = skimage.data.astronaut()[100:167, 150:220]  # 70 x 67
    lr = np.asarray(Image.fromarray(hr).resize(lr_size, Image.BICUBIC))
    root = tmp_path / "rc"
    for sub, img in (("13mm_aligned_1024", lr), ("52mm_aligned_1024", hr)):
        (root / sub).mkdir(parents=True)
        Image.fromarray(img).save(root / sub / "a.png")
    (root / "list.txt").write_text("a.png\n")
    item = DS.RealCEDataset(root, "list.txt", mask_dir=None)[0]
    assert torch.equal(item["lr"], DS.image_tensor(lr[:16, :16]))
    assert torch.equal(item["hr"], DS.image_tensor(hr[:64, :64]))


def test_triplets_without_lr_say_once_that_they_degrade_on_the_fly(triplets, tmp_path, caplog):
    """Defect: a triplet set without an LR folder degraded every HR on the fly without a word; now one INFO
    line (logger "tadisr") names the folder and the preset, and build_datasets tells the training log once."""
    import logging

    from training.builders import build_datasets
    from training.config import load_config

    root = tmp_path / "no_lr"
    for sub in ("hr", "mask"):
        shutil.copytree(triplets / sub, root / sub)
    with caplog.at_level(logging.INFO, logger="tadisr"):
        DS.TripletFolderDataset(root, preset="realesrgan")
        DS.TripletFolderDataset(triplets)  # an LR folder: nothing to say
        DS.TripletFolderDataset(triplets, lr_dir=None, preset="bicubic")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", f"{root}: no lr/ folder, so each LR is degraded on the fly from its HR with the 'realesrgan' "
                 "degradation preset (data.degradation)"),
        ("INFO", f"{triplets}: data.lr_dir: null, so each LR is degraded on the fly from its HR with the 'bicubic' "
                 "degradation preset (data.degradation)")]
    said = []
    tiny = Path(__file__).resolve().parents[1] / "training" / "configs" / "tiny.yaml"
    data = ["data.kind=triplets", f"data.root={root}", f"data.val_root={root}", "data.degradation=ftsr"]
    build_datasets(load_config(tiny, data), tmp_path / "run", log=said.append)
    assert said == [f"{root}: no lr/ folder, so each LR is degraded on the fly from its HR with the 'ftsr' "
                    "degradation preset (data.degradation)"]
    said.clear()
    build_datasets(load_config(tiny, ["data.kind=triplets", f"data.root={triplets}"]), tmp_path / "run",
                   log=said.append)
    assert said == []
    # the options of the on-the-fly degradation change nothing where the LR images are read from a folder
    # (defect: they were dropped without a word)
    build_datasets(load_config(tiny, ["data.kind=triplets", f"data.root={triplets}", f"data.val_root={root}",
                                      "data.usm_gt=true", "data.jpeg_codec=libjpeg"]), tmp_path / "run",
                   log=said.append)
    assert said == [f"{root}: no lr/ folder, so each LR is degraded on the fly from its HR with the 'ftsr' "
                    "degradation preset (data.degradation)",
                    f"warning: data.usm_gt and data.jpeg_codec have no effect on {triplets}: its LR images are read "
                    "from a folder, not degraded from the HR (set data.lr_dir: null to degrade them)"]
