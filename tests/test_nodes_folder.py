"""The Load Image From Folder node (nodes/folder_io.py) without ComfyUI: the files it serves and in which
order, the transparency mask, outputs named apart, relative folders under the input folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from nodes import folder_io, host


def _folder(root, names):
    root.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        Image.new("RGB", (6, 4), (40 * k, 255 - 40 * k, 0)).save(root / name)
    return root


def test_load_image_from_folder(tmp_path):
    _folder(tmp_path, ["img_0.png", "img_1.png"])
    (tmp_path / "notes.txt").write_text("not an image")
    image, prefix, mask_prefix, count, mask = folder_io.load(str(tmp_path), 1, "out/")
    assert image.shape == (1, 4, 6, 3) and torch.allclose(image[0, 0, 0], torch.tensor([40, 215, 0]) / 255)
    assert torch.equal(mask, torch.zeros(1, 4, 6))  # no alpha: an image-sized empty MASK
    assert (prefix, mask_prefix, count) == ("out/img_1", "out/img_1_text_mask", 2)
    with pytest.raises(ValueError, match="not found"):
        folder_io.load(str(tmp_path / "missing"), 0, "")
    with pytest.raises(ValueError, match=r"'.*notes\.txt' is a file \(.*notes\.txt\), not a folder; give the folder "
                                         r"that holds it"):  # it said "not found", of a file that is there
        folder_io.load(str(tmp_path / "notes.txt"), 0, "")
    first = folder_io.fingerprint(str(tmp_path), 0)
    assert first == folder_io.fingerprint(str(tmp_path), 0) and first != folder_io.fingerprint(str(tmp_path), 1)
    # defect: an image added beside the served one left the fingerprint, so the cached count, unchanged
    _folder(tmp_path / "more", ["img_0.png", "img_1.png"])
    before = folder_io.fingerprint(str(tmp_path / "more"), 0)
    _folder(tmp_path / "more", ["z_new.png"])
    assert folder_io.fingerprint(str(tmp_path / "more"), 0) != before
    assert folder_io.load(str(tmp_path / "more"), 0, "")[3] == 3
    (tmp_path / "img_2.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"^TADiSR: cannot read .*img_2\.png as an image.*Move it out of the folder"):
        folder_io.load(str(tmp_path), 2, "")


def test_a_linked_folder_or_index_is_always_run_again(tmp_path, monkeypatch):
    """ComfyUI fingerprints a linked input as None. Defect: a linked folder was fingerprinted as the input
    folder itself (the served file there, which the run never reads); a linked index raised a TypeError that
    ComfyUI logged on every queue."""
    import math

    monkeypatch.setattr(host, "input_directory", lambda: str(_folder(tmp_path / "input", ["x.png"])))
    assert math.isnan(folder_io.fingerprint(None, 0))
    _folder(tmp_path / "mine", ["a.png"])
    assert math.isnan(folder_io.fingerprint(str(tmp_path / "mine"), None))
    assert isinstance(folder_io.fingerprint(str(tmp_path / "mine"), 0), str)


def _transparent_files(folder) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Files whose transparency comes four ways, with the (RGB [H, W, 3], alpha [H, W]) each holds."""
    from tests.hostile_files import gray_png

    folder.mkdir(parents=True, exist_ok=True)
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = (10, 20, 30), [[0, 64, 255], [255, 128, 0]]
    Image.fromarray(rgba, "RGBA").save(folder / "a_rgba.png")
    Image.fromarray(rgba[..., [0, 3]], "LA").save(folder / "b_la.png")
    palette = Image.fromarray(np.array([[0, 1, 1], [1, 0, 1]], np.uint8), "P")
    palette.putpalette([200, 100, 0, 0, 50, 250] + [0] * 762)
    palette.save(folder / "c_palette.png", transparency=0)
    gray_png(folder / "d_gray16.png", [0, 1000, 65535], 16, key=1000)
    gray = torch.tensor([[10.0] * 3, [10.0] * 3])
    pal = torch.tensor([[0, 1, 1], [1, 0, 1]])
    return {
        "a_rgba": (torch.tensor([10, 20, 30]).expand(2, 3, 3) / 255, torch.from_numpy(rgba[..., 3]) / 255),
        "b_la": ((gray / 255).unsqueeze(-1).expand(2, 3, 3), torch.from_numpy(rgba[..., 3]) / 255),
        "c_palette": (torch.tensor([[200, 100, 0], [0, 50, 250]])[pal] / 255, (pal == 1).float()),
        "d_gray16": ((torch.tensor([0, 1000, 65535]) / 65535.0).view(1, 3, 1).expand(1, 3, 3),
                     torch.tensor([[1.0, 0.0, 1.0]])),
    }


def test_folder_loader_gives_the_transparency_as_a_mask_like_load_image(tmp_path):
    """Defect: RGBA, LA, palette and 16-bit gray PNGs with transparency came out RGB with the alpha dropped
    without a word (the CLI keeps it). Now the image stays RGB and the transparency is a MASK output added
    last (saved workflows link the others by slot), 1 - alpha as ComfyUI's Load Image gives it."""
    expected = _transparent_files(tmp_path)
    for index, (stem, (rgb, alpha)) in enumerate(sorted(expected.items())):
        out = folder_io.load(str(tmp_path), index, "")
        assert out[1] == stem and out[3] == len(expected)
        image, mask = out[0], out[-1]
        assert image.shape == (1, *rgb.shape) and mask.shape == (1, *alpha.shape), stem
        assert torch.allclose(image[0], rgb.float(), atol=1e-6), stem
        assert torch.allclose(mask[0], 1 - alpha.float(), atol=1e-6), stem


def test_folder_index_wraps_or_stops_with_done(tmp_path):
    """Defect: a randomized or incremented index past the end failed ("index 882688 is past the last image")."""
    _folder(tmp_path, ["a.png", "b.png", "c.png"])
    served = [folder_io.load(str(tmp_path), i, "")[1] for i in (0, 1, 2, 3, 4, 882688)]
    assert served == ["a", "b", "c", "a", "b", ["a", "b", "c"][882688 % 3]]
    assert folder_io.load(str(tmp_path), 2, "", "stop")[1] == "c"
    with pytest.raises(ValueError, match=r"done: all 3 images .* were served"):
        folder_io.load(str(tmp_path), 3, "", "stop")


def test_folder_natural_order(tmp_path):
    _folder(tmp_path, ["img10.png", "img2.png", "IMG1.png", "img_b.png"])
    assert folder_io.list_images(str(tmp_path)) == ["IMG1.png", "img2.png", "img10.png", "img_b.png"]


def test_the_folder_serves_the_files_the_cli_takes_hidden_ones_left_out(tmp_path):
    """Defect: a folder copied from a Mac (a.png beside its AppleDouble ._a.png) served ._a.png at index 0 and
    that run failed ("cannot read ._a.png"), while the CLI skips hidden names (images.walk_images)."""
    from tadisr_core.images import walk_images

    _folder(tmp_path, ["a.png", "b.png"])
    (tmp_path / "._a.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X" + bytes(64))
    (tmp_path / ".thumb.png").write_bytes((tmp_path / "b.png").read_bytes())
    (tmp_path / "sub.png").mkdir()  # a folder with an image suffix is no file
    assert folder_io.list_images(str(tmp_path)) == ["a.png", "b.png"]
    assert sorted(folder_io.list_images(str(tmp_path))) == [p.name for p in walk_images(tmp_path).files]
    assert [folder_io.load(str(tmp_path), i, "")[1:4] for i in (0, 1)] == [("a", "a_text_mask", 2),
                                                                          ("b", "b_text_mask", 2)]


def test_a_name_with_a_superscript_digit_does_not_break_the_folder(tmp_path):
    """Defect: "area 10²5.png" failed every index of its folder ("invalid literal for int(): '²'")."""
    _folder(tmp_path, ["room 1.png", "area 10\u00b25.png", "room 10.png", "room 2.png"])
    assert folder_io.list_images(str(tmp_path)) == ["area 10\u00b25.png", "room 1.png", "room 2.png", "room 10.png"]
    assert folder_io.load(str(tmp_path), 0, "")[1] == "area 10\u00b25"


def test_files_of_one_stem_get_outputs_named_apart(tmp_path):
    """Defect: page.png and page.jpg were both served as "page", so their outputs could not be told apart."""
    _folder(tmp_path, ["page.png", "page.jpg", "cover.png"])
    served = {folder_io.load(str(tmp_path), i, "out/")[0:3][1] for i in range(3)}
    assert served == {"out/page_png", "out/page_jpg", "out/cover"}
    assert folder_io.load(str(tmp_path), 0, "out/")[2] == "out/cover_text_mask"
    names = ["a.png", "a.jpg", "a_png.jpg", "B.png", "b.jpg"]  # a name already taken; stems told apart by case only
    stems = [folder_io.output_stem(name, names) for name in names]
    assert stems == ["a_png", "a_jpg", "a_png-2", "B_png", "b_jpg"]


def test_relative_folder_resolves_under_the_input_folder_and_cannot_escape(tmp_path, monkeypatch):
    """Defect: a relative folder was joined to the input folder without a check, so '..' read outside it."""
    inputs = tmp_path / "input"
    _folder(inputs / "batch", ["x.png"])
    _folder(tmp_path / "outside", ["secret.png"])
    monkeypatch.setattr(host, "input_directory", lambda: str(inputs))
    assert folder_io.resolve_folder("batch") == str(inputs / "batch")
    assert folder_io.load("batch", 0, "")[1] == "x"
    for bad in ("../outside", "batch/../../outside", ".."):
        with pytest.raises(ValueError, match="outside ComfyUI's input folder"):
            folder_io.resolve_folder(bad)
    assert folder_io.load(str(tmp_path / "outside"), 0, "")[1] == "secret"  # absolute: the user's own archive


def test_the_folder_leaves_out_earlier_outputs_and_takes_every_format_the_cli_takes(tmp_path, caplog):
    """Defects: files named like the CLI's outputs (a_x4.png, a_text_mask.png) were served as inputs and
    upscaled again (a_text_mask_text_mask); .jfif / .pgm files the CLI's reader takes were not served."""
    import logging

    from tadisr_core.batch import collect_inputs

    # a_strip.png: the demo's strip beside a_x4.png (defect: a second demo run into the folder upscaled it);
    # comic_strip.png, beside no SR image, is a user's picture
    _folder(tmp_path, ["a.png", "a_x4.png", "a_text_mask.png", "a_strip.png", "b.jfif", "comic_strip.png"])
    Image.new("L", (6, 4), 90).save(tmp_path / "c.pgm")
    with caplog.at_level(logging.WARNING, logger="tadisr"):
        assert folder_io.list_images(str(tmp_path)) == ["a.png", "b.jfif", "c.pgm", "comic_strip.png"]
        folder_io.list_images(str(tmp_path))  # said once, not on every queued run
    assert caplog.text.count(f"{tmp_path}: left out 3 file(s) named like TADiSR outputs") == 1
    assert "(any scale: *_x2.png, *_x2.5.png)" in caplog.text  # another scale's outputs too: the rule, said whole
    assert folder_io.list_images(str(tmp_path)) == [p.name for p, _, _ in collect_inputs([tmp_path])]
    assert [folder_io.load(str(tmp_path), i, "")[1] for i in range(4)] == ["a", "b", "c", "comic_strip"]


def test_the_folder_leaves_out_masks_comfyui_saved_and_keeps_its_images(tmp_path):
    """Defect: pointed at ComfyUI's output folder, the node served the text masks and heat maps Save Image wrote
    from its prefixes (a_text_mask_00001_.png) as images to upscale. Save Image's images (ComfyUI_00001_.png, a
    generation to upscale, or an SR image: nothing in the name tells) are still served."""
    from tadisr_core.batch import collect_inputs

    _folder(tmp_path, ["a.png", "a_00001_.png", "a_text_mask_00001_.png", "a_Text_Mask-2_00002_.png",
                       "heat_attention_00003_.png", "ComfyUI_00001_.png", "mask_00001_.png",
                       "text_mask_00004_.png", "heatmap_00005_.png", "used_mask_00007_.png",  # the example
                       "upscaled_00006_.png", "overlay_00008_.png",                              # workflows'
                       "text_mask.png", "heatmap.png"])                                      # a user's own names
    assert folder_io.list_images(str(tmp_path)) == ["a.png", "a_00001_.png", "ComfyUI_00001_.png", "heatmap.png",
                                                    "mask_00001_.png", "overlay_00008_.png", "text_mask.png",
                                                    "upscaled_00006_.png"]
    assert set(folder_io.list_images(str(tmp_path))) == {p.name for p, _, _ in collect_inputs([tmp_path])}
