"""TACA capture: the UNet output is unchanged and the maps equal a direct softmax."""

import copy

import pytest
import torch

from tadisr_core.attention import (
    AttentionStore,
    attention_channels,
    cross_attention_layers,
    install_capture,
    level_grid,
)
from tadisr_core.backbone import build_unet
from tadisr_core.lora import add_lora
from tadisr_core.spec import AttentionSpec, full_spec, tiny_spec


def _inputs(spec, seed=0, tokens=7):
    g = torch.Generator().manual_seed(seed)
    u = spec.unet
    return dict(sample=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor([200, 200]),
                encoder_hidden_states=torch.randn(2, tokens, u.encoder_hid_dim, generator=g),
                added_cond_kwargs=dict(text_embeds=torch.randn(2, u.encoder_hid_dim, generator=g),
                                       time_ids=torch.randn(2, 6, generator=g)))


def _lora_unet(spec):
    torch.manual_seed(0)
    unet = add_lora(build_unet(spec.unet), spec.unet_lora).eval()
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.05)
    return unet


@pytest.mark.parametrize("layout", ["release", "paper"])
@torch.no_grad()
def test_capture_leaves_output_unchanged_and_maps_equal_direct_softmax(layout):
    spec = tiny_spec()
    attn_spec = AttentionSpec(layout=layout)
    base = _lora_unet(spec)
    hooked = copy.deepcopy(base)
    store = install_capture(hooked, attn_spec)
    x = _inputs(spec)

    inputs = {}
    layers = cross_attention_layers(hooked, attn_spec)
    handles = [m.register_forward_pre_hook(lambda mod, args, kw, name=name: inputs.__setitem__(
        name, (args[0] if args else kw["hidden_states"], kw["encoder_hidden_states"])), with_kwargs=True)
        for name, m in layers]
    store.start((3, 5))
    out = hooked(**x).sample
    store.stop()
    for h in handles:
        h.remove()

    assert (out - base(**x).sample).abs().max() <= 1e-5
    assert len(store.maps) == len(layers) == (60 if layout == "release" else 70)
    for (name, module), got in zip(layers, store.maps):
        hidden, context = inputs[name]
        q, k = module.to_q(hidden), module.to_k(context)
        b, n, _ = q.shape
        hd = k.shape[-1] // module.heads
        q = q.view(b, n, module.heads, hd).transpose(1, 2)
        k = k.view(b, -1, module.heads, hd).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) / hd ** 0.5, dim=-1)[..., [3, 5]].mean(-1)
        want = probs[:, attn_spec.head_slice(module.heads)]
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=1e-6), name


def test_channel_counts_at_full_size():
    unet = build_unet(full_spec().unet, "meta")
    assert attention_channels(unet, AttentionSpec(layout="release")) == 550
    assert attention_channels(unet, AttentionSpec(layout="paper")) == 1300
    names = [n for n, _ in cross_attention_layers(unet, AttentionSpec(layout="paper"))]
    assert names[0].startswith("down_blocks.1") and names[24].startswith("mid_block")
    assert names[-1].startswith("up_blocks.1")


def test_assemble_resizes_to_the_latent_grid_in_execution_order():
    store = AttentionStore()
    store.maps = [torch.rand(1, 2, 16), torch.rand(1, 3, 4)]  # 4x4 and 2x2 maps on an 8x8 latent
    out = store.assemble((8, 8))
    assert out.shape == (1, 5, 8, 8) and out.min() >= 0
    with pytest.raises(RuntimeError, match="no attention"):
        store.assemble((8, 8))


def test_level_grids_of_odd_latent_sides_round_up_as_the_down_blocks_do():
    assert level_grid(15, 32, 15 * 32) == (15, 32)
    assert level_grid(15, 32, 128) == (8, 16)   # 15 -> 8, 32 -> 16 (a guess from the aspect ratio gave 8x17)
    assert level_grid(15, 32, 32) == (4, 8)
    assert level_grid(25, 7, 13 * 4) == (13, 4)
    with pytest.raises(RuntimeError, match="100 positions does not tile a 15x32 latent grid"):
        level_grid(15, 32, 100)


@pytest.mark.parametrize("size", [(30, 64), (64, 30), (30, 100), (41, 150), (100, 33)])
def test_upscale_with_attention_runs_on_odd_latent_grids(size):
    """Inputs whose 4x tile has an odd latent side (e.g. 120 / 8 = 15) once failed in the heat map."""
    from tadisr_core.model import build_model, random_prompt
    from tadisr_core.pipeline import upscale

    spec = tiny_spec("paper")  # its mask stream reads the attention maps
    model = build_model(spec, prompt=random_prompt(spec), seed=0).eval()
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = upscale(model, x, 4, tile=768, overlap=256, attention=True)
    hr = (4 * size[0], 4 * size[1])
    assert out.image.shape == (1, 3, *hr) and out.attention.shape == (1, 1, *hr)
    assert torch.isfinite(out.mask).all() and torch.isfinite(out.attention).all()


@pytest.mark.parametrize("capture", [True, False])
def test_checkpoint_recomputation_repeats_capture_and_keeps_no_extra_maps(capture):
    """UNet gradient checkpointing with the store's contexts: same gradients, no maps from backward."""
    import functools

    from torch.utils.checkpoint import checkpoint

    spec = tiny_spec()
    attn_spec = AttentionSpec(layout="paper")
    grads = []
    for checkpointed in (False, True):
        unet = _lora_unet(spec).train()
        store = install_capture(unet, attn_spec)
        if checkpointed:
            unet.enable_gradient_checkpointing(functools.partial(
                checkpoint, use_reentrant=False, context_fn=store.checkpoint_contexts))
        if capture:
            store.start((3, 5))
        out = unet(**_inputs(spec)).sample
        store.stop()
        loss = out.square().mean() + (store.assemble((8, 8)).mean() if capture else 0)
        loss.backward()
        assert not store.maps and not store.replaying
        grads.append({n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None})
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


@torch.no_grad()
def test_a_batch_one_prompt_is_shared_over_the_batch_and_cached_exactly():
    """The prompt goes in at batch 1: same output and maps as the expanded prompt; the cache is exact."""
    from tadisr_core.attention import PromptKV

    spec = tiny_spec()
    attn_spec = AttentionSpec(layout="release")
    unet = _lora_unet(spec)
    kv = PromptKV()
    store = install_capture(unet, attn_spec, kv)
    x = _inputs(spec)
    prompt = x["encoder_hidden_states"][:1]
    expanded = dict(x, encoder_hidden_states=prompt.expand(2, -1, -1))
    shared = dict(x, encoder_hidden_states=prompt)

    def run(inputs):
        store.start((3, 5))
        out = unet(**inputs).sample
        store.stop()
        return out, store.assemble((8, 8))

    ref, ref_maps = run(expanded)
    out, maps = run(shared)
    assert (out - ref).abs().max() <= 1e-5 and (maps - ref_maps).abs().max() <= 1e-6
    kv.enabled = True
    first, first_maps = run(shared)
    assert len(kv.entries) == 70                                # every attn2 layer, mid block included
    cached, cached_maps = run(shared)
    assert torch.equal(first, out) and torch.equal(cached, out) and torch.equal(cached_maps, maps)
    kv.validate("other weights")
    assert not kv.entries


def test_stretch_spreads_a_map_to_0_1_but_leaves_a_flat_one_flat_and_says_so(caplog):
    """A flat map becomes zeros (not rounding noise blown up to 0..1), with a warning naming it: all zeros
    alone read as "no text anywhere" (the demo's up and mid layers attend to "text" uniformly)."""
    from tadisr_core.heatmap import stretch

    g = torch.Generator().manual_seed(0)
    varied = 0.01 + 0.01 * torch.rand(1, 1, 8, 8, generator=g)               # small but real differences
    saturated = 1 - 1e-7 * torch.rand(1, 1, 8, 8, generator=g)               # every position at the maximum
    with caplog.at_level("WARNING"):
        out = stretch(torch.cat([varied, saturated]))
    assert out[0].min() == 0 and out[0].max() == 1
    assert torch.allclose(out[0], (varied - varied.min()) / (varied.max() - varied.min()))
    assert torch.equal(out[1], torch.zeros(1, 8, 8))
    assert "the text-attention map of image 2 of 2 is flat (every position 1): it shows no place" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        stretch(varied.clone())
    assert caplog.text == ""


def test_a_heat_map_never_exceeds_the_probabilities_it_comes_from():
    """Defect: the latent-grid resize (bicubic) overshot 1 where a head's attention jumps, so `heads=max`
    over heads that attend to "text" everywhere showed the overshoot's ringing, not attention."""
    from tadisr_core.heatmap import tile_heat
    from tadisr_core.tiling import make_grid

    store = AttentionStore()
    sharp = torch.tensor([1.0, 0, 0, 1, 1, 1, 0, 0, 1, 0, 1, 0, 0, 1, 1, 0]).view(1, 1, 16)
    store.maps = [torch.cat([sharp, torch.ones(1, 1, 16)], dim=1)]          # a 4 x 4 level + an all-"text" head
    maps = store.assemble((8, 8))
    assert maps.max() > 1.05                       # what the decoder reads is left as it was captured
    grid = make_grid(64, 64, 64, 0)
    for heads in ("max", "mean"):
        heat = tile_heat(maps, grid, heads=heads)
        assert heat.max() <= 1.0
    assert torch.equal(tile_heat(maps, grid, heads="max"), torch.ones(1, 1, 64, 64))
