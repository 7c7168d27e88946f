"""The optional wavelet colour fix (tadisr_core.color) and its use in pipeline.upscale."""

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
        saved = np.asarray(Image.open(tmp_path / mode / "in_x4.png"))
        outs[mode] = torch.from_numpy(saved).permute(2, 0, 1)[None] / 255
    bicubic = upscale_canvas(torch.from_numpy(np.asarray(Image.open(src))).permute(2, 0, 1)[None] / 255, 4)
    err = {m: (wavelet_lowpass(o.float()) - wavelet_lowpass(bicubic)).abs().mean() for m, o in outs.items()}
    assert err["wavelet"] < err["none"] / 2, err
    assert cli.build_parser().parse_args(["upscale", "a.png", "-o", "o"]).color_fix == "none"
