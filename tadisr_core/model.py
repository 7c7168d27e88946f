"""The TADiSR model: LoRA-tuned Kolors UNet and VAE, TACA capture and the joint decoders.

Three steps, each usable alone (the ComfyUI graph blocks map onto them), composed by `forward`:
    encode(image)                  -> Encoded(latents, skips)        VAE encoder (+ LoRA), skip features
    denoise(latents, capture)      -> Denoised(latents, attention)   one UNet pass at t=200, x0 estimate
    decode(latents, skips, attn)   -> Decoded(image, mask_logits)    joint image / text-mask decoders
Images are float tensors [B, 3, H, W] in 0..1 with H, W multiples of 8.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import nn

from .attention import PromptKV, attention_channels, install_capture, prompt_projections
from .backbone import build_unet, build_vae
from .decoders import MaskDecoder
from .lora import add_lora, add_skip_convs, lora_layers, merge_lora, skip_conv, unmerge_lora
from .prompt import PromptCache
from .schedule import OneStep
from .spec import TADiSRSpec


@dataclass
class Encoded:
    """What `TADiSRModel.encode` returns: the VAE latents and the encoder features the joint decoder reuses."""

    latents: torch.Tensor                   # (B, 4, H/8, W/8), scaled by the VAE scaling factor
    skips: list[torch.Tensor] | None        # encoder features before each down block, full res first


@dataclass
class Denoised:
    """What `TADiSRModel.denoise` returns: the one-step x0 latents and the captured text attention."""

    latents: torch.Tensor                   # x0 estimate, same layout as Encoded.latents
    attention: torch.Tensor | None          # (B, C, H/8, W/8) TACA maps, when captured


@dataclass
class Decoded:
    """What `TADiSRModel.decode` returns: the upscaled image and the text-mask logits."""

    image: torch.Tensor                     # (B, 3, H, W) in 0..1
    mask_logits: torch.Tensor | None        # (B, 1, H, W); sigmoid gives the text mask (None: image only)


class TADiSRModel(nn.Module):
    """The whole model. Build it with `build_model` (random / meta) or `tadisr_core.loading`."""

    def __init__(self, spec: TADiSRSpec, unet: nn.Module, vae: nn.Module, prompt: PromptCache | None = None,
                 decoder_device: str | torch.device | None = None):
        """`decoder_device` (default: the UNet's) builds the mask decoder elsewhere; "meta" leaves it
        to be filled by `apply_checkpoint`, which then assigns the checkpoint's tensors."""
        super().__init__()
        self.spec = spec
        self.unet = unet
        self.vae = vae
        if spec.skip_convs:
            add_skip_convs(vae, spec.vae)
        add_lora(unet, spec.unet_lora)
        add_lora(vae, spec.vae_lora, exclude_prefixes=() if spec.encoder_lora else ("encoder.",))
        self.prompt_kv = PromptKV()
        self._pass_lock = threading.RLock()  # one UNet pass at a time: the capture and K/V state are per model
        self.cache_prompt_kv = True        # reuse the prompt's keys and values between no-grad passes
        self.attention_store = install_capture(unet, spec.attention, self.prompt_kv)
        self._kv_modules = prompt_projections(unet)
        n_att = attention_channels(unet, spec.attention) if spec.mask_input == "attention" else 0
        with torch.device(decoder_device or unet.conv_in.weight.device):
            self.mi_decoder = MaskDecoder(spec, n_att)
        self.one_step = OneStep(spec.schedule, spec.timestep)
        self._prompt_meta: tuple[str, tuple[int, ...], str] | None = None
        self.default_color_fix = "none"    # what color_fix="auto" applies (color.py); the demos recommend "wavelet"
        self.weights_id: tuple | None = None  # the files the weights were read from (set by the loaders; staged
        #                                       latents record it, so another model's latents are refused)
        if prompt is not None:
            self.set_prompt(prompt)

    # -- conditioning -------------------------------------------------------------------------
    def set_prompt(self, prompt: PromptCache) -> None:
        """Use this prompt conditioning; it is kept as (non-saved) buffers, so it follows `.to(device)`."""
        prompt.check_fits(self.spec.unet.encoder_hid_dim)
        want = (self.spec.prompt_tokens, self.spec.text_hidden)
        if tuple(prompt.prompt_embeds.shape[1:]) != want:
            raise ValueError(f"prompt cache has embeddings {tuple(prompt.prompt_embeds.shape)}, "
                             f"this model needs (1, {want[0]}, {want[1]})")
        device = self.unet.conv_in.weight.device
        for name in ("prompt_embeds", "text_embeds", "time_ids"):
            self.register_buffer(name, getattr(prompt, name).to(device, torch.float32), persistent=False)
        self._prompt_meta = (prompt.prompt, tuple(prompt.text_columns), prompt.note)
        self.prompt_kv.clear()

    @property
    def prompt(self) -> PromptCache | None:
        """The prompt conditioning in use (None until `set_prompt`)."""
        if self._prompt_meta is None:
            return None
        return PromptCache(self.prompt_embeds, self.text_embeds, self.time_ids, *self._prompt_meta)

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def needs_attention(self) -> bool:
        """Whether decode reads the captured attention (paper layout) or not (release layout)."""
        return hasattr(self.mi_decoder, "attention_proj")

    @property
    def image_reads_mask(self) -> bool:
        """Whether the image stream reads the mask stream (paper CDIB) or passes unchanged (release MuGI)."""
        return self.mi_decoder.image_reads_mask

    def needs_capture(self, mask: bool = True) -> bool:
        """Whether decode (with or without the mask) reads the captured attention."""
        return self.needs_attention and (mask or self.image_reads_mask)

    # -- inference preparation -----------------------------------------------------------------
    def merge_lora(self) -> int:
        """Fold every LoRA into its base weight (fewer kernels per tile; equal within float rounding).
        Returns the number of layers merged; `unmerge_lora` undoes it."""
        return merge_lora(self)

    def unmerge_lora(self) -> int:
        """Separate the LoRA weights again (exact up to rounding)."""
        return unmerge_lora(self)

    @property
    def lora_merged(self) -> bool:
        """Whether the LoRA weights are folded into the base weights."""
        return any(m.merged for m in lora_layers(self))

    def for_inference(self, merge_lora: bool = True) -> "TADiSRModel":
        """Eval mode without gradients and, by default, the LoRA merged (what loading does). Returns self."""
        self.eval().requires_grad_(False)
        if merge_lora:
            self.merge_lora()
        return self

    # -- the three steps ---------------------------------------------------------------------
    def encode(self, image: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None,
               sample: bool = False) -> Encoded:
        """VAE-encode `image` (0..1). Uses the latent mean unless `sample` (seeded by `generator`, or by a
        list of one generator per image, each drawing its image's noise where it lives)."""
        _check_image(image)
        vae, enc = self.vae, self.vae.encoder
        dtype = enc.conv_in.weight.dtype
        h = enc.conv_in((image * 2 - 1).to(dtype))
        skips = []
        for block in enc.down_blocks:
            skips.append(h)
            h = block(h)
        h = enc.conv_out(enc.conv_act(enc.conv_norm_out(enc.mid_block(h))))
        if vae.quant_conv is not None:
            h = vae.quant_conv(h)
        mean, logvar = h.chunk(2, dim=1)
        if sample:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            mean = mean + std * _noise_like(mean, generator)
        return Encoded(mean * vae.config.scaling_factor, skips if self.spec.skip_convs else None)

    def denoise(self, latents: torch.Tensor, capture: bool | None = None) -> Denoised:
        """One UNet pass at the fixed timestep; x0 estimate plus (optionally) the TACA maps."""
        if self.prompt is None:
            raise RuntimeError("no prompt conditioning: load a prompt cache with set_prompt() first")
        capture = self.needs_attention if capture is None else capture
        b = latents.shape[0]
        dtype = self.unet.conv_in.weight.dtype
        p = self.prompt
        cond = dict(text_embeds=p.text_embeds.to(dtype).expand(b, -1), time_ids=p.time_ids.to(dtype).expand(b, -1))
        t = torch.full((b,), self.spec.timestep, device=latents.device, dtype=torch.long)
        store, kv = self.attention_store, self.prompt_kv
        # The capture store and the K/V switch are the model's, not the call's: threads sharing the
        # model (two ComfyUI queues, a server) take turns from the store's start to its maps' assembly.
        with self._pass_lock:
            kv.enabled = self.cache_prompt_kv and not torch.is_grad_enabled()
            if kv.enabled:
                kv.validate(self._prompt_fingerprint())
            if capture:
                store.start(p.columns(self.spec.attention.token))
            try:
                # The prompt goes in at batch 1: every attn2 layer shares its keys and values over the batch.
                eps = self.unet(latents.to(dtype), t, encoder_hidden_states=p.prompt_embeds.to(dtype),
                                added_cond_kwargs=cond, return_dict=False)[0]
            finally:
                store.stop()
                kv.enabled = False
            attention = store.assemble(tuple(latents.shape[-2:])) if capture else None
        return Denoised(self.one_step.x0(latents.to(eps.dtype), eps), attention)

    def decode(self, latents: torch.Tensor, skips: list[torch.Tensor] | None,
               attention: torch.Tensor | None = None, mask: bool = True) -> Decoded:
        """Joint decoding: the VAE decoder's up blocks in lock-step with the mask decoder's.

        `mask=False` returns the image alone (mask_logits None) and skips the mask work the image
        does not read: the whole mask stream in the release layout (its image stream never reads
        it), the last mask up block and the logit head in the paper layout. The image is the same.
        """
        vae, dec, joint = self.vae, self.vae.decoder, self.mi_decoder
        dtype = dec.conv_in.weight.dtype
        z = latents.to(dtype) / vae.config.scaling_factor
        if vae.post_quant_conv is not None:
            z = vae.post_quant_conv(z)
        h = dec.mid_block(dec.conv_in(z))
        m = joint.stream_input(h, attention) if mask or joint.image_reads_mask else None
        rev = skips[::-1] if skips is not None else None
        last = len(dec.up_blocks) - 1
        for i, (inter, up_image, up_mask) in enumerate(zip(joint.interaction_blocks, dec.up_blocks, joint.up_blocks)):
            if i > 0 and rev is not None:
                # skip_conv_1 exists in the release but is never applied; skips start at step 1.
                h = h + skip_conv(vae, i + 1)(rev[i].to(dtype))
            if m is not None:
                h, m = inter(h, m)
                m = up_mask(m) if mask or i < last else None
            h = up_image(h)
        image = dec.conv_out(dec.conv_act(dec.conv_norm_out(h)))
        return Decoded((image.float() / 2 + 0.5).clamp(0, 1), joint.out_block(m).float() if mask else None)

    def forward(self, image: torch.Tensor, mask: bool = True) -> Decoded:
        """encode -> denoise -> decode for one batch of tiles."""
        enc = self.encode(image)
        den = self.denoise(enc.latents, capture=self.needs_capture(mask))
        return self.decode(den.latents, enc.skips, den.attention, mask=mask)

    def _apply(self, fn, recurse=True):
        """`.to()`, `.half()`, `.cpu()` and the like: the cached prompt keys and values are no module
        state, so they would stay where they are (on the GPU after an unload); drop them, the next
        pass computes them again where the weights are."""
        self.prompt_kv.clear()
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        """Pickling and `copy.deepcopy`: a lock cannot be copied; the copy gets its own."""
        state = super().__getstate__()
        return {k: v for k, v in state.items() if k != "_pass_lock"}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._pass_lock = threading.RLock()

    def _prompt_fingerprint(self) -> tuple:
        """Identity of the prompt and of the weights its keys and values come from (PromptKV's key).

        Weights are known by storage, version counter, dtype and device: cheap for every pass, and blind
        to in-place writes that bump no version counter (torch's fused optimisers), after which the
        owner calls `self.prompt_kv.clear()`. Hashing the values would see those too, but costs a read of
        every projection weight per pass.
        """
        def state(t: torch.Tensor) -> tuple:
            # inference tensors (made under torch.inference_mode, as in ComfyUI) have no version counter
            return t.data_ptr(), None if t.is_inference() else t._version, t.dtype, str(t.device)

        parts = [state(self.prompt_embeds)]
        for module in self._kv_modules:
            parts.append((getattr(module, "merged", None), getattr(module, "disable_adapters", None),
                          tuple(state(p) for p in module.parameters())))
        return tuple(parts)


def _noise_like(mean: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """Standard normal noise shaped like `mean`: from `generator`, or item by item from a list of them."""
    if not isinstance(generator, (list, tuple)):
        return torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    if len(generator) != mean.shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {mean.shape[0]} images: pass one per image")
    noise = [torch.randn(mean.shape[1:], generator=g, device=g.device, dtype=mean.dtype) for g in generator]
    return torch.stack(noise).to(mean.device)


def _check_image(image: torch.Tensor) -> None:
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"expected an image batch [B, 3, H, W], got shape {tuple(image.shape)}")
    if image.shape[-1] % 8 or image.shape[-2] % 8:
        raise ValueError(f"image height and width must be multiples of 8, got {tuple(image.shape[-2:])}")


def build_model(spec: TADiSRSpec, device: str | torch.device = "cpu", prompt: PromptCache | None = None,
                seed: int | None = None) -> TADiSRModel:
    """A randomly initialised model of `spec` (device "meta" builds structure only)."""
    if seed is not None:
        torch.manual_seed(seed)
    return TADiSRModel(spec, build_unet(spec.unet, device), build_vae(spec.vae, device), prompt)


def random_prompt(spec: TADiSRSpec, seed: int = 0, text_columns: tuple[int, ...] | None = None) -> PromptCache:
    """A random prompt cache of the right shapes (tests and demos; the real one comes from ChatGLM3)."""
    g = torch.Generator().manual_seed(seed)
    n, d = spec.prompt_tokens, spec.text_hidden
    return PromptCache(torch.randn(1, n, d, generator=g), torch.randn(1, d, generator=g),
                       torch.tensor([[768.0, 768.0, 0.0, 0.0, 768.0, 768.0]]),
                       text_columns=text_columns if text_columns is not None else (n - 1,))
