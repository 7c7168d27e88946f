"""One battery of equivalence checks run over a table of cases (both variants, fp32 and fp64).

Each speed-up of the inference path is stated here with its tolerance:
- MuGI blocks computing only the image-branch half the mask reads: bit-identical.
- the prompt's keys and values shared over the batch and cached per device and dtype: bit-identical
  to recomputing them, and recomputed after the prompt or the weights change.
- image-only decode (`mask=False`): the image is bit-identical.
- LoRA merged into the base weights: equal within 1e-4 in fp32 (3e-5 seen on these random tiny
  models), 1e-6 in fp64 (the outputs are float32); unmerging restores the separate model.
plus the usual: batch of tiles = tiles one by one, save/load round trip.
"""

from __future__ import annotations

import pytest
import torch

from tadisr_core.decoders import MuGIBlock
from tadisr_core.model import random_prompt
from tadisr_core.pipeline import upscale
from tests.test_golden import golden_input, golden_model

TILE = dict(tile=64, overlap=16, tile_batch=2, canvas_device="cpu")

CASES = [
    # (id, variant, dtype, merged-vs-unmerged tolerance)
    ("release-fp32", "release", torch.float32, 1e-4),
    ("paper-fp32", "paper", torch.float32, 1e-4),
    ("release-fp64", "release", torch.float64, 1e-6),    # outputs are float32: 1e-6 is rounding
    ("paper-fp64", "paper", torch.float64, 1e-6),
]


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def case(request):
    _, variant, dtype, tol = request.param
    model = golden_model(variant, merge_lora=False).to(dtype)
    model.set_prompt(model.prompt)
    return model, dtype, tol


def _x(dtype, shape=(2, 3, 32, 40), seed=7):
    return golden_input(shape, seed).to(dtype)


@torch.no_grad()
def _steps(model, x, mask=True):
    enc = model.encode(x)
    den = model.denoise(enc.latents, capture=model.needs_capture(mask))
    return den, model.decode(den.latents, enc.skips, den.attention, mask=mask)


@torch.no_grad()
def test_mugi_shortcut_is_bit_identical(case, monkeypatch):
    model, dtype, _ = case
    _, fast = _steps(model, _x(dtype))
    monkeypatch.setattr(MuGIBlock, "forward", lambda self, i, m: self.forward_both(i, m)[:2])
    _, full = _steps(model, _x(dtype))
    assert torch.equal(fast.image, full.image) and torch.equal(fast.mask_logits, full.mask_logits)


@torch.no_grad()
def test_prompt_kv_cache_is_exact_and_follows_prompt_and_weights(case):
    model, dtype, _ = case
    x = _x(dtype)
    model.prompt_kv.clear()
    first = _steps(model, x)[1]
    assert len(model.prompt_kv.entries) == 70                  # every attn2 layer, one device and dtype
    second = _steps(model, x)[1]                                 # served from the cache
    model.cache_prompt_kv = False
    try:
        fresh = _steps(model, x)[1]
    finally:
        model.cache_prompt_kv = True
    for a, b in ((first, second), (first, fresh)):
        assert torch.equal(a.image, b.image) and torch.equal(a.mask_logits, b.mask_logits)

    old = model.prompt
    model.set_prompt(random_prompt(model.spec, seed=9, text_columns=old.text_columns))
    assert not model.prompt_kv.entries
    other = _steps(model, x)[1]
    assert not torch.equal(other.mask_logits, first.mask_logits)
    model.set_prompt(old)

    to_k = model.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k
    weight = to_k.base_layer.weight if hasattr(to_k, "base_layer") else to_k.weight
    saved = weight.clone()
    weight.mul_(1.5)                                             # an in-place weight change
    changed = _steps(model, x)[1]
    model.cache_prompt_kv = False
    try:
        want = _steps(model, x)[1]
    finally:
        model.cache_prompt_kv = True
    weight.copy_(saved)
    assert torch.equal(changed.image, want.image) and not torch.equal(changed.image, first.image)
    assert torch.equal(_steps(model, x)[1].image, first.image)   # and back


@torch.no_grad()
def test_image_only_decode_gives_the_same_image(case):
    model, dtype, _ = case
    _, joint = _steps(model, _x(dtype))
    _, alone = _steps(model, _x(dtype), mask=False)
    assert alone.mask_logits is None and torch.equal(alone.image, joint.image)
    res_joint = upscale(model, golden_input((1, 3, 23, 37), 5).to(dtype), 4, **TILE)
    res_alone = upscale(model, golden_input((1, 3, 23, 37), 5).to(dtype), 4, mask=False, **TILE)
    assert res_alone.mask is None and torch.equal(res_alone.image, res_joint.image)


@torch.no_grad()
def test_merged_lora_equals_separate_within_rounding(case):
    model, dtype, tol = case
    x = golden_input((1, 3, 23, 37), 5).to(dtype)
    separate = upscale(model, x, 4, **TILE)
    assert not model.lora_merged and model.merge_lora() > 0 and model.lora_merged
    try:
        merged = upscale(model, x, 4, **TILE)
    finally:
        model.unmerge_lora()
    assert not model.lora_merged
    for a, b in ((separate.image, merged.image), (separate.mask, merged.mask)):
        assert (a - b).abs().max().item() <= tol
    again = upscale(model, x, 4, **TILE)
    assert (again.image - separate.image).abs().max().item() <= tol


@torch.no_grad()
def test_batch_of_tiles_equals_one_by_one(case):
    model, dtype, _ = case
    x = _x(dtype, (3, 3, 32, 40), seed=8)
    _, together = _steps(model, x)
    singles = [_steps(model, x[i:i + 1])[1] for i in range(3)]
    tol = 2e-4 if dtype == torch.float32 else 1e-6    # fp32 CPU convs round per batch size (~1 ulp, amplified)
    assert (together.image - torch.cat([s.image for s in singles])).abs().max() <= tol
    assert (together.mask_logits - torch.cat([s.mask_logits for s in singles])).abs().max() <= tol


def test_save_load_round_trip(case, tmp_path):
    from tadisr_core.checkpoint import apply_checkpoint, load_checkpoint, save_model

    model, dtype, _ = case
    if dtype != torch.float32:
        pytest.skip("checkpoints are written in fp32")
    ref = golden_model(model.spec.variant, merge_lora=False)   # fresh: the shared one went through merges
    save_model(ref, tmp_path / "m.safetensors")
    other = golden_model(model.spec.variant, merge_lora=False)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if ".lora_" in name or name.startswith("mi_decoder."):
                p.zero_()
    apply_checkpoint(other, load_checkpoint(tmp_path / "m.safetensors"))
    x = _x(dtype)
    a, b = _steps(ref, x)[1], _steps(other, x)[1]
    assert torch.equal(a.image, b.image) and torch.equal(a.mask_logits, b.mask_logits)
