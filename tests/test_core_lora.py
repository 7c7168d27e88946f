"""LoRA with the release's naming: zero-B identity, merge equivalence, ranks from tensors."""

import copy

import torch

from tadisr_core.backbone import build_unet
from tadisr_core.lora import add_lora, lora_layers, lora_rank, merge_lora, unmerge_lora
from tadisr_core.spec import tiny_spec


def _unet_inputs(spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = spec.unet
    return dict(sample=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor([200, 200]),
                encoder_hidden_states=torch.randn(2, 5, u.encoder_hid_dim, generator=g),
                added_cond_kwargs=dict(text_embeds=torch.randn(2, u.encoder_hid_dim, generator=g),
                                       time_ids=torch.randn(2, 6, generator=g)))


@torch.no_grad()
def test_lora_with_zero_b_equals_the_base_model():
    spec = tiny_spec()
    torch.manual_seed(0)
    base = build_unet(spec.unet).eval()
    lora = add_lora(copy.deepcopy(base), spec.unet_lora).eval()
    layers = lora_layers(lora)
    assert len(layers) == 772  # the release's count: 1544 LoRA tensors / 2
    assert all(torch.count_nonzero(p) == 0 for n, p in lora.named_parameters() if ".lora_B." in n)
    base_weights = base.state_dict()
    assert all(torch.equal(base_weights[n.replace(".base_layer", "")], p)
               for n, p in lora.state_dict().items() if ".lora_" not in n)
    x = _unet_inputs(spec)
    with_lora = lora(**x).sample
    for layer in layers:
        layer.enable_adapters(False)
    # Exact within one model: with separately allocated copies of the same weights, some CPU BLAS
    # kernels (AVX-512 MKL) round differently depending on the buffers' alignment.
    assert torch.equal(with_lora, lora(**x).sample)
    torch.testing.assert_close(with_lora, base(**x).sample, rtol=0, atol=1e-5)


@torch.no_grad()
def test_merged_equals_unmerged():
    spec = tiny_spec()
    torch.manual_seed(0)
    unet = add_lora(build_unet(spec.unet), spec.unet_lora).eval()
    for n, p in unet.named_parameters():
        if ".lora_B." in n:
            p.normal_(0, 0.05)
    x = _unet_inputs(spec)
    unmerged = unet(**x).sample
    assert merge_lora(unet) == 772
    merged = unet(**x).sample
    assert (merged - unmerged).abs().max() <= 1e-5
    assert unmerge_lora(unet) == 772
    assert (unet(**x).sample - unmerged).abs().max() <= 1e-5


def test_scaling_is_alpha_over_rank_and_rank_is_read_from_tensors():
    spec = tiny_spec()
    unet = add_lora(build_unet(spec.unet, "meta"), spec.unet_lora)
    layer = lora_layers(unet)[0]
    assert layer.scaling["default"] == 2.0
    assert lora_rank(unet.state_dict(), "default") == 4
    assert lora_rank(unet.state_dict(), "vae_skip") is None
