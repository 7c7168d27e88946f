"""The tiled upscale pipeline on a tiny random model: sizes, alpha, batching, staging, cancel, OOM."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tadisr_core import devices
from tadisr_core.pipeline import UpscaleCancelled, decode_tiles, denoise_tiles, encode_tiles, output_size, upscale

TILE = dict(tile=64, overlap=16)


@pytest.fixture(scope="module")
def model(tiny_model_factory):
    return tiny_model_factory("release")


@pytest.mark.parametrize("shape, scale", [
    ((1, 3, 23, 37), 4),      # odd, 2 x 3 tiles
    ((1, 3, 10, 50), 4),      # one side shorter than a tile
    ((1, 3, 9, 11), 4),       # smaller than a tile, not a multiple of 8 after scaling
    ((2, 3, 13, 21), 2.5),    # batch of images, fractional scale
    ((1, 3, 70, 9), 1),       # scale 1
])
def test_sizes_and_ranges(model, shape, scale):
    torch.manual_seed(0)
    out = upscale(model, torch.rand(shape), scale, tile_batch=2, **TILE)
    h, w = output_size(shape[2], shape[3], scale)
    assert out.image.shape == (shape[0], 3, h, w)
    assert out.mask.shape == (shape[0], 1, h, w)
    assert out.attention is None
    for t in (out.image, out.mask):
        assert torch.isfinite(t).all() and t.min() >= 0 and t.max() <= 1
    assert out.mask.std() > 0   # a real (random-weight) prediction, not a constant


def test_rgba_keeps_its_upscaled_alpha_and_gray_works(model):
    torch.manual_seed(1)
    rgba = torch.rand(1, 4, 15, 20)
    out = upscale(model, rgba, 4, tile_batch=3, **TILE)
    assert out.image.shape == (1, 4, 60, 80)
    alpha = F.interpolate(rgba[:, 3:], size=(60, 80), mode="bicubic", align_corners=False).clamp(0, 1)
    assert torch.equal(out.image[:, 3:], alpha)
    rgb = upscale(model, rgba[:, :3], 4, tile_batch=3, **TILE)
    assert torch.equal(out.image[:, :3], rgb.image) and torch.equal(out.mask, rgb.mask)

    # a gray input gives a gray image (three equal channels): the luma of the RGB result of its three
    # copies (defect: that result's slight colour cast was returned as it was)
    gray = rgba[:, :1]
    g = upscale(model, gray, 4, tile_batch=3, **TILE)
    assert g.image.shape == (1, 3, 60, 80)
    ref = upscale(model, gray.expand(-1, 3, -1, -1), 4, tile_batch=3, **TILE)
    assert (ref.image[:, 0] - ref.image[:, 1]).abs().max() > 0.01  # the tiny model's cast, as the demo's
    luma = 0.299 * ref.image[:, 0] + 0.587 * ref.image[:, 1] + 0.114 * ref.image[:, 2]
    assert torch.equal(g.image[:, 0], g.image[:, 1]) and torch.equal(g.image[:, 0], g.image[:, 2])
    assert (g.image[:, 0] - luma).abs().max() <= 1e-6 and torch.equal(g.mask, ref.mask)
    tiled = encode_tiles(model, gray, 4, tile_batch=3, **TILE)
    assert torch.equal(decode_tiles(model, denoise_tiles(model, tiled), tile_batch=3).image, g.image)
    # gray with alpha (an LA file reads as RGBA of three equal channels): gray too, its alpha kept (defect:
    # it came out tinted, by up to 38 levels with the demo)
    gray_alpha = torch.cat([gray.expand(-1, 3, -1, -1), rgba[:, 3:]], 1)
    ga = upscale(model, gray_alpha, 4, tile_batch=3, **TILE)
    assert torch.equal(ga.image[:, :3], g.image) and torch.equal(ga.image[:, 3:], out.image[:, 3:])
    tiled = encode_tiles(model, gray_alpha, 4, tile_batch=3, **TILE)
    assert torch.equal(decode_tiles(model, denoise_tiles(model, tiled), tile_batch=3).image, ga.image)


def _logo(under: float) -> torch.Tensor:
    """A white disc with a soft edge on a transparent background, colour `under` beneath alpha 0 [1, 4, 24, 28]."""
    yy, xx = torch.meshgrid(torch.arange(24.0), torch.arange(28.0), indexing="ij")
    alpha = (8 - ((yy - 11.5) ** 2 + (xx - 13.5) ** 2).sqrt()).div(3).clamp(0, 1)
    rgb = torch.where(alpha > 0, torch.ones(3, 24, 28), torch.full((3, 24, 28), under))
    return torch.cat([rgb, alpha[None]])[None]


def test_colour_hidden_under_transparent_pixels_does_not_reach_the_output(model):
    """Defect: black under alpha 0 gave a grey ring on a white logo's soft edge (white under it gave none)."""
    black, white = _logo(0.0), _logo(1.0)
    assert (black[:, 3] > 0).any() and (black[:, 3] < 1).logical_and(black[:, 3] > 0).any()
    fused = [upscale(model, x, 4, tile_batch=2, **TILE) for x in (black, white)]
    staged = [decode_tiles(model, denoise_tiles(model, encode_tiles(model, x, 4, tile_batch=2, **TILE)),
                           tile_batch=2, color_fix="wavelet") for x in (black, white)]
    for b, w in (fused, staged):
        seen = b.image[:, 3:] > 0
        assert torch.equal(b.image[:, 3:], w.image[:, 3:]) and seen.any()
        assert (b.image[:, :3] - w.image[:, :3]).abs().mul(seen).max() < 1e-5
        assert (b.mask - w.mask).abs().mul(seen).max() < 1e-5


def test_fill_transparent_takes_the_nearest_visible_colour_and_keeps_the_rest():
    from tadisr_core.pipeline import fill_transparent

    x = torch.zeros(2, 4, 5, 9)
    x[0, :, :, :2] = torch.tensor([1.0, 0, 0, 1])[:, None, None]      # opaque red on the left
    x[0, :, :, -1] = torch.tensor([0, 0, 1.0, 0.5])[:, None]          # half-transparent blue on the right
    x[1, :3] = 0.3                                                    # fully transparent: nothing to take
    y = fill_transparent(x)
    assert torch.equal(y[0, :3, :, 2], torch.tensor([1.0, 0, 0])[:, None].expand(3, 5))   # next to red
    assert torch.equal(y[0, :3, :, -2], torch.tensor([0, 0, 1.0])[:, None].expand(3, 5))  # next to blue
    assert torch.equal(y[:, 3], x[:, 3]) and torch.equal(y[0, :, :, :2], x[0, :, :, :2])
    assert torch.equal(y[0, :, :, -1], x[0, :, :, -1]) and torch.equal(y[1], x[1])       # real colours stay
    opaque = torch.rand(1, 4, 6, 6).clamp_min(0.01)
    rgb = x[:, :3]
    assert fill_transparent(opaque) is opaque and fill_transparent(rgb) is rgb
    far = torch.zeros(1, 4, 512, 512, dtype=torch.float16)   # one faint visible pixel, far from most
    far[0, :, 0, 0] = torch.tensor([0.8, 0.8, 0.8, 1 / 255])
    filled = fill_transparent(far)  # defect: fp16's coarse alpha means underflowed, and the fill was black
    assert filled.dtype == torch.float16 and torch.allclose(filled[0, :3, -1, -1].float(), torch.tensor(0.8),
                                                            atol=1e-3)


def test_batched_tiles_equal_batch_one(model, tiny_model_factory):
    x = torch.rand(1, 3, 23, 37, generator=torch.Generator().manual_seed(2))
    one = upscale(model, x, 4, tile_batch=1, **TILE)
    many = upscale(model, x, 4, tile_batch=4, **TILE)
    # fp32: the model itself is not bit-batch-invariant on CPU (oneDNN convs round differently per
    # batch size, ~1 ulp, amplified by the random weights to a few 1e-5); the pipeline adds nothing.
    assert (one.image - many.image).abs().max() < 2e-4
    assert (one.mask - many.mask).abs().max() < 2e-4
    # fp64 shows the tiling/batching logic itself is exact.
    m64 = tiny_model_factory("release").double()
    m64.set_prompt(m64.prompt)
    one = upscale(m64, x, 4, tile_batch=1, **TILE)
    many = upscale(m64, x, 4, tile_batch=4, **TILE)
    assert (one.image - many.image).abs().max() < 1e-5
    assert (one.mask - many.mask).abs().max() < 1e-5


@pytest.mark.parametrize("variant", ["release", "paper"])
def test_staged_equals_fused(variant, model, tiny_model_factory):
    m = model if variant == "release" else tiny_model_factory("paper")
    x = torch.rand(1, 4, 12, 21, generator=torch.Generator().manual_seed(3))
    fused = upscale(m, x, 4, tile_batch=2, attention=True, **TILE)
    tiled = encode_tiles(m, x, 4, tile_batch=2, **TILE)
    assert tiled.size == (48, 84) and len(tiled.tiles) == len(tiled.grid) == 2
    assert tiled.tiles[0].skips is not None and tiled.tiles[0].latents.shape == (1, 4, 6, 8)
    tiled = denoise_tiles(m, tiled, capture=True, tile_batch=2)
    staged = decode_tiles(m, tiled, tile_batch=2)
    for a, b in ((fused.image, staged.image), (fused.mask, staged.mask), (fused.attention, staged.attention)):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= 1e-6
    assert fused.attention.min() == 0 and fused.attention.max() == 1   # normalised per image
    with pytest.raises(ValueError, match="already denoised"):
        denoise_tiles(m, tiled)
    # the stages keep their own copy of the input (defect: a change to the caller's tensor reached the output)
    y = x.clone()
    tiled = denoise_tiles(m, encode_tiles(m, y, 4, tile_batch=2, **TILE), capture=True, tile_batch=2)
    y.fill_(0.5)
    assert torch.equal(decode_tiles(m, tiled, tile_batch=2).image, staged.image)


def test_staged_heat_map_equals_fused_where_resized_attention_overshoots_1():
    """The trained demo's resized attention exceeds 1 (the tiny random models' never does): both paths
    clamp each channel before averaging, so the staged graph's heat map is the all-in-one's."""
    from tadisr_core.model_ref import load_model

    m = load_model("demo")
    x = torch.rand(1, 3, 24, 32, generator=torch.Generator().manual_seed(5))
    fused = upscale(m, x, 4, tile_batch=1, attention=True, **TILE)
    tiled = denoise_tiles(m, encode_tiles(m, x, 4, tile_batch=1, **TILE), capture=True, keep_attention=True)
    assert max(t.attention.max().item() for t in tiled.tiles) > 1.05
    staged = decode_tiles(m, tiled, tile_batch=1)
    assert (fused.image - staged.image).abs().max() <= 1e-6
    assert (fused.attention - staged.attention).abs().max() <= 1e-5   # the old staged reduction: 0.099


def test_results_are_float32_whatever_the_default_dtype(model):
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        out = upscale(model, torch.rand(1, 3, 12, 20, dtype=torch.float32), 4, attention=True, **TILE)
    finally:
        torch.set_default_dtype(before)
    assert out.image.dtype == out.mask.dtype == out.attention.dtype == torch.float32


def test_progress_per_tile_and_cancel_between_tiles(model):
    x = torch.rand(1, 3, 23, 37)                    # 2 x 3 = 6 tiles
    seen = []
    upscale(model, x, 4, tile_batch=1, progress=lambda d, n: seen.append((d, n)), **TILE)
    assert seen == [(k, 6) for k in range(1, 7)]

    calls = {"model": 0}
    real_decode = model.decode

    def counting_decode(*a, **k):
        calls["model"] += 1
        return real_decode(*a, **k)

    model.decode = counting_decode
    try:
        with pytest.raises(UpscaleCancelled) as err:
            upscale(model, x, 4, tile_batch=1, cancel=lambda: calls["model"] >= 2, **TILE)
    finally:
        del model.decode
    assert calls["model"] == 2 and err.value.done == 2 and err.value.total == 6


def test_out_of_memory_halves_the_batch_then_the_tile(model, caplog):
    x = torch.rand(1, 3, 24, 40)           # 96 x 160: two 96 x 128 tiles, then 2 x 4 tiles of 64
    real_decode = model.decode
    shapes = []

    def picky_decode(latents, *a, **k):
        shapes.append(tuple(latents.shape))
        if latents.shape[0] > 1 or latents.shape[-1] > 8:   # only single 64 px tiles fit
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_decode(latents, *a, **k)

    model.decode = picky_decode
    try:
        with caplog.at_level(logging.WARNING, logger="tadisr"):
            out = upscale(model, x, 4, tile=128, overlap=32, tile_batch=4)
    finally:
        del model.decode
    assert out.grid.tile_h == out.grid.tile_w == 64 and out.image.shape == (1, 3, 96, 160)
    assert shapes[:2] == [(2, 4, 12, 16), (1, 4, 12, 16)]
    assert "retrying with 1" in caplog.text and "restarting with tile 64, overlap 16" in caplog.text
    ref = upscale(model, x, 4, tile=64, overlap=16, tile_batch=1)
    assert (ref.image - out.image).abs().max() < 2e-4


def test_out_of_memory_halves_the_tile_actually_used_then_says_what_else_to_try(model, caplog):
    """A small canvas runs as one tile smaller than the tile asked for: the fallback halves that one
    (no attempt repeats a size), and when even the smallest tile does not fit, the error (still an
    out-of-memory error) names the lower-memory settings."""
    x = torch.rand(1, 3, 24, 24)           # x8: one 192 px tile, although 768 px are asked for
    sizes = []

    def no_memory(latents, *a, **k):
        sizes.append(latents.shape[-1] * 8)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    model.decode = no_memory
    try:
        with caplog.at_level(logging.WARNING, logger="tadisr"), \
                pytest.raises(torch.OutOfMemoryError, match="even with one 64 px tile .*; use a lower-memory "
                                                            "setting: fp8_e4m3fn weights or sequential offload"):
            upscale(model, x, 8, tile=768, overlap=256, tile_batch=1)
    finally:
        del model.decode
    assert sizes == [192, 96, 64]
    assert "out of memory with one 192 px tile; restarting with tile 96" in caplog.text


def test_staged_out_of_memory_says_to_encode_with_a_smaller_tile(model):
    """The staged steps cannot shrink the tile encode fixed: after the batch halving, the out-of-memory
    error (still of its type) says so and what else to try."""
    tiled = encode_tiles(model, torch.rand(1, 3, 24, 40), 4, tile=96, overlap=32, tile_batch=2)

    def no_memory(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    for stage, method in (("denoise", "denoise"), ("decode", "decode")):
        setattr(model, method, no_memory)
        try:
            with pytest.raises(torch.OutOfMemoryError, match=f"out of memory in {stage} with one 96 px tile per "
                               r"model call .*; the tile is set at encode: encode again with a smaller tile, or "
                               r"use fp8_e4m3fn weights or sequential offload \(offload='sequential', or ComfyUI's "
                               r"--lowvram\)$"):
                if stage == "denoise":
                    denoise_tiles(model, tiled, tile_batch=2)
                else:
                    decode_tiles(model, denoise_tiles(model, tiled), tile_batch=2)
        finally:
            delattr(model, method)


def test_sampled_latent_is_seeded(model):
    x = torch.rand(1, 3, 12, 12)
    a = upscale(model, x, 4, tile_batch=1, sample=True, seed=5, **TILE)
    b = upscale(model, x, 4, tile_batch=1, sample=True, seed=5, **TILE)
    c = upscale(model, x, 4, tile_batch=1, **TILE)
    assert torch.equal(a.image, b.image)
    assert not torch.equal(a.image, c.image)
    for seeding in (dict(seed=5), dict(generator=torch.Generator().manual_seed(5))):
        with pytest.raises(ValueError, match="sample is False .*: pass sample=True, or leave them out"):
            upscale(model, x, 4, **seeding, **TILE)
        with pytest.raises(ValueError, match="pass sample=True"):
            encode_tiles(model, x, 4, **seeding, **TILE)
    # defects: a fractional or boolean seed was truncated, a huge one failed inside torch, and a generator
    # given with a seed silently won
    for seed in (1.7, 5.0, True, 2 ** 70, -1, "5"):  # an int, as tile takes
        with pytest.raises(ValueError, match=re.escape(f"seed must be a whole number in 0 .. 2**63 - 1, got {seed!r}")):
            upscale(model, x, 4, sample=True, seed=seed, **TILE)
    with pytest.raises(ValueError, match="give seed or generator, not both"):
        upscale(model, x, 4, sample=True, seed=5, generator=torch.Generator().manual_seed(5), **TILE)


def test_bad_arguments(model):
    x = torch.rand(1, 3, 16, 16)
    for kwargs in (dict(scale=9), dict(scale=0.5), dict(tile=60), dict(overlap=64), dict(tile_batch=0)):
        with pytest.raises(ValueError):
            upscale(model, x, **{"scale": 4, **TILE, **kwargs})
    with pytest.raises(ValueError, match="C in 1, 3, 4"):
        upscale(model, torch.rand(1, 2, 16, 16), 4, **TILE)
    with pytest.raises(ValueError, match=re.escape("the input image: expected a float image in 0..1, got uint8 "
                                                   "(divide a 0..255 image by 255)")):
        upscale(model, torch.zeros(1, 3, 16, 16, dtype=torch.uint8), 4, **TILE)
    with pytest.raises(TypeError, match=re.escape("the input image: expected a torch tensor [B, C, H, W] in 0..1, got "
                                                  "ndarray (a file: images.load_image(path); a PIL image")):
        upscale(model, np.zeros((16, 16, 3), np.uint8), 4, **TILE)  # review: a ValueError, as for a wrong shape
    if not torch.cuda.is_available():  # defect: an assertion deep inside torch
        with pytest.raises(RuntimeError, match="^canvas_device='cuda': CUDA is not available"):
            upscale(model, x, 4, canvas_device="cuda", **TILE)
    with pytest.raises(ValueError, match="empty"):
        upscale(model, torch.rand(1, 3, 0, 20), 4, **TILE)


@pytest.mark.parametrize("kwargs, says", [
    (dict(tile=64.0), "tile must be a whole number of pixels, got 64.0"),
    (dict(tile=True), "tile must be a whole number of pixels, got True"),
    (dict(tile="64"), "tile must be a whole number of pixels, got '64'"),
    (dict(overlap=16.0), "overlap must be a whole number of pixels, got 16.0"),
    (dict(overlap=False), "overlap must be a whole number of pixels, got False"),
    (dict(scale="4"), "scale must be a number, got '4'"),
    (dict(scale=True), "scale must be a number, got True"),
    (dict(scale=None), "scale must be a number, got None"),
    (dict(tile_batch=2.0), "tile_batch must be >= 1 or 'auto', got 2.0"),
    (dict(tile_batch="2"), "tile_batch must be >= 1 or 'auto', got '2'"),
])
def test_settings_of_the_wrong_type_are_named(model, kwargs, says):
    """A float tile (even 64.0), a bool or str setting is refused by name before any tile runs, on a
    multi-tile image and a one-tile one alike, by upscale and the staged encode; ints and floats still
    work as scale, and numpy's ints as sizes."""
    import numpy as np

    for size in (16, 40):                       # one tile, then several
        x = torch.rand(1, 3, size, size)
        with pytest.raises(ValueError, match="^" + re.escape(says) + "$"):
            upscale(model, x, **{"scale": 4, **TILE, "tile_batch": 1, **kwargs})
        with pytest.raises(ValueError, match="^" + re.escape(says) + "$"):
            encode_tiles(model, x, **{"scale": 4, **TILE, "tile_batch": 1, **kwargs})
    out = upscale(model, torch.rand(1, 3, 16, 16), np.float32(2.0), tile=np.int64(64), overlap=np.int64(16),
                  tile_batch=np.int64(1))
    assert out.image.shape == (1, 3, 32, 32)


@pytest.mark.parametrize("convention", ["-1..1", "0..255"])
def test_an_image_in_another_value_range_is_refused_not_clamped(model, convention):
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    x = x * 2 - 1 if convention == "-1..1" else x * 255
    with pytest.raises(ValueError, match=r"values span .*, but the model reads 0\.\.1: map a -1\.\.1 image "
                                         r"with \(x \+ 1\) / 2 and a 0\.\.255 one with x / 255"):
        upscale(model, x, 4, **TILE)
    with pytest.raises(ValueError, match="values span"):
        encode_tiles(model, x, 4, **TILE)
    overshoot = torch.rand(1, 3, 16, 16) * 1.1 - 0.05       # a sharpening filter's overshoot is clamped
    assert upscale(model, overshoot, 4, **TILE).image.shape == (1, 3, 64, 64)


def test_auto_tile_batch_and_device_choices(model):
    assert devices.resolve_dtype("auto", "cpu") == torch.float32
    assert devices.resolve_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError):
        devices.resolve_dtype("fp8", "cpu")
    if not torch.cuda.is_available():
        assert devices.resolve_device("auto").type in ("cpu", "mps")
    n = devices.choose_tile_batch(model, 64, 64, units=6)
    assert 1 <= n <= 4
    assert devices.choose_tile_batch(model, 64, 64, units=1) == 1
    full_tile = devices.estimate_tile_bytes(model, 768, 768)
    assert full_tile > 4 * devices.estimate_tile_bytes(model, 256, 256) > 0
    out = upscale(model, torch.rand(1, 3, 20, 20), 4, tile_batch="auto", **TILE)
    assert out.image.shape == (1, 3, 80, 80)


def test_fp16_keeps_the_vae_in_fp32(tiny_model_factory):
    m = devices.place_model(tiny_model_factory("release"), None, torch.float16)
    assert m.unet.conv_in.weight.dtype == torch.float16
    assert all(p.dtype == torch.float32 for p in m.vae.parameters())
    assert all(p.dtype == torch.float32 for p in m.mi_decoder.parameters())
    m = devices.place_model(m, None, torch.bfloat16, channels_last=True)
    assert m.vae.encoder.conv_in.weight.dtype == torch.bfloat16
    out = upscale(m, torch.rand(1, 3, 8, 8), 4, tile_batch=1, **TILE)
    assert out.image.dtype == torch.float32 and torch.isfinite(out.image).all()


class IdentityModel:
    """The model interface with identity steps: the pipeline must give back the bicubic canvas."""

    needs_attention = False
    image_reads_mask = False

    def __init__(self):
        from types import SimpleNamespace

        from tadisr_core.model import Decoded, Denoised, Encoded

        self._types = Encoded, Denoised, Decoded
        self.device = torch.device("cpu")
        self.vae = SimpleNamespace(encoder=SimpleNamespace(conv_in=SimpleNamespace(weight=torch.zeros(1, 1, 1, 1))))

    def needs_capture(self, mask=True):
        return False

    def encode(self, x, generator=None, sample=False):
        return self._types[0](x, None)

    def denoise(self, latents, capture=None):
        return self._types[1](latents, None)

    def decode(self, latents, skips, attention=None, mask=True):
        logits = torch.logit(latents[:, :1].clamp(1e-4, 1 - 1e-4)) if mask else None
        return self._types[2](latents, logits)


def test_canvases_over_half_the_free_memory_are_said_before_the_run(monkeypatch, caplog):
    """A 4096 px image into the node queued a 16384 px output: about 9 GB of RAM went to its canvases
    before the first tile ended, without a word."""
    import tadisr_core.pipeline as pipeline

    x = torch.rand(2, 3, 23, 37, generator=torch.Generator().manual_seed(9))
    need = 2 * 92 * 148 * (3 + 3 + 1) * 4  # input, image and mask canvases, float32
    for free, said in ((2 * need + 1, False), (2 * need - 1, True)):
        monkeypatch.setattr(pipeline, "host_available_memory", lambda: free)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tadisr"):
            upscale(IdentityModel(), x, 4, tile_batch=6, canvas_device="cpu", **TILE)
        message = (f"the 148x92 output takes {need / 1e9:.1f} GB for its float32 canvases, more than half of the "
                   f"{free / 1e9:.1f} GB free on cpu, and runs 12 tiles")
        assert (message in caplog.text) is said, caplog.text
    monkeypatch.setattr(pipeline, "host_available_memory", lambda: None)  # not known: no figure is made up
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tadisr"):
        upscale(IdentityModel(), x, 4, tile_batch=6, canvas_device="cpu", **TILE)
    assert caplog.text == ""


@pytest.mark.parametrize("shape, scale, tile_batch", [
    ((1, 3, 23, 37), 4, 1),     # odd sizes, 2 x 3 tiles
    ((1, 3, 10, 50), 4, 3),     # one side shorter than the tile
    ((2, 4, 13, 21), 2.5, 4),   # batch of RGBA images, fractional scale, batches across images
])
def test_identity_model_through_upscale_gives_the_canvas(shape, scale, tile_batch):
    from tadisr_core.pipeline import upscale_canvas

    x = torch.rand(shape, generator=torch.Generator().manual_seed(9))
    out = upscale(IdentityModel(), x, scale, tile_batch=tile_batch, canvas_device="cpu", **TILE)
    canvas = upscale_canvas(x, scale)
    assert out.image.shape == canvas.shape
    assert (out.image - canvas).abs().max() < 1e-4
    assert (out.mask - canvas[:, :1].clamp(1e-4, 1 - 1e-4)).abs().max() < 1e-4
    alone = upscale(IdentityModel(), x, scale, tile_batch=tile_batch, canvas_device="cpu", mask=False, **TILE)
    assert alone.mask is None and torch.equal(alone.image, out.image)


@pytest.mark.parametrize("variant", ["release", "paper"])
def test_staged_recomputed_skips_equal_kept_skips(variant, tiny_model_factory):
    m = tiny_model_factory(variant)
    x = torch.rand(1, 3, 12, 21, generator=torch.Generator().manual_seed(3))
    results = {}
    for keep in (True, False):
        tiled = encode_tiles(m, x, 4, tile_batch=2, keep_skips=keep, **TILE)
        assert (tiled.tiles[0].skips is not None) == keep and torch.equal(tiled.source, x)  # the source: colour fix
        tiled = denoise_tiles(m, tiled, tile_batch=2)
        results[keep] = decode_tiles(m, tiled, tile_batch=2)
    assert (results[True].image - results[False].image).abs().max() <= 1e-6
    assert (results[True].mask - results[False].mask).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="decode takes denoised"):
        decode_tiles(m, encode_tiles(m, x, 4, tile_batch=2, **TILE))


@pytest.mark.parametrize("keep_skips", [True, False])
def test_kept_state_is_what_the_estimate_says(model, keep_skips):
    from tadisr_core.pipeline import kept_state_bytes

    x = torch.rand(1, 4, 12, 21)
    tiled = denoise_tiles(model, encode_tiles(model, x, 4, tile_batch=2, keep_skips=keep_skips, **TILE),
                          tile_batch=2, keep_attention=True)
    assert tiled.nbytes() == kept_state_bytes(model, 12, 21, 4, channels=4, keep_attention=True,
                                              keep_skips=keep_skips, **TILE)


def test_graph_blocks_on_a_1024_px_photo_keep_under_2_gb():
    """Full-size release model (meta device): Encode -> Denoise (maps kept for the view) -> Decode."""
    from tadisr_core.model import build_model
    from tadisr_core.pipeline import kept_state_bytes
    from tadisr_core.spec import full_spec

    full = build_model(full_spec("release"), device="meta")
    kept = kept_state_bytes(full, 1024, 1024, 4, tile=768, overlap=256, keep_attention=True)
    assert kept < 2e9, kept
    with_skips = kept_state_bytes(full, 1024, 1024, 4, tile=768, overlap=256, keep_attention=True, keep_skips=True)
    assert with_skips > 25e9      # what keeping the encoder features would cost: ~27 GB


@pytest.mark.parametrize("variant", ["release", "paper"])
def test_one_heat_map_for_the_cli_and_the_node(variant, tiny_model_factory):
    from tadisr_core.heatmap import heatmap

    m = tiny_model_factory(variant)
    x = torch.rand(2, 3, 12, 21, generator=torch.Generator().manual_seed(6))
    cli = upscale(m, x, 4, tile_batch=2, attention=True, canvas_device="cpu", **TILE)       # --attention
    kept = upscale(m, x, 4, tile_batch=2, keep_attention=True, canvas_device="cpu", **TILE)  # node path
    assert torch.equal(cli.image, kept.image) and torch.equal(cli.mask, kept.mask)
    node = heatmap(kept.attention_tiles, "all", "mean", True)
    assert (node - cli.attention).abs().max() <= 1e-6
    staged = denoise_tiles(m, encode_tiles(m, x, 4, tile_batch=2, **TILE), tile_batch=2, keep_attention=True)
    for a, b in zip(staged.attention_tiles().maps, kept.attention_tiles.maps):
        assert torch.equal(a, b)
    assert set(kept.attention_tiles.groups) == ({"down", "up"} if variant == "release" else
                                               {"down", "mid", "up"})
    with pytest.raises(ValueError, match="no attention in the 'mid' layers|layers must be"):
        if variant == "release":
            heatmap(kept.attention_tiles, "mid")
        else:
            heatmap(kept.attention_tiles, "sideways")


def test_latents_of_another_model_are_refused_by_name(tiny_dir, tiny_model_factory, model, tmp_path):
    """Defect: the staged steps took latents encoded by another model: a raw channel error (another
    architecture), or a silently wrong image (the same architecture with other weights)."""
    import shutil

    from tadisr_core.loading import load_tadisr

    def load(checkpoint, dtype=torch.float32):
        return load_tadisr(tiny_dir["kolors"], checkpoint, tiny_dir["prompt_cache"], dtype=dtype)

    other_file = tmp_path / "other.safetensors"
    shutil.copy(tiny_dir["checkpoint"], other_file)
    loaded, same_in_bf16, other = load(tiny_dir["checkpoint"]), load(tiny_dir["checkpoint"], torch.bfloat16), \
        load(other_file)
    x = torch.rand(1, 3, 24, 20)
    encoded = encode_tiles(loaded, x, 4, tile_batch=2, **TILE)
    denoised = denoise_tiles(same_in_bf16, encoded, tile_batch=2)  # the same files in another dtype: one model
    decode_tiles(loaded, denoised, tile_batch=2)
    name = tiny_dir["checkpoint"].name
    for step, latents in ((denoise_tiles, encoded), (decode_tiles, denoised)):
        with pytest.raises(ValueError, match=rf"encoded by the model of {name}, not this one \(other.safetensors\): "
                                             "encode, denoise and decode with the same model"):
            step(other, latents, tile_batch=2)
    paper = tiny_model_factory("paper")  # built by hand: no files, but another architecture
    with pytest.raises(ValueError, match="encoded by a model of another architecture"):
        denoise_tiles(paper, encoded, tile_batch=2)
    # a model built by hand with this architecture (the module's): nothing to tell them apart
    decode_tiles(model, denoise_tiles(model, encoded, tile_batch=2), tile_batch=2)


def test_moving_the_model_drops_the_prompt_keys_and_values(model):
    """Defect: the cached prompt keys and values were no module state, so `.to()` (ComfyUI's unload)
    left them on the GPU. A move drops them; the next run computes them again, with the same result."""
    image = torch.rand(1, 3, 24, 32, generator=torch.Generator().manual_seed(0))
    first = upscale(model, image, 4, **TILE)
    assert len(model.prompt_kv.entries) > 0
    model.to(torch.float64)
    assert model.prompt_kv.entries == {}
    model.to(torch.float32)
    again = upscale(model, image, 4, **TILE)
    assert len(model.prompt_kv.entries) > 0
    assert torch.equal(again.image, first.image) and torch.equal(again.mask, first.mask)


def test_threads_sharing_a_model_get_the_results_of_sequential_runs():
    """Defect: the capture store and the K/V switch are the model's; two threads running one model
    mixed each other's attention maps (a channel-count error, or another image's heat map)."""
    import threading

    from tadisr_core.model_ref import load_model

    model = load_model("demo")
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(1, 3, 16, 32, generator=g) for _ in range(2)]  # three tiles each
    run = dict(scale=4, tile=64, overlap=16, tile_batch=1, attention=True)
    want = [upscale(model, x, **run) for x in images]
    got, errors, start = [[], []], [], threading.Barrier(2)

    def work(i):
        start.wait()
        try:
            got[i] = [upscale(model, images[i], **run) for _ in range(3)]
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for i in range(2):
        for r in got[i]:
            assert torch.equal(r.image, want[i].image) and torch.equal(r.mask, want[i].mask)
            assert torch.equal(r.attention, want[i].attention)


def _fails_once(model, monkeypatch, when) -> dict:
    """model.encode runs (drawing its noise), then says out of memory the first time `when(batch)` holds."""
    real, state = model.encode, {"failed": 0}

    def encode(x, generator=None, sample=False):
        enc = real(x, generator=generator, sample=sample)
        if when(x) and not state["failed"]:
            state["failed"] += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return enc

    monkeypatch.setattr(model, "encode", encode)
    return state


def test_a_seeded_sample_after_an_out_of_memory_retry_equals_a_direct_run(model, monkeypatch):
    """Review: the retries went on drawing from the generator the failed attempt had drawn from, so a
    seeded sampled result after an out-of-memory retry (a smaller tile, a halved tile batch) differed
    from a direct run with the settings that worked. Each tile's noise now follows from the seed and
    the tiling alone. The canvas is 48 x 96: one 96 px tile fails, 64 px tiles (overlap 16) work."""
    from tadisr_core.pipeline import tile_grid

    x = torch.rand(1, 3, 12, 24, generator=torch.Generator().manual_seed(2))
    seeded = dict(sample=True, seed=5)
    direct = upscale(model, x, 4, tile=64, overlap=16, tile_batch=1, **seeded).image
    staged = encode_tiles(model, x, 4, tile=64, overlap=16, tile_batch=1, **seeded).tiles

    with monkeypatch.context() as m:
        state = _fails_once(model, m, lambda x: x.shape[-1] > 64)
        retried = upscale(model, x, 4, tile=128, overlap=32, tile_batch=1, **seeded)
        assert state["failed"] == 1 and retried.grid == tile_grid(48, 96, 64, 16)
        assert torch.equal(retried.image, direct)
    with monkeypatch.context() as m:
        state = _fails_once(model, m, lambda x: x.shape[-1] > 64)
        tiles = encode_tiles(model, x, 4, tile=128, overlap=32, tile_batch=1, **seeded).tiles
        assert state["failed"] == 1
        assert all(torch.equal(a.latents, b.latents) for a, b in zip(tiles, staged, strict=True))
    with monkeypatch.context() as m:
        state = _fails_once(model, m, lambda x: len(x) == 2)  # both tiles at once: halved to one
        assert torch.equal(upscale(model, x, 4, tile=64, overlap=16, tile_batch=2, **seeded).image, direct)
        assert state["failed"] == 1


def test_a_seeded_sample_does_not_depend_on_the_tile_batch(tiny_model_factory):
    """Review: the noise of a batch was one draw for all its tiles, which (for latents of a size not a
    multiple of 16 on the CPU, and on CUDA) is not the draws of its tiles one by one: `tile_batch` changed
    a seeded sampled result. fp64, so only the noise can make a difference (the model is not bit-batch-
    invariant in fp32); 72 px tiles give 9 x 9 latents."""
    m64 = tiny_model_factory("release").double()
    m64.set_prompt(m64.prompt)
    x = torch.rand(1, 3, 23, 37, generator=torch.Generator().manual_seed(2))
    one, three = (encode_tiles(m64, x, 4, tile=72, overlap=16, tile_batch=n, sample=True, seed=5).tiles
                  for n in (1, 3))
    assert len(one) > 3 and one[0].latents.shape[-2:] == (9, 9)
    assert max(float((a.latents - b.latents).abs().max()) for a, b in zip(one, three, strict=True)) < 1e-12
    mean = encode_tiles(m64, x, 4, tile=72, overlap=16, tile_batch=1).tiles
    assert min(float((a.latents - b.latents).abs().max()) for a, b in zip(one, mean, strict=True)) > 1e-3


def _oom_once(at_call: int):
    """A function raising out-of-memory on its `at_call`-th call (1-based), once; its calls counted."""
    calls = {"n": 0}

    def maybe_raise():
        calls["n"] += 1
        if calls["n"] == at_call:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
    return maybe_raise, calls


class _OomOnTilingCopy(torch.overrides.TorchFunctionMode):
    """Out-of-memory once, on the 2nd float32 copy `tadisr_core/tiling.py` makes for the canvases."""

    def __init__(self):
        super().__init__()
        self.maybe_raise, self.calls = _oom_once(2)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        import sys

        if func is torch.Tensor.to and torch.float32 in args and \
                sys._getframe(1).f_code.co_filename.endswith("tiling.py"):
            self.maybe_raise()
        return func(*args, **(kwargs or {}))


def test_a_batch_retried_after_out_of_memory_leaves_no_trace_of_its_first_attempt(model, monkeypatch):
    """Review: a batch that ran out of memory after part of it was kept was retried on top of that part:
    tiles blended twice (up to twice as bright), attention maps and encoded tiles kept twice, every later
    one then belonging to the wrong tile. 96 x 160 px at tile 64: 6 tiles, in batches of 4."""
    import tadisr_core.pipeline as pipeline

    x = torch.rand(1, 3, 24, 40, generator=torch.Generator().manual_seed(3))
    settings = dict(tile=64, overlap=16, color_fix="none")
    direct = upscale(model, x, 4, tile_batch=1, attention=True, keep_attention=True, **settings)
    units = len(direct.grid)

    with _OomOnTilingCopy() as mode:  # XX  # the copies of the first batch's outputs for the canvases
        blended = upscale(model, x, 4, tile_batch=4, **settings)
    assert mode.calls["n"] >= 2
    assert (blended.image - direct.image).abs().max() < 2e-4 and (blended.mask - direct.mask).abs().max() < 2e-4

    maybe_raise, calls = _oom_once(1)
    real_heat = pipeline.tile_heat
    monkeypatch.setattr(pipeline, "tile_heat", lambda *a, **k: (maybe_raise(), real_heat(*a, **k))[1])
    kept = upscale(model, x, 4, tile_batch=4, attention=True, keep_attention=True, **settings)  # maps kept, then OOM
    assert calls["n"] > 1 and len(kept.attention_tiles.maps) == units
    for a, b in zip(kept.attention_tiles.maps, direct.attention_tiles.maps, strict=True):
        assert (a - b).abs().max() < 1e-4
    assert (kept.attention - direct.attention).abs().max() < 1e-4

    real_store = pipeline._store
    counted, stores = _oom_once(0)
    monkeypatch.setattr(pipeline, "_store", lambda *a, **k: (counted(), real_store(*a, **k))[1])
    staged = encode_tiles(model, x, 4, tile=64, overlap=16, tile_batch=1).tiles
    per_tile = stores["n"] // units  # the latents and the skip features
    maybe_raise, calls = _oom_once(per_tile + 1)  # the first batch's second tile, after its first was kept
    monkeypatch.setattr(pipeline, "_store", lambda *a, **k: (maybe_raise(), real_store(*a, **k))[1])
    tiles = encode_tiles(model, x, 4, tile=64, overlap=16, tile_batch=4).tiles
    assert per_tile > 1 and calls["n"] > per_tile + 1 and len(tiles) == units
    assert all((a.latents - b.latents).abs().max() < 1e-4 for a, b in zip(tiles, staged, strict=True))
