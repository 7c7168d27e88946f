"""Low-VRAM modes on the tiny model: fp8 weight storage, sequential offload, the precision rule."""

from __future__ import annotations

import math

import pytest
import torch

from tadisr_core.descriptor import DESCRIPTOR, part_dtypes
from tadisr_core.devices import place_model, resolve_device, resolve_dtype
from tadisr_core.loading import load_tadisr
from tadisr_core.lowvram import FP8, enable_sequential_offload
from tadisr_core.streaming import tensor_bytes

X = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


@pytest.fixture(scope="module")
def bf16_out(tiny_dir):
    model = load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], tiny_dir["prompt_cache"], dtype=torch.bfloat16,
                        merge_lora_weights=True)
    with torch.no_grad():
        return model(X), tensor_bytes(model.unet)


def test_fp8_storage_runs_on_cpu_and_stays_close_to_bf16(tiny_dir, bf16_out):
    ref, bf16_bytes = bf16_out
    model = load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], tiny_dir["prompt_cache"],
                        dtype=torch.float8_e4m3fn, merge_lora_weights=True)
    stored = {t.dtype for n, t in model.unet.named_parameters() if n.endswith("original")}
    assert stored == {FP8}
    assert model.unet.conv_in.weight.dtype == torch.bfloat16        # read as the compute dtype
    assert model.vae.decoder.conv_in.weight.dtype == torch.bfloat16
    assert tensor_bytes(model.unet) < 0.6 * bf16_bytes               # weights (not norms/biases) halved
    with torch.no_grad():
        out = model(X)
    image, mask = _psnr(out.image, ref.image), _psnr(torch.sigmoid(out.mask_logits), torch.sigmoid(ref.mask_logits))
    print(f"\nfp8_e4m3fn vs bf16 on the tiny model: image PSNR {image:.2f} dB, mask PSNR {mask:.2f} dB")
    assert torch.isfinite(out.image).all() and image > 25


def test_sequential_offload_keeps_the_output(tiny_model_factory):
    model = tiny_model_factory("release")
    with torch.no_grad():
        ref = model(X)
    moving = enable_sequential_offload(model, "cpu", block_bytes=64 << 10, resident_bytes=4 << 10)
    assert moving, "no block would move"
    calls = []
    for name in moving[:3]:
        model.get_submodule(name).register_forward_pre_hook(lambda m, a: calls.append(1))
    with torch.no_grad():
        out = model(X)
    assert calls and torch.equal(out.image, ref.image) and torch.equal(out.mask_logits, ref.mask_logits)


def test_one_precision_rule_and_one_auto():
    assert part_dtypes(torch.float16) == {"unet": torch.float16, "vae": torch.float32, "mi_decoder": torch.float32}
    assert part_dtypes(torch.bfloat16) == dict.fromkeys(("unet", "vae", "mi_decoder"), torch.bfloat16)
    assert part_dtypes(torch.float8_e4m3fn) == dict.fromkeys(("unet", "vae", "mi_decoder"), torch.bfloat16)
    assert resolve_dtype("fp8_e4m3fn", "cpu") == torch.float8_e4m3fn
    assert resolve_device("auto", auto="cpu") == torch.device("cpu")      # the host's device wins
    assert "fp8_e4m3fn" in DESCRIPTOR.dtype_choices
    with pytest.raises(ValueError, match="tile must be a multiple of 8 between 64 and 4096, got 60"):
        DESCRIPTOR.check_tile(60)
    with pytest.raises(ValueError, match="scale must be between 1 and 8, got 9"):
        DESCRIPTOR.check_scale(9)


def test_place_model_fp16_keeps_vae_fp32(tiny_model_factory):
    m = place_model(tiny_model_factory("release"), "cpu", torch.float16)
    assert m.unet.conv_in.weight.dtype == torch.float16
    assert m.vae.encoder.conv_in.weight.dtype == torch.float32
    assert m.mi_decoder.out_block[-1].weight.dtype == torch.float32
    with pytest.raises(ValueError, match="unknown offload mode"):
        place_model(m, "cpu", None, offload="disk")


def test_vram_plan_from_the_meta_model():
    from tadisr_core.memory_plan import MODES, vram_table

    rows, need = vram_table(gpus_gb=(8,), tiles=(512, 1024))
    for tile in (512, 1024):
        sizes = [need[(label, tile)] for label, _, _ in MODES]
        assert sizes == sorted(sizes, reverse=True)                # each mode lighter than the last
    assert need[("bf16", 1024)] > need[("bf16", 512)]
    assert rows[0][1][512] is not None                             # the goal: 512 px tiles on 8 GB


def test_true_size_and_offload_choice(tiny_dir):
    from tadisr_core.memory_plan import choose_offload, model_bytes

    bf = load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], tiny_dir["prompt_cache"], dtype=torch.bfloat16)
    f8 = load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], tiny_dir["prompt_cache"], dtype=torch.float8_e4m3fn)
    tensors = [*bf.state_dict().values(), bf.prompt_embeds, bf.text_embeds, bf.time_ids]  # + prompt buffers
    unique = {t.untyped_storage().data_ptr(): t for t in tensors}                           # tied weights once
    size = sum(t.numel() * t.element_size() for t in unique.values())
    assert model_bytes(bf) == size and model_bytes(f8) < size
    assert choose_offload(5 << 30, 1 << 30, 16 << 30) == "none"
    assert choose_offload(5 << 30, 1 << 30, 6 << 30) == "sequential"
    assert choose_offload(1 << 20, 1 << 20, 16 << 30, host_low_vram=True) == "sequential"
