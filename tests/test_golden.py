"""Golden slices: fixed-seed tiny models of both variants, a few output values of each step.

Any numeric change of the release path (encode, denoise, decode, the tiled upscale) shows here.
The values were recorded from the code before the speed work of issue 14 (unmerged LoRA, full
MuGI blocks, prompt K/V recomputed per tile) and must not move beyond 1e-4. They pin the default
inference path (LoRA merged since then, within 3e-5 here); optimisations that round differently
state their own tolerance in their tests (tests/test_variants_battery.py).
"""

from __future__ import annotations

import pytest
import torch

from tadisr_core.model import build_model, random_prompt
from tadisr_core.pipeline import upscale
from tadisr_core.spec import tiny_spec

ATOL = 1e-4
COUNT = 8                     # values per output, evenly spread over its flat positions


def golden_model(variant: str, merge_lora: bool = True):
    """Tiny random model with every LoRA, skip conv and interaction scale active (seeded), prepared for
    inference as loading does by default (LoRA merged)."""
    spec = tiny_spec(variant)
    model = build_model(spec, prompt=random_prompt(spec, seed=3), seed=11).eval()
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.split(".")[-1]
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif leaf in ("a_l", "a_r", "b_l", "b_r"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "skip_conv" in name and ".lora_" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.for_inference(merge_lora=merge_lora)


def golden_input(shape=(1, 3, 48, 64), seed: int = 4) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def _take(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().float().flatten()
    picks = torch.linspace(3, flat.numel() - 2, COUNT).long()
    return torch.cat([flat[picks], flat.mean().view(1)])    # 8 values and the mean of all


@torch.no_grad()
def run_steps(model) -> dict[str, torch.Tensor]:
    """Slices of encode, denoise and decode on one 48 x 64 image."""
    enc = model.encode(golden_input())
    den = model.denoise(enc.latents)
    dec = model.decode(den.latents, enc.skips, den.attention)
    out = {"encode": _take(enc.latents), "skip": _take(enc.skips[-1]), "denoise": _take(den.latents),
           "image": _take(dec.image), "mask_logits": _take(dec.mask_logits)}
    if den.attention is not None:
        out["attention"] = _take(den.attention)
    return out


def run_upscale(model) -> dict[str, torch.Tensor]:
    """Slices of a full tiled x4 upscale (2 x 3 tiles of 64 px, overlap 16, batches of 2)."""
    res = upscale(model, golden_input((1, 3, 23, 37), seed=5), 4, tile=64, overlap=16, tile_batch=2,
                  canvas_device="cpu")
    return {"upscale_image": _take(res.image), "upscale_mask": _take(res.mask)}


GOLDEN = {
    "release": {
        'encode': [-0.158173, -0.249862, -0.001327, -0.049513, -0.109909, 0.066268, 0.017376, -0.024657, -0.030104],
        'skip': [-5.421913, 11.86827, 5.666566, -0.129259, 14.208966, -0.560152, -14.968628, 6.686975, 1.756687],
        'denoise': [-0.253323, -0.021792, -0.012891, -0.355666, -0.223167, 0.02845, 0.227318, 0.282096, -0.002948],
        'image': [0.493245, 1.0, 0.271712, 0.335184, 0.30372, 0.71586, 0.353908, 0.5755, 0.510508],
        'mask_logits': [0.025633, 0.192157, 0.117045, -0.073678, 0.327473, 0.838999, -0.085803, -0.016137, 0.195835],
        'upscale_image': [0.4992, 0.922791, 0.913398, 0.945798, 0.552784, 0.0, 0.403633, 0.538591, 0.516742],
        'upscale_mask': [0.523643, 0.597072, 0.577508, 0.488463, 0.59687, 0.752159, 0.510925, 0.485246, 0.559855],
    },
    "paper": {
        'encode': [-0.158173, -0.249862, -0.001327, -0.049513, -0.109909, 0.066268, 0.017376, -0.024657, -0.030104],
        'skip': [-5.421913, 11.86827, 5.666566, -0.129259, 14.208966, -0.560152, -14.968628, 6.686975, 1.756687],
        'denoise': [-0.253323, -0.021792, -0.012891, -0.355666, -0.223167, 0.02845, 0.227318, 0.282096, -0.002948],
        'image': [0.487757, 1.0, 0.239967, 0.333401, 0.304992, 0.713018, 0.371548, 0.572473, 0.510487],
        'mask_logits': [-0.021341, 0.885715, -0.768929, -0.080222, -0.133574, -0.082528, -0.117669, -0.201841,
                        -0.050236],
        'attention': [0.04056, 0.028625, 0.031975, 0.028358, 0.02708, 0.032166, 0.02458, 0.033121, 0.032793],
        'upscale_image': [0.501045, 0.920696, 0.820088, 0.962668, 0.554897, 0.0, 0.393948, 0.536734, 0.516652],
        'upscale_mask': [0.49859, 0.457994, 0.407891, 0.467829, 0.53816, 0.476809, 0.443992, 0.450041, 0.487977],
    },
}


@pytest.fixture(scope="module", params=["release", "paper"])
def variant_model(request):
    return request.param, golden_model(request.param)


def _check(got: dict[str, torch.Tensor], want: dict[str, list[float]]) -> None:
    assert set(want) <= set(got), f"missing outputs {set(want) - set(got)}"
    for name, values in want.items():
        diff = (got[name] - torch.tensor(values)).abs().max().item()
        assert diff <= ATOL, f"{name}: got {got[name].tolist()}, golden {values} (max diff {diff:.2e})"


def test_golden_steps(variant_model):
    variant, model = variant_model
    _check(run_steps(model), {k: v for k, v in GOLDEN[variant].items() if not k.startswith("upscale_")})


def test_golden_tiled_upscale(variant_model):
    variant, model = variant_model
    want = {k: v for k, v in GOLDEN[variant].items() if k.startswith("upscale_")}
    assert want
    _check(run_upscale(model), want)
