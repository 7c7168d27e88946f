"""PSNR/SSIM against scikit-image, OCR-A with rapidocr on rendered text, and the evaluate CLI end to end."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from training import evaluate
from training.metrics import OCRAResult, ocr_accuracy, psnr, ssim, summarize_ocr, text_similarity, to_tensor
from training.ocr import OCREngine

skm = pytest.importorskip("skimage.metrics")
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
LINES = ["QUICK BROWN FOX", "Jumps over 42", "lazy dogs"]


def _noisy_pair(seed=0, shape=(96, 120, 3), sigma=20):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, 256, shape, dtype=np.uint8)
    gt = np.asarray(Image.fromarray(gt).resize((shape[1] // 4, shape[0] // 4)).resize(shape[1::-1], Image.BICUBIC))
    pred = np.clip(gt + rng.normal(0, sigma, gt.shape), 0, 255).astype(np.uint8)
    return pred, gt


def _y(img: np.ndarray) -> np.ndarray:
    return (16.0 + img.astype(np.float64) / 255.0 @ np.array([65.481, 128.553, 24.966])) / 255.0


def _sk_ssim(a, b, **kw):
    return skm.structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False, **kw)


def test_psnr_ssim_match_skimage_rgb():
    pred, gt = _noisy_pair()
    x64, y64 = to_tensor(pred).double(), to_tensor(gt).double()
    assert psnr(x64, y64).item() == pytest.approx(skm.peak_signal_noise_ratio(gt, pred), abs=1e-5)
    ref = _sk_ssim(gt / 255.0, pred / 255.0, channel_axis=2)
    assert ssim(x64, y64).item() == pytest.approx(ref, abs=1e-7)
    assert ssim(x64.float(), y64.float()).item() == pytest.approx(ref, abs=5e-5)  # float32 path


def test_psnr_ssim_y_channel_and_crop():
    pred, gt = _noisy_pair(seed=1)
    x, y = to_tensor(pred).double(), to_tensor(gt).double()
    yp, yg = _y(pred)[4:-4, 4:-4], _y(gt)[4:-4, 4:-4]
    assert psnr(x, y, y_channel=True, crop_border=4).item() == pytest.approx(
        skm.peak_signal_noise_ratio(yg, yp, data_range=1.0), abs=1e-5)
    assert ssim(x, y, y_channel=True, crop_border=4).item() == pytest.approx(_sk_ssim(yg, yp), abs=1e-7)
    assert psnr(y, y).item() == float("inf")
    two = psnr(torch.cat([x, y]), torch.cat([y, y]))
    assert two.shape == (2,) and two[1] == float("inf")
    # defect: a border that leaves nothing failed with "[1, 3, 0, 0]" from deep inside the metric
    h, w = x.shape[-2:]
    for bad in (-1, min(h, w) // 2):
        with pytest.raises(ValueError, match=rf"a crop border of {bad} pixels leaves nothing of a {w}x{h} image"):
            psnr(x, y, crop_border=bad)


def test_ssim_needs_its_window_after_the_crop():
    # defect: 10 px left gave NaN, fewer a torch "narrow(): length must be non-negative"
    pred, gt = _noisy_pair(seed=3, shape=(30, 32, 3))
    x, y = to_tensor(pred), to_tensor(gt)
    assert torch.isfinite(ssim(x, y, crop_border=9)).all()            # 12x14 left: the 11 px window fits
    for crop, left in ((10, "12x10"), (12, "8x6")):
        with pytest.raises(ValueError, match=rf"a crop border of {crop} pixels leaves {left} of a 32x30 image, smaller "
                                             r"than SSIM's 11x11 window: use a crop border of at most 9 pixels a side"):
            ssim(x, y, crop_border=crop)
    with pytest.raises(ValueError, match=r"^a 10x10 image is smaller than SSIM's 11x11 window$"):  # no border asked
        ssim(x[..., :10, :10], y[..., :10, :10])
    with pytest.raises(ValueError, match=r"^a 10x10 image is smaller than SSIM's 11x11 window$"):
        ssim(x[..., :10, :10], y[..., :10, :10], crop_border=1)
    assert torch.isfinite(psnr(x, y, crop_border=12)).all()           # PSNR needs no window


def test_text_similarity():
    assert text_similarity("abc", "abc") == 1.0
    assert text_similarity("", "abc") == 0.0
    assert text_similarity(" abd ", "abc") == pytest.approx(2 / 3)  # one unit-cost substitution in 3
    assert text_similarity("xyz", "abc") == 0.0  # defect: a wholly wrong reading of the right length scored 0.5
    assert text_similarity("HELL", "HELLO") == pytest.approx(4 / 5)  # one deletion, over the longer length
    assert text_similarity("ABC", "abc", ignore_case=True) == 1.0
    assert text_similarity("", "") == 1.0


def _text_image(size=40) -> np.ndarray:
    im = Image.new("RGB", (512, 256), "white")
    draw, font = ImageDraw.Draw(im), ImageFont.truetype(FONT, size)
    for i, line in enumerate(LINES):
        draw.text((24, 20 + 75 * i), line, fill="black", font=font)
    return np.asarray(im)


def _degrade(img: np.ndarray, seed=0) -> np.ndarray:
    h, w = img.shape[:2]
    small = Image.fromarray(img).resize((w // 8, h // 8), Image.BICUBIC).resize((w, h), Image.BICUBIC)
    noise = np.random.default_rng(seed).normal(0, 40, img.shape)
    return np.clip(np.asarray(small, dtype=np.float64) + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def engine():
    if not Path(FONT).is_file():
        pytest.skip("DejaVu font not installed")
    e = OCREngine("rapidocr")
    e.load()
    return e


def test_ocr_a_identical_and_degraded(engine):
    gt = _text_image()
    lines = engine.detect_and_recognize(gt)
    assert [t for _, t, _ in lines] == LINES
    assert all(b.shape == (4, 2) for b, _, _ in lines)

    same = ocr_accuracy(gt, gt, engine)
    assert same.score == 1.0 and len(same.boxes) == 3
    bad = ocr_accuracy(_degrade(gt), gt, engine)
    assert len(bad.boxes) == 3 and bad.score < 0.7, bad.boxes

    blank = np.full((128, 128, 3), 200, np.uint8)
    assert ocr_accuracy(blank, blank, engine).score is None
    assert engine.has_text(gt) and not engine.has_text(blank)
    summary = summarize_ocr([same, bad, OCRAResult(None)])
    assert summary["ocr_images"] == 2 and summary["ocr_excluded_no_text"] == 1 and summary["ocr_boxes"] == 6


def test_paddleocr_backend_explains_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.delenv("TADISR_PADDLEOCR_DIR", raising=False)
    with pytest.raises(RuntimeError, match="paddle"):
        OCREngine("paddleocr", model_dir=tmp_path).load()


def test_evaluate_cli_end_to_end(tmp_path, engine, capsys, lpips_dir):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir(), gt_dir.mkdir()
    text = _text_image()
    Image.fromarray(text).save(gt_dir / "a.png")
    Image.fromarray(text).save(pred_dir / "a.png")
    noisy, clean = _noisy_pair(seed=2, shape=(64, 64, 3), sigma=10)
    Image.fromarray(clean).save(gt_dir / "b.png")
    Image.fromarray(noisy).save(pred_dir / "b.jpg")  # paired by stem across extensions
    Image.fromarray(clean).save(gt_dir / "c.png")
    (pred_dir / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    Image.fromarray(clean).save(gt_dir / "d.png")  # no prediction

    out = tmp_path / "report.json"
    rc = evaluate.main(["--pred", str(pred_dir), "--gt", str(gt_dir), "--json", str(out),
                        "--lpips-weights", str(lpips_dir)])
    assert rc == 1
    report = json.loads(out.read_text())
    rows = {r["name"]: r for r in report["pairs"]}
    assert sorted(rows) == ["a", "b"]
    assert [f["name"] for f in report["failed"]] == ["c"]
    assert report["unmatched"] == {"pred_only": [], "gt_only": ["d"], "gt_folders_left_out": {}}
    assert rows["a"]["psnr"] == evaluate.PSNR_CAP and rows["a"]["lpips"] == pytest.approx(0, abs=1e-6)
    assert rows["a"]["ocr_a"] == 1.0 and rows["b"]["ocr_a"] is None
    assert 0 < rows["b"]["ssim"] < 1 and rows["b"]["lpips"] > 0
    assert report["mean"]["ocr_images"] == 1 and report["mean"]["ocr_excluded_no_text"] == 1
    assert report["fid"] == {"skipped": evaluate.FID_NO_WEIGHTS}
    stdout = capsys.readouterr().out
    assert "MEAN" in stdout and "FAILED c" in stdout


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_fid_torchscript_and_skips(tmp_path):
    class MeanColour(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)

    ts = tmp_path / "feat.pt"
    torch.jit.script(MeanColour()).save(str(ts))
    pairs = []
    for i in range(4):
        _, img = _noisy_pair(seed=10 + i, shape=(32, 32, 3))
        p = tmp_path / f"{i}.png"
        Image.fromarray(img).save(p)
        pairs.append((str(i), p, p))
    cpu = torch.device("cpu")
    res = evaluate.compute_fid(ts, pairs, cpu)
    assert res["fid"] == pytest.approx(0, abs=1e-6)

    bogus = tmp_path / "inception.pth"
    torch.save({"w": torch.zeros(1)}, bogus)
    assert "TorchScript" in evaluate.compute_fid(bogus, pairs, cpu)["skipped"]
    assert evaluate.frechet_distance(np.zeros((5, 2)), np.ones((5, 2))) == pytest.approx(2.0)
