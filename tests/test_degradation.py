"""Real-ESRGAN-style degradation: kernels, shapes, ranges, determinism, both presets."""
from __future__ import annotations

import math
import random

import pytest
import skimage.data
import torch

from training.data import degradation as D


@pytest.fixture(scope="module")
def hr() -> torch.Tensor:
    """Two different 128x128 photo crops, [2,3,128,128] in 0..1."""
    a = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1).float() / 255
    c = torch.from_numpy(skimage.data.coffee()).permute(2, 0, 1).float() / 255
    return torch.stack([a[:, 100:228, 180:308], c[:, 100:228, 200:328]])


KERNELS = {
    "iso": lambda: D.anisotropic_gaussian_kernel(21, 2.5, 2.5, 0.0),  # as random_kernel draws "iso"
    "aniso": lambda: D.anisotropic_gaussian_kernel(21, 3.0, 0.7, 0.6),
    "generalized_low_beta": lambda: D.generalized_gaussian_kernel(15, 2.0, 1.0, -1.0, 0.5),
    "generalized_high_beta": lambda: D.generalized_gaussian_kernel(15, 2.0, 1.0, 1.0, 4.0),
    "plateau": lambda: D.plateau_kernel(13, 1.5, 2.5, 0.3, 2.0),
    "sinc": lambda: D.sinc_kernel(11, math.pi / 3),
    "sinc_large": lambda: D.sinc_kernel(21, math.pi / 5),
    "pulse": lambda: D.pulse_kernel(21),
}


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_each_kernel_type_sums_to_one(name):
    k = KERNELS[name]()
    assert k.ndim == 2 and k.shape[0] == k.shape[1] and k.shape[0] % 2 == 1
    assert abs(k.sum().item() - 1) < 1e-5
    assert torch.isfinite(k).all()


@pytest.mark.parametrize("preset", [D.REALESRGAN, D.FTSR_RELEASE], ids=lambda p: p.name)
def test_random_kernels_are_normalised_and_padded(preset):
    rng = random.Random(0)
    settings = [preset.kernel1] + ([preset.kernel2] if preset.kernel2 else [])
    for s in settings:
        for _ in range(200):  # covers every kind and the sinc branch
            k = D.random_kernel(s, rng)
            assert k.shape == (21, 21)
            assert abs(k.sum().item() - 1) < 1e-5
    for prob in (0.0, 1.0):
        k = D.random_final_sinc(rng, prob)
        assert k.shape == (21, 21) and abs(k.sum().item() - 1) < 1e-5


def test_kernel_geometry():
    k = D.anisotropic_gaussian_kernel(21, 2.0, 2.0, 0.0)  # random_kernel's "iso"
    assert torch.allclose(k, k.T, atol=1e-7) and k.argmax() == 10 * 21 + 10  # symmetric, peak at centre
    # sigma_x > sigma_y at angle 0 spreads along x (columns); rotating by 90 degrees swaps the axes.
    a = D.anisotropic_gaussian_kernel(21, 4.0, 1.0, 0.0)
    assert a[10, 15] > a[15, 10] * 100
    b = D.anisotropic_gaussian_kernel(21, 4.0, 1.0, math.pi / 2)
    assert torch.allclose(a, b.T, atol=1e-6)
    s = D.sinc_kernel(21, math.pi / 4)
    assert (s < 0).any()  # real ringing lobes


def test_blur_with_pulse_is_identity_and_gaussian_smooths(hr):
    assert torch.allclose(D.blur(hr, D.pulse_kernel()), hr)
    blurred = D.blur(hr, D.anisotropic_gaussian_kernel(21, 3.0, 3.0, 0.0))
    assert blurred.shape == hr.shape
    assert blurred.diff(dim=-1).abs().mean() < 0.5 * hr.diff(dim=-1).abs().mean()


@pytest.mark.parametrize("preset", ["realesrgan", "ftsr"])
def test_degrade_shapes_range_and_quantisation(hr, preset):
    lr = D.degrade(hr, 4, preset, torch.Generator().manual_seed(0))
    assert lr.shape == (2, 3, 32, 32) and lr.dtype == torch.float32
    assert lr.min() >= 0 and lr.max() <= 1
    assert torch.equal(lr, (lr * 255).round() / 255)
    assert not torch.equal(lr[0], lr[1])
    lr2 = D.degrade(hr[:, :, :, :64], 2, preset, torch.Generator().manual_seed(0))
    assert lr2.shape == (2, 3, 64, 32)


def test_degrade_is_deterministic_per_seed(hr):
    small = hr[:, :, :64, :64]
    a = D.degrade(small, 4, D.REALESRGAN, torch.Generator().manual_seed(7))
    b = D.degrade(small, 4, D.REALESRGAN, torch.Generator().manual_seed(7))
    c = D.degrade(small, 4, D.REALESRGAN, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_degradation_actually_degrades(hr):
    # Against a plain area downscale, the degraded LR differs clearly (noise, blur, JPEG), on every seed.
    small = hr[:, :, 32:96, 32:96]
    ref = torch.nn.functional.interpolate(small, scale_factor=0.25, mode="area")
    for seed in range(2):
        for preset in (D.REALESRGAN, D.FTSR_RELEASE):
            lr = D.degrade(small, 4, preset, torch.Generator().manual_seed(seed))
            assert (lr - ref).abs().mean() > 0.005


def test_per_sample_parameters_in_a_batch(hr):
    # The same image twice in one batch gets different degradations.
    same = hr[:1, :, :64, :64].expand(3, -1, -1, -1)
    lr = D.degrade(same, 4, D.FTSR_RELEASE, torch.Generator().manual_seed(0))
    assert not torch.equal(lr[0], lr[1]) and not torch.equal(lr[1], lr[2])


def test_noise_helpers():
    x = torch.full((2, 3, 64, 64), 0.5)
    g = torch.Generator().manual_seed(0)
    n = D.add_gaussian_noise(x, torch.tensor([10 / 255, 0.0]), torch.tensor([True, False]), g)
    assert torch.equal(n[0, 0], n[0, 1])  # gray noise: one field for all channels
    assert torch.equal(n[1], x[1])  # zero sigma: unchanged
    assert abs((n[0] - 0.5).std().item() - 10 / 255) < 0.01
    p = D.add_poisson_noise(x, torch.tensor([1.0, 1.0]), torch.tensor([False, True]), g)
    assert not torch.equal(p[0, 0], p[0, 1]) and torch.equal(p[1, 0], p[1, 2])
    assert p.min() >= 0 and p.max() <= 1


def test_jpeg_per_sample_quality(hr):
    out = D.jpeg(hr, torch.tensor([10.0, 95.0]))
    err = (out - hr).abs().flatten(1).mean(1)
    assert out.shape == hr.shape and 0 <= out.min() and out.max() <= 1
    assert err[0] > 0.01 and err[0] > 2 * D.jpeg(hr[:1], torch.tensor([95.0])).sub(hr[:1]).abs().mean()


def test_presets_match_their_sources():
    r, f = D.REALESRGAN, D.FTSR_RELEASE
    assert r.kernel1.sigma == (0.2, 3.0) and r.kernel2.sigma == (0.2, 1.5)
    assert r.noise1.sigma == (1.0, 30.0) and r.noise2.sigma == (1.0, 25.0)
    assert r.jpeg1 == r.jpeg2 == (30.0, 95.0) and r.final_sinc_prob == 0.8
    assert f.kernel1.sigma == (0.1, 0.5) and f.kernel2 is None and f.jpeg1 is None
    assert f.noise1.sigma == (15.0, 50.0) and f.jpeg2 == (60.0, 100.0)
    assert f.final_sinc_prob == 0.0 and f.noise_on_hr_prob == 0.5
    assert D.get_preset("ftsr") is f
    with pytest.raises(ValueError, match="unknown degradation preset"):
        D.get_preset("nope")


def test_bad_inputs_are_rejected(hr):
    with pytest.raises(ValueError, match="not divisible"):
        D.degrade(hr[:, :, :126], 4)
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        D.degrade(hr[0], 4)


def test_libjpeg_codec_is_pillows_and_harsher_than_kornia():
    import io

    import numpy as np
    from PIL import Image

    from training.data.degradation import jpeg, libjpeg

    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.interpolate(torch.rand(1, 3, 16, 16, generator=g), size=(64, 64), mode="bicubic",
                                        align_corners=False).clamp(0, 1)
    x = (x * 255).round() / 255
    q = torch.tensor([40.0])
    out = libjpeg(x, q)
    buf = io.BytesIO()
    Image.fromarray((x[0].permute(1, 2, 0) * 255).round().byte().numpy()).save(buf, format="JPEG", quality=40,
                                                                                 subsampling=2)
    want = torch.from_numpy(np.array(Image.open(buf).convert("RGB"))).permute(2, 0, 1).float() / 255
    assert torch.equal(out[0], want)
    err_lib = (out - x).pow(2).mean()
    err_kornia = (jpeg(x, q) - x).pow(2).mean()
    assert err_lib > err_kornia  # kornia's codec is the milder one at the same quality


def test_usm_ground_truth_sharpens_edges_only():
    from training.data.degradation import REALESRGAN, ground_truth, usm_sharpen

    x = torch.full((1, 3, 64, 64), 0.3)
    x[..., 32:] = 0.7
    y = usm_sharpen(x)
    assert y[..., 31].mean() < 0.3 and y[..., 32].mean() > 0.7  # overshoot on both sides of the step
    assert torch.allclose(y[..., :2], x[..., :2], atol=1e-6)    # flat far from the edge: unchanged
    flat = torch.full((1, 3, 32, 32), 0.5)
    assert torch.allclose(usm_sharpen(flat), flat, atol=1e-6)
    assert ground_truth(x, REALESRGAN) is x
    import dataclasses
    assert torch.equal(ground_truth(x, dataclasses.replace(REALESRGAN, usm_gt=True)), y)


def test_bicubic_preset_is_a_plain_downscale_and_the_identity_at_scale_1(hr):
    """`bicubic`: no blur, noise or JPEG; at scale 1 the LR is the (8-bit) HR itself (the demo's prior phase)."""
    q = D.quantise(hr)
    assert torch.equal(D.degrade(q, 1, "bicubic", torch.Generator().manual_seed(0)), q)
    lr = D.degrade(hr, 4, "bicubic", torch.Generator().manual_seed(0))
    want = D.quantise(torch.nn.functional.interpolate(hr, size=(32, 32), mode="bicubic", antialias=True))
    assert torch.equal(lr, want)
    assert torch.equal(lr, D.degrade(hr, 4, "bicubic", torch.Generator().manual_seed(1)))  # nothing random
