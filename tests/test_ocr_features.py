"""The legibility loss: PP-OCR recogniser features in torch (equal to onnxruntime) and the ``ocr`` term."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from training.config import Config, ConfigError
from training.losses import TADiSRLoss, loss_settings, ocr_feature_loss
from training.ocr_features import RecognizerFeatures, recognizer_path

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


@pytest.fixture(scope="module")
def features():
    return RecognizerFeatures()


def _text_scene(size=128):
    """Grey RGB scene in 0..1 with a black word in the top half, and its text mask."""
    img = Image.new("RGB", (size, size), (128, 128, 128))
    ImageDraw.Draw(img).text((4, 8), "Legible", font=ImageFont.truetype(FONT, 24), fill=(0, 0, 0))
    rgb = torch.from_numpy(np.asarray(img, np.float32) / 255).permute(2, 0, 1)[None]
    mask = (rgb.mean(1, keepdim=True) < 0.3).float()
    return rgb, mask


def test_features_equal_onnxruntime_on_the_same_graph(features):
    import onnx
    import onnxruntime as ort

    sub = onnx.utils.Extractor(onnx.load(str(recognizer_path()))).extract_model(
        [features.input_name], [features.output_name])
    session = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.rand(2, 3, 48, 160, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ours = features.run_graph(x).numpy()
    ref = session.run(None, {features.input_name: x.numpy()})[0]
    assert ours.shape == ref.shape == (2, 384, 3, 40)  # height / 16, width / 4
    assert np.abs(ours - ref).max() <= 1e-3 * np.abs(ref).max()


def test_features_are_frozen_and_pass_gradients_to_the_image(features):
    rgb, _ = _text_scene(64)
    x = rgb.clone().requires_grad_(True)
    features(x).abs().mean().backward()
    assert x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in features.parameters())
    assert all(b.grad is None for b in features.buffers())


def test_ocr_loss_is_zero_for_the_truth_and_without_text(features):
    hr, mask = _text_scene()
    noisy = (hr + 0.2 * torch.randn_like(hr, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert ocr_feature_loss(hr, hr, mask, features).item() == 0.0
    assert ocr_feature_loss(noisy, hr, torch.zeros_like(mask), features).item() == 0.0
    assert ocr_feature_loss(noisy, hr, mask, features).item() > 0.1


def test_ocr_loss_weighs_errors_on_the_text_over_errors_elsewhere(features):
    hr, mask = _text_scene()
    noise = 0.2 * torch.randn_like(hr, generator=torch.Generator().manual_seed(2))
    on_text = torch.zeros_like(mask)
    on_text[..., :48, :] = 1  # the text's rows
    elsewhere = torch.zeros_like(mask)
    elsewhere[..., 80:, :] = 1  # as many pixels, 32 rows below the text
    near = ocr_feature_loss((hr + noise * on_text).clamp(0, 1), hr, mask, features)
    far = ocr_feature_loss((hr + noise * elsewhere).clamp(0, 1), hr, mask, features)
    # not zero: the backbone's squeeze-and-excitation gates average over the whole input
    assert near > 1.5 * far > 0, (near.item(), far.item())


def test_ocr_term_is_off_by_default_and_needs_features_and_the_mask():
    assert loss_settings("paper").weights.ocr == 0.0 and loss_settings("release").weights.ocr == 0.0
    with pytest.raises(ValueError, match="recogniser features"):
        TADiSRLoss(loss_settings("paper", lpips=0.0, ocr=1.0), None)
    loss = TADiSRLoss(loss_settings("paper", lpips=0.0, mfl=0.0, mask_mse=0.0, mask_focal=0.0, mask_dice=0.0,
                                    ocr=1.0), None, ocr_features=torch.nn.Identity())
    sr, hr = torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="GT mask"):
        loss(sr, hr)
    out = loss(sr, hr, None, torch.ones(1, 1, 8, 8))
    assert set(out) == {"mse", "ocr", "total"}
    assert out["total"].item() == pytest.approx((out["mse"] + out["ocr"]).item(), rel=1e-6)


def test_config_builds_the_ocr_term_and_rejects_a_negative_weight():
    from training.builders import build_loss

    cfg = Config()
    cfg.loss.lpips_net, cfg.loss.ocr = "none", 2.0
    loss = build_loss(cfg)
    assert "ocr" in loss.terms and isinstance(loss.ocr_features, RecognizerFeatures)
    cfg.loss.ocr = -1.0
    with pytest.raises(ConfigError, match="loss.ocr must be >= 0"):
        cfg.validate("test")
