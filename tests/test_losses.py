"""Training losses: presets, term values on known inputs, MFL weighting/detaching, ablation flags."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.config import Config
from training.losses import (
    PRESETS,
    TADiSRLoss,
    dice_loss,
    loss_settings,
    modified_focal_loss,
    sigmoid_focal_loss,
    sobel_gradients,
)


class FakeLPIPS(torch.nn.Module):
    """Records how it was called; distance = mean squared difference."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, y, normalize=False):
        self.calls.append(normalize)
        return ((x - y) ** 2).mean(dim=(1, 2, 3), keepdim=True)


def _batch(seed=0, b=2, s=16):
    g = torch.Generator().manual_seed(seed)
    sr, hr = torch.rand(b, 3, s, s, generator=g), torch.rand(b, 3, s, s, generator=g)
    logits = torch.randn(b, 1, s, s, generator=g)
    mask = (torch.rand(b, 1, s, s, generator=g) > 0.7).float()
    return sr, hr, logits, mask


def test_preset_weights():
    w = PRESETS["paper"].weights
    assert (w.mse, w.lpips, w.mfl, w.mask_mse, w.mask_focal, w.mask_dice) == (1, 5, 10, 1, 10, 1)
    assert PRESETS["paper"].lpips_normalize and not PRESETS["paper"].mask_mse_on_logits
    r = PRESETS["release"]
    # the release's swap bug: helper returns (focal, dice), caller unpacks (dice, focal)
    assert (r.weights.mse, r.weights.lpips, r.weights.mfl) == (1, 5, 0)
    assert (r.weights.mask_mse, r.weights.mask_focal, r.weights.mask_dice) == (1, 1, 10)
    assert not r.lpips_normalize and r.mask_mse_on_logits and r.lpips_net == "vgg"
    assert loss_settings("paper", mfl=0.0, lpips_net="alex").weights.mfl == 0.0
    with pytest.raises(ValueError, match="unknown loss preset"):
        loss_settings("nope")


def test_focal_known_values():
    logits = torch.zeros(1, 1, 2, 2)
    ones, zeros = torch.ones_like(logits), torch.zeros_like(logits)
    # p = 0.5: ce = ln 2, (1 - p_t)^2 = 0.25, alpha_t = 0.25 for positives, 0.75 for negatives
    assert sigmoid_focal_loss(logits, ones).item() == pytest.approx(0.25 * 0.25 * math.log(2), rel=1e-6)
    assert sigmoid_focal_loss(logits, zeros).item() == pytest.approx(0.75 * 0.25 * math.log(2), rel=1e-6)
    assert sigmoid_focal_loss(torch.full_like(logits, 20.0), ones).item() < 1e-12  # confident and right


def test_dice_known_values():
    n = 64
    target = torch.zeros(1, 1, 8, 8)
    target.view(-1)[: n // 2] = 1
    half = dice_loss(torch.zeros(1, 1, 8, 8), target)  # p = 0.5 everywhere
    assert half.item() == pytest.approx(1 - (n / 2 + 1) / (n + 1), rel=1e-6)
    perfect = dice_loss(target * 40 - 20, target)
    assert perfect.item() == pytest.approx(0.0, abs=1e-6)
    empty = dice_loss(torch.full((1, 1, 8, 8), -30.0), torch.zeros(1, 1, 8, 8))  # smoothing: 1 - 1/1
    assert empty.item() == pytest.approx(0.0, abs=1e-6)


def _sq_grad_err(sr, hr):
    """Eq. (8)'s edge term written out: per-channel Sobel x/y by explicit convolution, squared, summed."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    k = torch.stack([kx, kx.t()])[:, None]
    def grads(x):
        b, c, h, w = x.shape
        return F.conv2d(F.pad(x.reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="replicate"), k).reshape(b, c, 2, h, w)
    return (grads(sr) - grads(hr)).pow(2).sum(dim=(1, 2))[:, None]


def test_mfl_is_eq8_weighting():
    sr, hr, _, mask = _batch()
    right = mask * 40 - 20                     # confident, correct mask
    wrong = -right                              # confident, wrong everywhere
    unsure = torch.zeros_like(mask)            # p = 0.5 -> weight 0.25
    edge_err = _sq_grad_err(sr, hr).mean()
    assert modified_focal_loss(sr, hr, right, mask).item() < 1e-12
    assert modified_focal_loss(sr, hr, wrong, mask).item() == pytest.approx(edge_err.item(), rel=1e-5)
    assert modified_focal_loss(sr, hr, unsure, mask).item() == pytest.approx(0.25 * edge_err.item(), rel=1e-5)
    assert modified_focal_loss(sr, hr, unsure, mask, gamma=1.0).item() == pytest.approx(0.5 * edge_err.item(), rel=1e-5)
    assert modified_focal_loss(hr, hr, wrong, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_mfl_penalises_inverted_and_equal_luma_colour_edges():
    """The old form (|magnitude| of luma Sobel) scored both of these ~0; eq. (8) must not."""
    unsure, mask = torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8)
    step = torch.zeros(1, 3, 8, 8)
    step[..., 4:] = 1.0
    inverted = 1.0 - step                       # same gradient magnitude, opposite sign
    assert modified_focal_loss(inverted, step, unsure, mask).item() > 0.5
    # red | green with equal luma (0.299 r = 0.587 g): invisible to a luma edge map
    red_green = torch.zeros(1, 3, 8, 8)
    red_green[:, 0, :, :4] = 0.587
    red_green[:, 1, :, 4:] = 0.299
    flat_gray = torch.full((1, 3, 8, 8), 0.299 * 0.587)  # the same luma everywhere, no edge
    assert modified_focal_loss(red_green, flat_gray, unsure, mask).item() > 0.1
    # the colour edge is an edge the per-channel gradients see, and its luma is flat
    luma = (red_green * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    assert torch.allclose(luma, luma[..., :1, :1].expand_as(luma), atol=1e-6)


def test_mfl_trains_the_mask_unless_detached():
    sr, hr, _, mask = _batch()
    for detach in (False, True):
        logits = torch.zeros_like(mask).requires_grad_(True)
        sr_req = sr.clone().requires_grad_(True)
        modified_focal_loss(sr_req, hr, logits, mask, detach_weight=detach).backward()
        assert sr_req.grad.abs().sum() > 0
        if detach:
            assert logits.grad is None
        else:
            # more confidence in the right class lowers the weight: the gradient points towards the GT
            assert logits.grad.abs().sum() > 0
            assert (logits.grad[mask > 0.5] <= 0).all() and (logits.grad[mask < 0.5] >= 0).all()


def test_loss_terms_total_and_presets():
    sr, hr, logits, mask = _batch()
    fake = FakeLPIPS()
    paper = TADiSRLoss(loss_settings("paper"), fake)
    out = paper(sr, hr, logits, mask)
    assert set(out) == {"mse", "lpips", "mfl", "mask_mse", "mask_focal", "mask_dice", "total"}
    expect = (out["mse"] + 5 * out["lpips"] + 10 * out["mfl"]
              + out["mask_mse"] + 10 * out["mask_focal"] + out["mask_dice"])
    assert out["total"].item() == pytest.approx(expect.item(), rel=1e-6)
    assert out["mask_mse"].item() == pytest.approx(((torch.sigmoid(logits) - mask) ** 2).mean().item(), rel=1e-6)
    assert fake.calls == [True]

    fake = FakeLPIPS()
    release = TADiSRLoss(loss_settings("release"), fake)
    out = release(sr, hr, logits, mask)
    assert set(out) == {"mse", "lpips", "mask_mse", "mask_focal", "mask_dice", "total"}  # no MFL
    assert fake.calls == [False]  # LPIPS on [0, 1] inputs, as released
    assert out["mask_mse"].item() == pytest.approx(((logits - mask) ** 2).mean().item(), rel=1e-6)
    expect = out["mse"] + 5 * out["lpips"] + out["mask_mse"] + out["mask_focal"] + 10 * out["mask_dice"]
    assert out["total"].item() == pytest.approx(expect.item(), rel=1e-6)


def test_loss_needs_lpips_and_mask():
    with pytest.raises(ValueError, match="LPIPS"):
        TADiSRLoss(loss_settings("paper"), None)
    loss = TADiSRLoss(loss_settings("paper", lpips=0.0), None)
    sr, hr, _, _ = _batch()
    with pytest.raises(ValueError, match="mask"):
        loss(sr, hr)


@pytest.mark.parametrize("flags, expected", [
    ({}, {"mse", "mfl", "mask_mse", "mask_focal", "mask_dice"}),
    ({"no_mfl": True}, {"mse", "mask_mse", "mask_focal", "mask_dice"}),
    ({"no_jsd": True}, {"mse"}),                      # no mask stream: mask terms and MFL go
    ({"no_taca": True}, {"mse", "mfl", "mask_mse", "mask_focal", "mask_dice"}),  # a model change only
])
def test_ablation_flags_select_terms(flags, expected):
    from training.builders import build_loss

    cfg = Config()
    cfg.loss.lpips_net = "none"  # explicit: no LPIPS term
    for k, v in flags.items():
        setattr(cfg.ablation, k, v)
    loss = build_loss(cfg)
    assert set(loss.terms) == expected
    sr, hr, logits, mask = _batch()
    assert set(loss(sr, hr, logits, mask)) == expected | {"total"}


def test_lpips_none_must_be_explicit_and_consistent():
    from training.builders import build_loss
    from training.config import ConfigError

    cfg = Config()
    cfg.loss.lpips_net, cfg.loss.lpips = "none", 5.0
    with pytest.raises(ConfigError, match="lpips_net = none"):
        build_loss(cfg)


def test_real_lpips_term_is_differentiable(lpips_dir):
    from training.builders import build_loss

    cfg = Config()
    cfg.loss.lpips_net, cfg.loss.lpips_weights = "alex", str(lpips_dir)
    loss = build_loss(cfg)
    sr, hr, logits, mask = _batch(s=32)
    sr.requires_grad_(True)
    out = loss(sr, hr, logits, mask)
    out["total"].backward()
    assert out["lpips"].item() > 0 and torch.isfinite(sr.grad).all() and sr.grad.abs().sum() > 0


def test_sobel_on_a_step_edge():
    x = torch.zeros(1, 2, 6, 6)
    x[:, 0, :, 3:] = 1.0
    g = sobel_gradients(x)
    assert g.shape == (1, 2, 2, 6, 6)
    assert g[0, 0, 0, 2, 2].item() == pytest.approx(4.0) and g[0, 0, 0, 2, 3].item() == pytest.approx(4.0)
    assert g[0, 0, 0, 2, 0].item() == 0.0 and g[0, 0, 0, 2, 5].item() == 0.0
    assert g[0, 0, 1].abs().max().item() == 0.0 and g[0, 1].abs().max().item() == 0.0

