"""The wavelet colour fix (tadisr_core.color), its use in pipeline.upscale and the staged decode, and
"auto": the fix a model recommends (wavelet for the shipped demos, none for the release path)."""

from __future__ import annotations

import pytest
import torch

from tadisr_core.color import apply_color_fix, wavelet_color_fix, wavelet_lowpass


def _img(seed, shape=(1, 3, 40, 48)):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_lowpass_keeps_constants_and_the_mean_shift():
    flat = torch.full((1, 3, 20, 20), 0.3)
    assert torch.allclose(wavelet_lowpass(flat), flat)
    x = _img(0)
    assert torch.allclose(wavelet_lowpass(x + 0.1), wavelet_lowpass(x) + 0.1, atol=1e-6)


def test_colour_cast_is_removed_and_detail_kept():
    reference = _img(1) * 0.8
    detail = _img(2) * 0.1 - 0.05
    cast = torch.tensor([0.08, -0.05, 0.03]).view(1, 3, 1, 1)
    image = (reference + detail + cast).clamp(0, 1)
    fixed = wavelet_color_fix(image, reference)
    assert (fixed - reference - detail).abs().mean() < (image - reference - detail).abs().mean() / 3
    assert torch.equal(apply_color_fix(image, reference, "none"), image)
    assert torch.allclose(wavelet_color_fix(reference, reference), reference, atol=1e-6)
    with pytest.raises(ValueError, match="color_fix must be one of"):
        apply_color_fix(image, reference, "lab")


def test_upscale_colour_fix_is_off_by_default_and_changes_only_low_frequencies(tiny_model_factory):
    from tadisr_core.pipeline import upscale, upscale_canvas

    torch.manual_seed(0)
    model = tiny_model_factory()
    assert model.default_color_fix == "none"  # a model loaded from Kolors weights or built: as the release
    lr = _img(3, (1, 3, 16, 24))
    plain = upscale(model, lr, 4, 64, 16, 2)
    again = upscale(model, lr, 4, 64, 16, 2, color_fix="none")
    fixed = upscale(model, lr, 4, 64, 16, 2, color_fix="wavelet")
    assert torch.equal(plain.image, again.image)
    assert torch.equal(plain.mask, fixed.mask)
    expected = wavelet_color_fix(plain.image, upscale_canvas(lr, 4))
    assert torch.allclose(fixed.image, expected, atol=1e-5)


def test_cli_color_fix_flag(tiny_dir, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from tadisr_core import cli
    from tadisr_core.loading import load_tadisr
    from tadisr_core.pipeline import upscale_canvas

    model = load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], tiny_dir["prompt_cache"])
    src = tmp_path / "in.png"
    Image.fromarray((np.asarray(_img(4, (1, 3, 16, 20))[0].permute(1, 2, 0)) * 255).astype(np.uint8)).save(src)
    outs = {}
    for mode in ("none", "wavelet"):
        args = cli.build_parser().parse_args(["upscale", str(src), "-o", str(tmp_path / mode), "--kolors", "x",
                                              "--checkpoint", "y", "--tile", "64", "--overlap", "16", "-q",
                                              "--color-fix", mode])
        assert args.color_fix == mode and cli.run_upscale(args, model=model) == 0
        saved = np.array(Image.open(tmp_path / mode / "in_x4.png"))
        outs[mode] = torch.from_numpy(saved).permute(2, 0, 1)[None] / 255
    bicubic = upscale_canvas(torch.from_numpy(np.array(Image.open(src))).permute(2, 0, 1)[None] / 255, 4)
    err = {m: (wavelet_lowpass(o.float()) - wavelet_lowpass(bicubic)).abs().mean() for m, o in outs.items()}
    assert err["wavelet"] < err["none"] / 2, err
    assert cli.build_parser().parse_args(["upscale", "a.png", "-o", "o"]).color_fix == "auto"


def test_auto_is_the_models_own_choice_and_anything_else_is_named():
    from tadisr_core.color import resolve_color_fix

    class Recommends:
        default_color_fix = "wavelet"

    assert resolve_color_fix("auto", Recommends()) == "wavelet"
    assert resolve_color_fix("auto", object()) == "none"
    assert resolve_color_fix("none", Recommends()) == "none"
    with pytest.raises(ValueError, match=r"color_fix must be one of \('auto', 'none', 'wavelet'\), got 'lab'"):
        resolve_color_fix("lab", Recommends())


@pytest.mark.parametrize("keep_skips", [True, False])
def test_staged_decode_fixes_colours_as_the_all_in_one_upscale(tiny_model_factory, keep_skips):
    from tadisr_core.pipeline import decode_tiles, denoise_tiles, encode_tiles, upscale

    model = tiny_model_factory("paper")
    model.default_color_fix = "wavelet"
    lr = _img(5, (1, 3, 16, 24))
    tiled = denoise_tiles(model, encode_tiles(model, lr, 4, 64, 16, 2, keep_skips=keep_skips), tile_batch=2)
    for mode in ("auto", "none", "wavelet"):
        staged = decode_tiles(model, tiled, 2, color_fix=mode)
        fused = upscale(model, lr, 4, 64, 16, 2, color_fix=mode)
        assert torch.allclose(staged.image, fused.image, atol=1e-5), mode
        assert torch.allclose(staged.mask, fused.mask, atol=1e-5), mode
    auto, none = decode_tiles(model, tiled, 2).image, decode_tiles(model, tiled, 2, color_fix="none").image
    assert (auto - none).abs().max() > 1e-3  # "auto" took the model's wavelet fix


def test_a_gray_input_is_colour_fixed_as_its_rgb_form(tiny_model_factory):
    """A gray image (1 channel: gray PNG, 1-bit, 16-bit) is upscaled as RGB; the wavelet fix takes its
    low frequencies from that RGB form, in the one-call upscale and the staged decode alike (both
    used to refuse it: "image (1, 3, ...) and reference (1, 1, ...) differ"), and the result is its luma."""
    from tadisr_core.pipeline import LUMA, decode_tiles, denoise_tiles, encode_tiles, upscale

    model = tiny_model_factory("paper")
    gray = _img(6, (1, 1, 16, 24))
    rgb = gray.expand(-1, 3, -1, -1)
    fixed = upscale(model, rgb, 4, 64, 16, 2, color_fix="wavelet").image
    assert not torch.equal(fixed, upscale(model, rgb, 4, 64, 16, 2, color_fix="none").image)
    ref = torch.einsum("bchw,c->bhw", fixed, LUMA)[:, None].expand(-1, 3, -1, -1)
    assert torch.allclose(upscale(model, gray, 4, 64, 16, 2, color_fix="wavelet").image, ref, atol=1e-6)
    staged = decode_tiles(model, denoise_tiles(model, encode_tiles(model, gray, 4, 64, 16, 2), tile_batch=2), 2,
                          color_fix="wavelet")
    assert torch.allclose(staged.image, ref, atol=1e-5)


def test_the_shipped_demo_recommends_the_wavelet_fix_and_auto_applies_it(tmp_path):
    import numpy as np
    from PIL import Image

    from tadisr_core.cli import main as cli_main
    from tadisr_core.model_ref import load_model, shipped_models
    from tadisr_core.pipeline import upscale

    assert {name: m.color_fix for name, m in shipped_models().items()} == {"demo": "wavelet",
                                                                           "demo-release": "wavelet"}
    demo = load_model("demo")
    assert demo.default_color_fix == "wavelet"
    lr = _img(6, (1, 3, 24, 32))
    auto = upscale(demo, lr, 4, tile=128, overlap=32, tile_batch=1).image
    assert torch.equal(auto, upscale(demo, lr, 4, tile=128, overlap=32, tile_batch=1, color_fix="wavelet").image)
    assert not torch.equal(auto, upscale(demo, lr, 4, tile=128, overlap=32, tile_batch=1, color_fix="none").image)
    src = tmp_path / "in.png"
    Image.fromarray((lr[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(src)
    outs = {}
    for mode in ("auto", "none"):
        extra = [] if mode == "auto" else ["--color-fix", mode]
        assert cli_main(["upscale", str(src), "-o", str(tmp_path / mode), "--model", "demo", "--tile", "128",
                         "--overlap", "32", "-q", *extra]) == 0
        outs[mode] = np.asarray(Image.open(tmp_path / mode / "in_x4.png"))
    read = torch.from_numpy(np.array(Image.open(src))).permute(2, 0, 1)[None] / 255
    want = upscale(demo, read, 4, tile=128, overlap=32, tile_batch=1, color_fix="wavelet").image
    want = (want[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert np.abs(outs["auto"].astype(int) - want).max() <= 1
    assert np.abs(outs["none"].astype(int) - want).max() > 1


def test_latents_without_their_input_are_refused_by_a_decode_that_needs_it(tiny_model_factory):
    import dataclasses

    from tadisr_core.pipeline import decode_tiles, denoise_tiles, encode_tiles

    model = tiny_model_factory("release")
    model.default_color_fix = "wavelet"
    tiled = denoise_tiles(model, encode_tiles(model, _img(7, (1, 3, 16, 16)), 4, 64, 16, 1), tile_batch=1)
    bare = dataclasses.replace(tiled, source=None)
    with pytest.raises(ValueError, match="carry no LR input .* to fix the colours: encode with encode_tiles, or "
                                         "decode with color_fix='none'"):
        decode_tiles(model, bare, 1)
    assert torch.equal(decode_tiles(model, bare, 1, color_fix="none").image,
                       decode_tiles(model, tiled, 1, color_fix="none").image)


def test_the_demo_by_path_is_the_demo(tmp_path):
    """`--model tadisr_core/demo` or its weights file: the same colour fix and fp16 refusal as `demo`."""
    from tadisr_core.model_ref import DEMO_CHECKPOINT, check_dtype, load_model, shipped_model

    for ref in (DEMO_CHECKPOINT.parent, DEMO_CHECKPOINT):
        assert shipped_model(ref) == shipped_model("demo")
        assert load_model(ref).default_color_fix == "wavelet"
        with pytest.raises(ValueError, match="overflows fp16"):
            check_dtype(ref, torch.float16)
    assert shipped_model(tmp_path) is None
