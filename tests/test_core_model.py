"""The model's three steps, the two decoder variants and the prompt cache."""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tadisr_core import devices
from tadisr_core.decoders import CDIBlock, MaskDecoder
from tadisr_core.model import build_model
from tadisr_core.prompt import RELEASE_PAD_COLUMN, PromptCache
from tadisr_core.spec import full_spec, tiny_spec


@pytest.mark.parametrize("variant", ["release", "paper"])
@torch.no_grad()
def test_steps_compose_into_forward(tiny_model_factory, variant):
    model = tiny_model_factory(variant)
    x = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(1))
    enc = model.encode(x)
    assert enc.latents.shape == (2, 4, 6, 8)
    den = model.denoise(enc.latents)
    assert (den.attention is not None) == (variant == "paper")
    dec = model.decode(den.latents, enc.skips, den.attention)
    assert dec.image.shape == (2, 3, 48, 64) and dec.mask_logits.shape == (2, 1, 48, 64)
    assert 0 <= dec.image.min() and dec.image.max() <= 1
    full = model(x)
    assert torch.equal(full.image, dec.image) and torch.equal(full.mask_logits, dec.mask_logits)


def test_cdib_is_identity_at_initialisation():
    block = CDIBlock(16, groups=4)
    image, mask = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    out_image, out_mask = block(image, mask)
    assert torch.equal(out_image, image) and torch.equal(out_mask, mask)


@torch.no_grad()
def test_release_variant_image_ignores_the_mask_stream_input(tiny_model_factory):
    model = tiny_model_factory("release")
    for name, p in model.mi_decoder.named_parameters():  # make the interaction blocks active
        if name.split(".")[-1] in ("a_l", "a_r", "b_l", "b_r"):
            p.normal_(0, 0.5)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    enc = model.encode(x)
    den = model.denoise(enc.latents)
    ref = model.decode(den.latents, enc.skips)
    original = model.mi_decoder.stream_input
    model.mi_decoder.stream_input = lambda h, a: original(h, a) + 3 * torch.randn_like(h)
    try:
        perturbed = model.decode(den.latents, enc.skips)
    finally:
        model.mi_decoder.stream_input = original
    assert torch.equal(ref.image, perturbed.image)
    assert not torch.allclose(ref.mask_logits, perturbed.mask_logits)


def test_release_decoder_structure_at_full_size():
    with torch.device("meta"):
        dec = MaskDecoder(full_spec())
    assert len(dec.state_dict()) == 220
    unique = {id(p): p for p in dec.parameters()}
    assert len(unique) == 156
    assert sum(p.numel() for p in unique.values()) == 35_672_065
    block = dec.interaction_blocks[0][0]
    assert block.block1[0].seq_l is block.block1[0].seq_r  # tied branch weights


@torch.no_grad()
def test_latent_sampling_is_seeded(tiny_model_factory):
    model = tiny_model_factory()
    x = torch.rand(1, 3, 32, 32)
    a = model.encode(x, torch.Generator().manual_seed(5), sample=True).latents
    b = model.encode(x, torch.Generator().manual_seed(5), sample=True).latents
    c = model.encode(x, torch.Generator().manual_seed(6), sample=True).latents
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, model.encode(x).latents)


def test_bad_image_shapes_are_named(tiny_model_factory):
    model = tiny_model_factory()
    with pytest.raises(ValueError, match="multiples of 8"):
        model.encode(torch.rand(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model.encode(torch.rand(1, 4, 32, 32))


def test_prompt_cache_round_trip_and_text_column(tiny_dir, tmp_path):
    cache = PromptCache.load(tiny_dir["prompt_cache"])
    assert cache.prompt_embeds.shape == (1, 32, 64) and cache.text_embeds.shape == (1, 64)
    assert cache.time_ids.shape == (1, 6)
    # left padding puts the last word of the prompt, "text", in the last column
    assert cache.text_columns == (31,)
    assert cache.columns("release-pad") == (RELEASE_PAD_COLUMN,)
    cache.save(tmp_path / "p.safetensors")
    again = PromptCache.load(tmp_path / "p.safetensors")
    assert torch.equal(again.prompt_embeds, cache.prompt_embeds) and again.text_columns == cache.text_columns
    with pytest.raises(FileNotFoundError, match="prompt-cache"):
        PromptCache.load(tmp_path / "missing.safetensors")


def test_prompt_cache_matches_a_direct_chatglm_encoding(tiny_dir):
    from diffusers.pipelines.kolors import ChatGLMModel, ChatGLMTokenizer

    from tadisr_core.prompt import compute_prompt_cache

    kolors = tiny_dir["kolors"]
    tok = ChatGLMTokenizer.from_pretrained(kolors / "tokenizer")
    enc = ChatGLMModel.from_pretrained(kolors / "text_encoder").eval()
    cache = compute_prompt_cache(enc, tok, max_length=32)
    ids = tok([cache.prompt], padding="max_length", max_length=32, return_tensors="pt")
    assert tok.convert_ids_to_tokens(int(ids["input_ids"][0, cache.text_columns[0]])).strip("\u2581") == "text"
    with torch.no_grad():
        out = enc(**ids, output_hidden_states=True)
    assert torch.allclose(cache.prompt_embeds, out.hidden_states[-2].permute(1, 0, 2))
    assert torch.allclose(cache.text_embeds, out.hidden_states[-1][-1])
    saved = PromptCache.load(tiny_dir["prompt_cache"])
    assert torch.allclose(saved.prompt_embeds, cache.prompt_embeds)


@pytest.mark.parametrize("dtype, channels_last", [(torch.float32, False), (torch.float32, True),
                                                  (torch.bfloat16, False), (torch.float64, False)])
@torch.no_grad()
def test_mugi_block_computes_only_what_the_mask_reads_with_the_same_numbers(dtype, channels_last):
    from tadisr_core.decoders import MuGIBlock

    torch.manual_seed(0)
    block = MuGIBlock(64)
    for p in block.parameters():
        p.normal_(0, 0.2)
    block.to(dtype)
    image, mask = torch.randn(2, 64, 24, 20, dtype=dtype), torch.randn(2, 64, 24, 20, dtype=dtype)
    if channels_last:
        block.to(memory_format=torch.channels_last)
        image, mask = (t.contiguous(memory_format=torch.channels_last) for t in (image, mask))
    out_image, out_mask = block(image, mask)
    ref_image, ref_mask, dropped = block.forward_both(image, mask)
    assert out_image is image and ref_image is image            # the image stream passes unchanged
    assert torch.equal(out_mask, ref_mask)
    assert all(d.shape == image.shape for d in dropped)           # what is no longer computed


class _LivePeak(TorchDispatchMode):
    """Counts the bytes of live tensor storages through a forward and keeps their peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen = set()

    def _free(self, key, n):
        self.seen.discard(key)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.seen:
                    self.seen.add(key)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._free, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


@pytest.mark.parametrize("variant", ["release", "paper"])
def test_tile_estimate_covers_the_live_decoder_peak(variant):
    """estimate_tile_bytes bounds the live-tensor peak of encode + decode of one tile; the paper
    layout's full-resolution CDIB (both streams, 2x widened) counts too."""
    model = build_model(tiny_spec(variant), "cpu")
    decoder = model.mi_decoder
    att_ch = decoder.attention_proj.in_channels if hasattr(decoder, "attention_proj") else 0
    tile = 64
    with torch.no_grad():
        for part in (model.vae, decoder):
            for p in part.parameters():
                p.normal_(0, 0.02)
        x = torch.rand(1, 3, tile, tile)
        att = torch.rand(1, att_ch, tile // 8, tile // 8) if att_ch else None
        mode = _LivePeak()
        with mode:
            enc = model.encode(x)
            out = model.decode(enc.latents, enc.skips, att)
            del out
    assert mode.peak <= devices.estimate_tile_bytes(model, tile, tile)


def test_the_module_tree_is_built_with_the_garbage_collector_paused(monkeypatch):
    """The UNet, the VAE and the LoRA injection run with the cyclic collector off (their many new objects
    set off full collections of the heap); it comes back on afterwards, also after an error, and one
    turned off by someone else stays off."""
    import gc

    import diffusers
    import peft

    from tadisr_core.gc_pause import gc_paused

    seen = {}
    for module, name in ((diffusers, "UNet2DConditionModel"), (diffusers, "AutoencoderKL"),
                         (peft, "inject_adapter_in_model")):
        real = getattr(module, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            seen.setdefault(_name, gc.isenabled())
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    build_model(tiny_spec("paper"), device="meta")
    assert seen == {"UNet2DConditionModel": False, "AutoencoderKL": False, "inject_adapter_in_model": False}
    assert gc.isenabled()
    with pytest.raises(ValueError), gc_paused():
        raise ValueError
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


# Run in a fresh interpreter: torch._dynamo (which diffusers and peft import) is not imported yet there.
FIRST_BUILD_PROBE = """
import gc, weakref
import torch

gc.disable()  # below, only reference counting frees anything


def load_a_model():
    from tadisr_core.model_ref import load_model

    return load_model("demo")


dropped = weakref.ref(load_a_model())
print("freed" if dropped() is None else "alive")
"""


def test_the_first_model_a_process_loads_is_freed_when_let_go():
    """Defect: torch._dynamo's first import, inside the first model build, leaves a reference cycle holding
    every frame on the stack at that moment, and returned frames keep their last locals: the first model a
    process loaded (`load_model`'s frames returned it) stayed in memory after its last user let go of it,
    until the cyclic collector happened to run."""
    import subprocess
    import sys

    from tests.processes import REPO, subprocess_env

    done = subprocess.run([sys.executable, "-c", FIRST_BUILD_PROBE], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["freed"]
