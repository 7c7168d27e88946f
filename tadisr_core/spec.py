"""Model specifications: the full-size Kolors TADiSR and a tiny one of identical structure.

A spec is plain data. `backbone.py` turns it into diffusers modules, `model.py` into the whole
TADiSR model. The tiny spec keeps every module path of the full one (same block types, same
number of layers, same LoRA targets), so checkpoint key sets are identical and only shapes shrink.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Literal

# The two layouts, in one vocabulary everywhere (spec variant, attention layout, loss preset):
# "release" = what the authors' released Kolors checkpoint holds, "paper" = the paper's design.
Variant = Literal["release", "paper"]
VARIANTS: tuple[str, ...] = ("release", "paper")
# Older spellings still found in saved checkpoints and configs.
VARIANT_ALIASES = {"official-kolors": "release"}


def canonical_variant(name: str) -> str:
    """`name` in today's vocabulary ("official-kolors" -> "release"); ValueError if unknown."""
    name = VARIANT_ALIASES.get(name, name)
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose one of {VARIANTS}")
    return name

# The 13 module names the release's UNet LoRA targets (PEFT suffix matching).
UNET_LORA_TARGETS: tuple[str, ...] = (
    "to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_shortcut",
    "conv_out", "proj_in", "proj_out", "ff.net.2", "ff.net.0.proj",
)
# The release's VAE LoRA targets: encoder and decoder, plus the four skip convs.
VAE_LORA_TARGETS: tuple[str, ...] = (
    "conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out",
    "skip_conv_1", "skip_conv_2", "skip_conv_3", "skip_conv_4",
    "to_k", "to_q", "to_v", "to_out.0",
)
HEATMAP_PROMPT = "best quality,highres,extremely detailed,text"
# SDXL's size conditioning with it (original h, w, crop top, left, target h, w): the 768 px tile
SDXL_TIME_IDS = (768.0, 768.0, 0.0, 0.0, 768.0, 768.0)


@dataclass(frozen=True)
class UNetSpec:
    """Kolors UNet (an SDXL-layout UNet2DConditionModel with a 4096->2048 text projection)."""

    block_out_channels: tuple[int, ...] = (320, 640, 1280)
    layers_per_block: int = 2
    transformer_layers_per_block: tuple[int, ...] = (1, 2, 10)
    attention_head_dim: tuple[int, ...] = (5, 10, 20)  # diffusers' name; these are head counts
    cross_attention_dim: int = 2048
    encoder_hid_dim: int = 4096
    addition_time_embed_dim: int = 256
    norm_num_groups: int = 32
    sample_size: int = 128

    def diffusers_config(self) -> dict:
        """Keyword arguments for `diffusers.UNet2DConditionModel`."""
        return dict(
            sample_size=self.sample_size,
            in_channels=4,
            out_channels=4,
            layers_per_block=self.layers_per_block,
            block_out_channels=self.block_out_channels,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=self.transformer_layers_per_block,
            attention_head_dim=self.attention_head_dim,
            cross_attention_dim=self.cross_attention_dim,
            norm_num_groups=self.norm_num_groups,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=self.addition_time_embed_dim,
            projection_class_embeddings_input_dim=self.encoder_hid_dim + 6 * self.addition_time_embed_dim,
            encoder_hid_dim_type="text_proj",
            encoder_hid_dim=self.encoder_hid_dim,
        )


@dataclass(frozen=True)
class VAESpec:
    """Kolors VAE: the SDXL AutoencoderKL layout, scaling factor 0.13025, no shift."""

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.13025
    sample_size: int = 1024

    def diffusers_config(self) -> dict:
        """Keyword arguments for `diffusers.AutoencoderKL`."""
        n = len(self.block_out_channels)
        return dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block,
            latent_channels=4,
            norm_num_groups=self.norm_num_groups,
            sample_size=self.sample_size,
            scaling_factor=self.scaling_factor,
            force_upcast=True,
        )

    def skip_conv_channels(self) -> dict[str, tuple[int, int]]:
        """(in, out) channels of the four encoder-to-decoder 1x1 skip convs."""
        c0, c1, c2, c3 = self.block_out_channels
        return {"skip_conv_1": (c2, c3), "skip_conv_2": (c1, c3), "skip_conv_3": (c0, c2), "skip_conv_4": (c0, c1)}

    def interaction_channels(self) -> tuple[int, int, int, int]:
        """Channels of the image stream entering each of the 4 decoder up blocks."""
        c0, c1, c2, c3 = self.block_out_channels
        return (c3, c3, c2, c1)


@dataclass(frozen=True)
class LoRASpec:
    """A PEFT LoRA adapter: rank, alpha (PEFT's default 8 in the release) and target names."""

    rank: int
    alpha: float
    targets: tuple[str, ...]
    adapter_name: str

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class AttentionSpec:
    """Which cross-attention maps feed the mask stream (TACA) and how they are reduced.

    layout "release": 60 attn2 layers without the mid block, the last half of each layer's heads
    (550 channels at full size). layout "paper": every attn2 layer and head (1300 channels).
    """

    layout: Literal["release", "paper"] = "paper"
    token: Literal["text", "release-pad"] = "text"

    def include_mid(self) -> bool:
        return self.layout == "paper"

    def head_slice(self, heads: int) -> slice:
        return slice(heads // 2, heads) if self.layout == "release" else slice(0, heads)


@dataclass(frozen=True)
class TADiSRSpec:
    """The whole model: backbone shapes, adapters, decoder variant and one-step constants."""

    variant: Variant = "release"
    unet: UNetSpec = field(default_factory=UNetSpec)
    vae: VAESpec = field(default_factory=VAESpec)
    unet_lora: LoRASpec = field(default_factory=lambda: LoRASpec(4, 8.0, UNET_LORA_TARGETS, "default"))
    vae_lora: LoRASpec = field(default_factory=lambda: LoRASpec(2, 8.0, VAE_LORA_TARGETS, "vae_skip"))
    attention: AttentionSpec = field(default_factory=AttentionSpec)
    # Mask-stream input: "mid-block" (decoder mid-block features, what the release stores) or
    # "attention" (TACA maps projected by W_a, the paper's design).
    mask_input: Literal["mid-block", "attention"] = "mid-block"
    skip_convs: bool = True
    encoder_lora: bool = True
    timestep: int = 200
    schedule: Literal["release", "kolors"] = "release"
    prompt_tokens: int = 256
    text_hidden: int = 4096

    def to_json(self) -> str:
        """Serialise to JSON (stored in native checkpoint metadata)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TADiSRSpec":
        """Inverse of `to_json`."""
        d = json.loads(text)
        return cls(
            variant=VARIANT_ALIASES.get(d["variant"], d["variant"]),
            unet=UNetSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in d["unet"].items()}),
            vae=VAESpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in d["vae"].items()}),
            unet_lora=LoRASpec(**{**d["unet_lora"], "targets": tuple(d["unet_lora"]["targets"])}),
            vae_lora=LoRASpec(**{**d["vae_lora"], "targets": tuple(d["vae_lora"]["targets"])}),
            attention=AttentionSpec(**d["attention"]),
            **{k: d[k] for k in ("mask_input", "skip_convs", "encoder_lora", "timestep", "schedule",
                                 "prompt_tokens", "text_hidden")},
        )

    def with_ranks(self, unet_rank: int, vae_rank: int) -> "TADiSRSpec":
        """A copy with other LoRA ranks (read from checkpoint tensors); alpha is kept."""
        return dataclasses.replace(
            self,
            unet_lora=dataclasses.replace(self.unet_lora, rank=unet_rank),
            vae_lora=dataclasses.replace(self.vae_lora, rank=vae_rank),
        )


def full_spec(variant: Variant = "release") -> TADiSRSpec:
    """The full-size Kolors TADiSR spec. `release` matches tadisr_kolors_ftsr_526000.pkl."""
    variant = canonical_variant(variant)
    if variant == "release":
        return TADiSRSpec(variant=variant, attention=AttentionSpec(layout="release", token="text"))
    return TADiSRSpec(variant=variant, attention=AttentionSpec(layout="paper", token="text"),
                      mask_input="attention")


def _narrowed(variant: Variant, unet: UNetSpec, vae: VAESpec, text_hidden: int) -> TADiSRSpec:
    """`full_spec(variant)` with other widths: the same module tree, so the same checkpoint keys."""
    return dataclasses.replace(full_spec(variant), unet=unet, vae=vae, text_hidden=text_hidden, prompt_tokens=32)


def tiny_spec(variant: Variant = "release") -> TADiSRSpec:
    """A spec with the full spec's module tree and tiny widths: milliseconds per forward on a CPU."""
    return _narrowed(
        variant,
        UNetSpec(block_out_channels=(8, 16, 32), attention_head_dim=(1, 1, 2), cross_attention_dim=32,
                 encoder_hid_dim=64, addition_time_embed_dim=8, norm_num_groups=8, sample_size=16),
        VAESpec(block_out_channels=(8, 16, 32, 32), norm_num_groups=4, sample_size=64),
        text_hidden=64)


def demo_spec(variant: Variant = "paper") -> TADiSRSpec:
    """The shipped demo model's spec: the full module tree with widths that train on two CPU cores.

    Same blocks, layer counts and LoRA targets as `full_spec`; a 64-wide UNet and a 48-wide VAE
    (about 9 M parameters), 32 prompt tokens of width 128. Its backbone has no pretrained prior, so
    it is trained whole (first as an autoencoder, `training/configs/demo_prior.yaml`, then on the
    task, `demo.yaml`, `demo_finetune.yaml` and `demo_crop256.yaml`) and shipped inside its checkpoint.
    The release variant is shipped too, trained from the paper demo's backbone (`demo_release.yaml`).
    """
    return _narrowed(
        variant,
        UNetSpec(block_out_channels=(16, 32, 64), attention_head_dim=(1, 2, 4), cross_attention_dim=64,
                 encoder_hid_dim=128, addition_time_embed_dim=16, norm_num_groups=8, sample_size=32),
        VAESpec(block_out_channels=(16, 32, 48, 48), norm_num_groups=8, sample_size=256),
        text_hidden=128)


SIZES = {"full": full_spec, "demo": demo_spec, "tiny": tiny_spec}


def size_name(spec: TADiSRSpec) -> str:
    """The name of the known size (`SIZES`: full, demo, tiny) whose UNet and VAE widths `spec` has, else
    "custom"."""
    def widths(s: TADiSRSpec) -> tuple:
        return s.unet.block_out_channels, s.vae.block_out_channels

    return next((name for name, make in SIZES.items() if widths(make("release")) == widths(spec)), "custom")


def spec_for_size(size: str, variant: Variant) -> TADiSRSpec:
    """`full_spec`, `demo_spec` or `tiny_spec` by name."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(SIZES)}")
    return SIZES[size](variant)
