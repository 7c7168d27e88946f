"""Odd images (issue 13): read as the user sees them, at their bit depth, or refused with the file named."""

from __future__ import annotations

import io
import logging
import struct

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from tadisr_core.images import ImageReadError, load_image, load_rgb_uint8, read_image, save_image, written_by_us
from tests.hostile_files import gray_png


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((4, 6, 3), np.uint8)
    a[0, 0] = 255                                     # top-left marker
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6                                  # "rotate 90 CW to display"
    im.save(tmp_path / "r.jpg", exif=exif, quality=100)
    x = load_image(tmp_path / "r.jpg")
    assert x.shape == (1, 3, 6, 4)                    # displayed upright: 4 wide, 6 high
    assert x[0, 0, 0, -1] > 0.8 and x[0, 0, 0, 0] < 0.2


@pytest.mark.parametrize("suffix", ["png", "tif"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_exif_orientation_of_gray_scans_is_applied(tmp_path, suffix, dtype):
    """Defect: Pillow memory-maps an uncompressed gray TIFF opened by name and drops its Orientation tag
    unapplied, so 8- and 16-bit gray scans came out unrotated (PNG and colour TIFF were right)."""
    a = (np.arange(4 * 6).reshape(4, 6) * (2000 if dtype == np.uint16 else 10)).astype(dtype)
    exif = Image.Exif()
    exif[0x0112] = 6                                  # "rotate 90 CW to display"
    Image.fromarray(a).save(tmp_path / f"g.{suffix}", exif=exif.tobytes())
    got = read_image(tmp_path / f"g.{suffix}").pixels[0, 0].numpy()
    full = 255.0 if dtype == np.uint8 else 65535.0
    assert got.shape == (6, 4) and np.allclose(got * full, np.rot90(a, k=-1), atol=0.5)


def test_an_output_above_pillows_bomb_limit_is_still_known_as_ours(tmp_path, monkeypatch):
    """Defect: checking an existing output opened it with Pillow's default limit, so a re-run over a
    12 MP photo's x4 result (192 MP) stopped the whole batch with DecompressionBombError."""
    save_image(torch.rand(3, 64, 64), tmp_path / "big_x4.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)      # 64 x 64 is then "a bomb", as 192 MP is
    assert written_by_us(tmp_path / "big_x4.png")
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_16_bit_gray_keeps_its_precision(tmp_path):
    a = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    f = read_image(tmp_path / "g16.png")
    assert f.bits == 16 and f.pixels.shape == (1, 1, 64, 64)
    assert torch.equal(f.pixels[0, 0], torch.from_numpy(a.astype(np.float32) / 65535))
    rgb = load_rgb_uint8(tmp_path / "g16.png")        # what training and evaluate see: not clipped to white
    assert rgb.shape == (64, 64, 3) and rgb.max() == round(a.max() / 65535 * 255) and rgb.min() == 0


def test_float_tiff_is_read_by_its_real_range(tmp_path):
    a = np.linspace(0, 1, 30 * 20, dtype=np.float32).reshape(30, 20)
    Image.fromarray(a, mode="F").save(tmp_path / "f.tif")
    assert torch.allclose(load_image(tmp_path / "f.tif")[0, 0], torch.from_numpy(a))
    Image.fromarray(a * 255, mode="F").save(tmp_path / "f255.tif")
    assert torch.allclose(load_image(tmp_path / "f255.tif")[0, 0], torch.from_numpy(a), atol=1e-6)
    over = a.copy()  # defect: two pixels at 1.02 (a sharpened or HDR export) made the whole file read as 0..255
    over[0, :2], over[1, :2] = 1.02, -0.01
    Image.fromarray(over, mode="F").save(tmp_path / "over.tif")
    assert torch.equal(load_image(tmp_path / "over.tif")[0, 0], torch.from_numpy(np.clip(over, 0, 1)))
    over[0, :2] = 2.0  # HDR highlights: the bulk is still 0..1
    Image.fromarray(over, mode="F").save(tmp_path / "hdr.tif")
    assert torch.equal(load_image(tmp_path / "hdr.tif")[0, 0], torch.from_numpy(np.clip(over, 0, 1)))


def test_int32_tiff_uses_its_declared_bits(tmp_path):
    a = np.array([[0, 2**31 - 1], [2**30, 12345]], dtype=np.int32)
    Image.fromarray(a, mode="I").save(tmp_path / "i32.tif")
    x = load_image(tmp_path / "i32.tif")[0, 0]
    assert x[0, 1] == 1.0 and abs(float(x[1, 0]) - 0.5) < 1e-6


def test_nan_pixels_are_an_error_naming_the_file(tmp_path):
    a = np.full((8, 8), 0.5, np.float32)
    a[3, 3] = np.nan
    Image.fromarray(a, mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(ImageReadError, match=r"nan\.tif: 1 pixel\(s\) are NaN or Inf"):
        load_image(tmp_path / "nan.tif")


def test_decompression_bombs_are_refused_before_decoding(tmp_path, monkeypatch):
    Image.new("L", (3000, 2000)).save(tmp_path / "big.png", optimize=True)
    assert (tmp_path / "big.png").stat().st_size < 50_000
    bomb = r"3000x2000 = 6,000,000 pixels is above the limit of 1,000,000 .*TADISR_MAX_PIXELS"
    with pytest.raises(ImageReadError, match=bomb):
        load_image(tmp_path / "big.png", max_pixels=1_000_000)
    monkeypatch.setenv("TADISR_MAX_PIXELS", "5e6")
    with pytest.raises(ImageReadError, match="above the limit of 5,000,000 "):
        load_image(tmp_path / "big.png")
    monkeypatch.setenv("TADISR_MAX_PIXELS", "7e6")
    assert load_image(tmp_path / "big.png").shape == (1, 1, 2000, 3000)


def test_multi_frame_inputs_warn_and_use_the_first_frame(tmp_path, caplog):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with caplog.at_level(logging.WARNING, logger="tadisr"):
        f = read_image(tmp_path / "anim.gif")
    assert f.frames == 3 and "anim.gif has 3 frames" in caplog.text and "only the first is used" in caplog.text
    assert f.pixels[0, 0].mean() > 0.9 and f.pixels[0, 1].mean() < 0.1


def _exif(**tags) -> bytes:
    exif = Image.Exif()
    exif.update({{"orientation": 0x0112, "x": 0x011A, "y": 0x011B, "unit": 0x0128}[k]: v for k, v in tags.items()})
    return exif.tobytes()


@pytest.mark.parametrize("name, save, dpi", [
    ("a.png", dict(dpi=(300, 300)), (300, 300)),                            # pHYs (Pillow: 299.9994)
    ("a.png", dict(dpi=(0, 0)), None),                                      # zero: no resolution
    ("a.png", dict(dpi=(4e7, 4e7)), None),     # damaged: x 4 would not fit PNG's pHYs (failed the file's write)
    ("a.jpg", dict(dpi=(300, 150)), (300, 150)),                            # JFIF
    ("a.jpg", dict(exif=_exif(orientation=6, x=300.0, y=100.0, unit=2)), (100, 300)),  # turned a quarter
    ("a.jpg", dict(exif=_exif(orientation=1)), None),                       # not the 72 Pillow makes up
    ("a.webp", dict(exif=_exif(x=100.0, y=100.0, unit=3)), (254, 254)),     # EXIF in pixels per cm
    ("a.webp", dict(exif=_exif(x=300.0, y=300.0, unit=1)), None),           # no absolute unit
    ("a.tif", dict(dpi=(600, 300)), (600, 300)),                            # TIFF tags
    ("a.tif", dict(), None),                                                # not the 1 dpi Pillow makes up
    ("a.tif", dict(resolution=200.0, resolution_unit=3), (508, 508)),       # in pixels per cm
])
def test_the_resolution_is_read_in_dots_per_inch_as_displayed(tmp_path, name, save, dpi):
    Image.new("RGB", (6, 4), "white").save(tmp_path / name, **save)
    got = read_image(tmp_path / name).dpi
    assert got is None if dpi is None else got == pytest.approx(dpi, abs=0.01)


def test_icc_profile_is_carried_to_the_output(tmp_path):
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.new("RGB", (5, 5), (10, 20, 30)).save(tmp_path / "icc.png", icc_profile=icc)
    f = read_image(tmp_path / "icc.png")
    assert f.icc_profile == icc
    out = save_image(f.pixels, tmp_path / "out.png", f.icc_profile)
    assert Image.open(out).info.get("icc_profile") == icc and written_by_us(out)
    gray = save_image(f.pixels[:, :1], tmp_path / "gray.png", f.icc_profile)   # RGB profile on gray: dropped
    assert "icc_profile" not in Image.open(gray).info
    for suffix in (".jpg", ".webp"):  # JPEG and WebP carry it too (WebP has no gray: its gray is RGB)
        out = save_image(f.pixels, tmp_path / f"out{suffix}", f.icc_profile)
        assert Image.open(out).info.get("icc_profile") == icc and written_by_us(out)
    gray_icc = icc[:16] + b"GRAY" + icc[20:]  # a profile whose colour space (bytes 16-20) is gray
    with Image.open(save_image(f.pixels[:, :1], tmp_path / "gray.webp", gray_icc)) as im:
        assert im.mode == "RGB" and "icc_profile" not in im.info    # a gray profile never lands on RGB data
    with Image.open(save_image(f.pixels[:, :1], tmp_path / "gray.webp", icc)) as im:
        assert im.info.get("icc_profile") == icc


def _icc(space: bytes, tags: dict[bytes, bytes], device_class: bytes = b"mntr", pcs: bytes = b"XYZ ") -> bytes:
    """An ICC v2.1 profile of colour space `space` with these tags, built by hand (Pillow's ImageCms
    creates only sRGB, Lab and XYZ profiles)."""
    offset, table, data = 128 + 4 + 12 * len(tags), b"", b""
    for sig, tag in tags.items():
        table += sig + struct.pack(">II", offset + len(data), len(tag))
        data += tag + b"\0" * (-len(tag) % 4)
    body = struct.pack(">I", len(tags)) + table + data
    header = (struct.pack(">I", 128 + len(body)) + b"\0" * 4 + bytes([2, 0x10, 0, 0]) + device_class + space + pcs
              + b"\0" * 12 + b"acsp" + b"\0" * 28 + _s15(0.9642, 1.0, 0.8249) + b"\0" * 48)
    return header + body


def _s15(*values: float) -> bytes:
    return b"".join(struct.pack(">i", round(v * 65536)) for v in values)


def _gray_gamma_profile(gamma: float) -> bytes:
    """A gray profile whose tone curve is a pure power `gamma` (1.0: linear light, as in scientific images)."""
    return _icc(b"GRAY", {b"wtpt": b"XYZ \0\0\0\0" + _s15(0.9642, 1.0, 0.8249),
                          b"kTRC": b"curv\0\0\0\0" + struct.pack(">IH", 1, round(gamma * 256))})


def _cmyk_profile() -> bytes:
    """A CMYK input profile (8-bit A2B0 table to Lab) whose inks are all gray: C is L* 50, K L* 20, M and Y
    nothing, so a naive CMYK -> RGB conversion (cyan as (0, 255, 255)) is told apart from it."""
    ramp = bytes(range(256))
    lightness = [max(0, 90 - 40 * (i >> 3 & 1) - 70 * (i & 1)) for i in range(2 ** 4)]  # grid index C M Y K
    clut = b"".join(bytes([round(v * 255 / 100), 128, 128]) for v in lightness)
    a2b0 = b"mft1\0\0\0\0" + bytes([4, 3, 2, 0]) + _s15(1, 0, 0, 0, 1, 0, 0, 0, 1) + ramp * 4 + clut + ramp * 3
    return _icc(b"CMYK", {b"wtpt": b"XYZ \0\0\0\0" + _s15(0.9642, 1.0, 0.8249), b"A2B0": a2b0}, b"prtr", b"Lab ")


def _is_srgb(icc: bytes | None) -> bool:
    """Whether `icc` is LittleCMS's sRGB profile (its bytes hold their creation time)."""
    return bool(icc) and ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(icc))) == "sRGB built-in\n"


def _srgb_from_linear(y: float) -> float:
    return 12.92 * y if y <= 0.0031308 else 1.055 * y ** (1 / 2.4) - 0.055


@pytest.mark.parametrize("mode", ["L", "LA", "I;16"])
@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_gray_icc_profiles_are_applied(tmp_path, mode, suffix):
    """Defect: a gray input's gray ICC profile was dropped from the (RGB) output, so viewers showed its
    tones as sRGB: linear-light gray 50 % (shown as sRGB 188) came out as 128. The profile is applied
    at read (gray stays gray, 16 bits stay 16) and the outputs carry sRGB."""
    full = 65535 if mode == "I;16" else 255
    values = np.array([[0, round(full * 0.01), round(full * 0.2), round(full * 0.5), full]] * 2)
    if mode == "I;16":
        im = Image.fromarray(values.astype(np.uint16))
    else:
        im = Image.fromarray(values.astype(np.uint8), "L")
        im = Image.merge("LA", (im, Image.new("L", im.size, 77))) if mode == "LA" else im
    im.save(tmp_path / f"gray{suffix}", icc_profile=_gray_gamma_profile(1.0))
    f = read_image(tmp_path / f"gray{suffix}")
    expected = torch.tensor([_srgb_from_linear(v / full) for v in values[0]])
    assert f.pixels.shape[1] == (4 if mode == "LA" else 1) and f.bits == (16 if mode == "I;16" else 8)
    assert (f.pixels[0, 0, 0] - expected).abs().max() <= (2 / 65535 if mode == "I;16" else 1 / 255)
    if mode == "LA":
        assert torch.equal(f.pixels[0, 3], torch.full((2, 5), 77 / 255))     # alpha untouched
    assert _is_srgb(f.icc_profile)
    out = save_image(f.pixels[:, :1].expand(-1, 3, -1, -1), tmp_path / "out.png", f.icc_profile)  # SR is RGB
    assert Image.open(out).info.get("icc_profile") == f.icc_profile


def test_cmyk_icc_profiles_are_applied(tmp_path):
    """Defect: Pillow turns CMYK into RGB ignoring the embedded profile, and the CMYK profile was then
    dropped, so a CMYK JPEG's colours changed. The profile is applied at read; the outputs carry sRGB."""
    a = np.zeros((16, 32, 4), np.uint8)
    a[:, 16:, 0] = 255                                                  # left: no ink; right: full cyan
    Image.fromarray(a, "CMYK").save(tmp_path / "cmyk.jpg", quality=100, icc_profile=_cmyk_profile())
    f = read_image(tmp_path / "cmyk.jpg")
    assert f.pixels.shape == (1, 3, 16, 32) and _is_srgb(f.icc_profile)
    paper, cyan = f.pixels[0, :, 8, 4], f.pixels[0, :, 8, 28]
    assert paper.min() > 0.85 and cyan.max() - cyan.min() < 3 / 255 and 0.25 < cyan.mean() < 0.75  # gray
    out = save_image(f.pixels, tmp_path / "out.jpg", f.icc_profile)
    assert Image.open(out).info.get("icc_profile") == f.icc_profile


def test_a_damaged_gray_profile_is_dropped_with_a_warning(tmp_path, caplog):
    profile = _gray_gamma_profile(1.0)
    Image.new("L", (4, 4), 128).save(tmp_path / "gray.png", icc_profile=profile[:132] + b"\xff" * 12)
    with caplog.at_level(logging.WARNING, logger="tadisr"):
        f = read_image(tmp_path / "gray.png")
    assert "gray.png: its colour profile cannot be used" in caplog.text and "read as sRGB" in caplog.text
    assert f.icc_profile is None and torch.equal(f.pixels, torch.full((1, 1, 4, 4), 128 / 255))


def test_written_by_us_needs_our_tag_and_a_complete_file(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "user.png")
    assert not written_by_us(tmp_path / "user.png")
    ours = save_image(torch.zeros(3, 4, 4), tmp_path / "ours.png")
    assert written_by_us(ours) and ours.stat().st_mode & 0o777 == 0o644 | (ours.stat().st_mode & 0o022)
    data = ours.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:-6])
    assert not written_by_us(tmp_path / "cut.png")


def test_unreadable_and_missing_files_are_named(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n nope")
    with pytest.raises(ImageReadError) as err:
        load_image(tmp_path / "junk.png")
    assert str(err.value) == (f"cannot read {tmp_path / 'junk.png'} as an image: not an image format Pillow knows "
                              "(damaged, or another kind of file)")  # was Pillow's "<_io.BufferedReader name=...>"
    with pytest.raises(ImageReadError, match=r"input not found: .*absent\.png"):
        load_image(tmp_path / "absent.png")


def test_16_bit_colour_is_read_at_8_bits_with_a_warning(tmp_path, caplog):
    import struct
    import zlib

    a = np.arange(4 * 5 * 3, dtype=np.uint16).reshape(4, 5, 3) * 1000

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(4))
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 5, 4, 16, 2, 0, 0, 0))       # 16-bit RGB
    (tmp_path / "rgb16.png").write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(rows))
                                         + chunk(b"IEND", b""))
    with caplog.at_level(logging.WARNING, logger="tadisr"):
        x = load_image(tmp_path / "rgb16.png")
    assert "rgb16.png has 16 bits per colour channel; it is read at 8 bits" in caplog.text
    assert (x[0].permute(1, 2, 0) * 255 - torch.from_numpy(a / 257.0).float()).abs().max() <= 1.0


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_a_png_transparency_key_becomes_alpha(tmp_path, mode):
    """Defect: a gray or RGB PNG whose transparency is a colour key (tRNS, as PNG optimisers write it)
    lost it: the transparent area came out in the key colour, without alpha."""
    a = np.full((4, 6, 3) if mode == "RGB" else (4, 6), 200, np.uint8)
    a[:2] = 0                                                          # the key colour: transparent
    Image.fromarray(a, mode).save(tmp_path / "k.png", transparency=(0, 0, 0) if mode == "RGB" else 0)
    x = load_image(tmp_path / "k.png")
    assert x.shape == (1, 4, 4, 6)
    assert torch.equal(x[0, 3], torch.tensor([0.0] * 12 + [1.0] * 12).view(4, 6))
    assert torch.allclose(x[0, :3, 2:], torch.full((3, 2, 6), 200 / 255))


@pytest.mark.parametrize("bits", [2, 4])
def test_the_transparency_key_of_a_low_bit_gray_png_is_in_its_own_units(tmp_path, bits):
    """Defect: Pillow scales 2- and 4-bit gray samples to 8 bits but not their tRNS key, so the key
    matched no pixel and the image came out with an all-opaque alpha."""
    top = 2 ** bits - 1
    gray_png(tmp_path / "k.png", [0, 1, top - 1, top], bits, key=top)
    x = load_image(tmp_path / "k.png")
    assert x.shape == (1, 4, 1, 4) and x[0, 3, 0].tolist() == [1.0, 1.0, 1.0, 0.0]


def test_the_transparency_key_of_a_16_bit_gray_png_becomes_alpha(tmp_path):
    """Defect: a 16-bit gray PNG's tRNS key was ignored (read as one channel), while 8-bit gray keys became
    alpha; now alike, the 16-bit levels kept."""
    gray_png(tmp_path / "k.png", [0, 1000, 30000, 65535], 16, key=1000)
    x = load_image(tmp_path / "k.png")
    assert x.shape == (1, 4, 1, 4) and x[0, 3, 0].tolist() == [1.0, 0.0, 1.0, 1.0]
    assert torch.equal(x[0, 0, 0], torch.tensor([0, 1000, 30000, 65535]) / 65535.0)
    assert torch.equal(x[0, 0], x[0, 1]) and torch.equal(x[0, 0], x[0, 2])


def test_a_transparency_key_survives_a_gray_colour_profile(tmp_path):
    """Defect: applying a gray ICC profile made a new image without the tRNS key: the alpha was lost."""
    from tadisr_core.images import _srgb_gray_profile

    a = np.array([[0, 50, 128, 255]], np.uint8)
    Image.fromarray(a, "L").save(tmp_path / "k.png", transparency=0, icc_profile=_srgb_gray_profile())
    x = load_image(tmp_path / "k.png")
    assert x.shape == (1, 4, 1, 4) and x[0, 3, 0].tolist() == [0.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("image, says", [
    (torch.full((3, 8, 8), 200, dtype=torch.uint8),
     "expected a float image in 0..1, got uint8 (divide a 0..255 image by 255)"),
    (torch.full((3, 8, 8), float("nan")),
     "192 non-finite value(s) (NaN/Inf); fix what made the NaN or Inf"),
    (torch.rand(8, 8), "expected an image tensor [C, H, W] or [1, C, H, W], got (8, 8)"),
    (torch.rand(1, 1, 3, 8, 8), "expected an image tensor [C, H, W] or [1, C, H, W], got (1, 1, 3, 8, 8)"),
    (torch.rand(2, 3, 8, 8), "expected an image tensor [C, H, W] or [1, C, H, W], got (2, 3, 8, 8)"),
    (torch.full((3, 8, 8), 200.0), "the image's values span 200..200, but images are written from 0..1: map a "
                                   "-1..1 image with (x + 1) / 2 and a 0..255 one with x / 255"),
])
def test_an_image_save_image_cannot_write_faithfully_is_refused_naming_the_file(tmp_path, image, says):
    """A 0..255 integer tensor was written x255 (nearly all white), NaN as solid black and a 2-D tensor
    gave an IndexError; each is now one line naming the file, and nothing is written."""
    import re

    from tadisr_core.images import save_images, to_uint8

    path = tmp_path / "out.png"
    with pytest.raises(ValueError, match="^" + re.escape(f"{path}: {says}") + "$"):
        save_image(image, path)
    with pytest.raises(ValueError, match="^" + re.escape(f"{path}: {says}") + "$"):
        save_images([(torch.rand(3, 8, 8), tmp_path / "first.png"), (image, path)])
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="^" + re.escape(f"image: {says}") + "$"):
        to_uint8(image)
    ok = torch.linspace(0, 1, 64).reshape(1, 8, 8).expand(3, -1, -1)
    assert np.array_equal(np.asarray(Image.open(save_image(ok, path))), to_uint8(ok))
    with pytest.raises(ValueError, match="^" + re.escape(f"{path}: cannot save 2 channels as an image (need 1, 3 "
                                                         "or 4)") + "$"):
        save_image(torch.rand(2, 8, 8), path)
