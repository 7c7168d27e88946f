"""The Kolors backbone (UNet + VAE): built from a spec, or loaded from a Kolors diffusers folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .spec import UNetSpec, VAESpec

_WEIGHT_NAMES = ("diffusion_pytorch_model", "model")
_WEIGHT_EXTS = (".safetensors", ".bin")


class KolorsFolderError(FileNotFoundError):
    """A Kolors diffusers folder is missing a file or folder we need."""


def build_unet(spec: UNetSpec, device: str | torch.device = "cpu"):
    """A randomly initialised fp32 Kolors-layout UNet (use device "meta" for a weightless one)."""
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel(**spec.diffusers_config())


def build_vae(spec: VAESpec, device: str | torch.device = "cpu"):
    """A randomly initialised fp32 SDXL-layout VAE."""
    from diffusers import AutoencoderKL

    with torch.device(device):
        return AutoencoderKL(**spec.diffusers_config())


def _weights_file(folder: Path) -> Path | None:
    for variant in (".fp16", ""):
        for name in _WEIGHT_NAMES:
            for ext in _WEIGHT_EXTS:
                p = folder / f"{name}{variant}{ext}"
                if p.is_file():
                    return p
    return None


def check_kolors_folder(root: str | Path, need_text_encoder: bool = False) -> dict[str, Path]:
    """Check a Kolors diffusers folder and return the weight files found.

    Raises KolorsFolderError naming the first missing file or folder and what belongs there.
    """
    root = Path(root)
    if not root.is_dir():
        raise KolorsFolderError(f"Kolors folder not found: {root} (download Kwai-Kolors/Kolors in diffusers layout)")
    found: dict[str, Path] = {}
    for sub in ("unet", "vae"):
        folder = root / sub
        if not (folder / "config.json").is_file():
            raise KolorsFolderError(f"{folder / 'config.json'} is missing: {root} is not a complete Kolors "
                                    f"diffusers folder (needs unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
        weights = _weights_file(folder)
        if weights is None:
            raise KolorsFolderError(f"no weights in {folder}: expected diffusion_pytorch_model[.fp16].safetensors "
                                    f"(or .bin) from Kwai-Kolors/Kolors/{sub}/")
        found[sub] = weights
    if need_text_encoder:
        for sub, marker in (("text_encoder", "config.json"), ("tokenizer", "tokenizer.model")):
            if not (root / sub / marker).is_file():
                raise KolorsFolderError(f"{root / sub / marker} is missing: computing the prompt cache needs "
                                        f"Kolors' ChatGLM3 {sub}/ (or pass a precomputed prompt cache)")
    return found


def _variant(weights: Path) -> str | None:
    return "fp16" if ".fp16." in weights.name else None


def load_unet(root: str | Path, dtype: torch.dtype = torch.float32):
    """Load the Kolors UNet from `root/unet` (fp16 variant files accepted)."""
    from diffusers import UNet2DConditionModel

    files = check_kolors_folder(root)
    return UNet2DConditionModel.from_pretrained(Path(root), subfolder="unet", variant=_variant(files["unet"]),
                                                torch_dtype=dtype)


def load_vae(root: str | Path, dtype: torch.dtype = torch.float32):
    """Load the Kolors VAE from `root/vae`."""
    from diffusers import AutoencoderKL

    files = check_kolors_folder(root)
    return AutoencoderKL.from_pretrained(Path(root), subfolder="vae", variant=_variant(files["vae"]),
                                         torch_dtype=dtype)


def read_unet_spec(root: str | Path) -> UNetSpec:
    """The UNetSpec of a Kolors folder's unet/config.json (lets tiny folders load like real ones)."""
    cfg = json.loads((Path(root) / "unet" / "config.json").read_text())
    return UNetSpec(
        block_out_channels=tuple(cfg["block_out_channels"]),
        layers_per_block=cfg["layers_per_block"],
        transformer_layers_per_block=tuple(cfg["transformer_layers_per_block"]),
        attention_head_dim=tuple(cfg["attention_head_dim"]),
        cross_attention_dim=cfg["cross_attention_dim"],
        encoder_hid_dim=cfg["encoder_hid_dim"],
        addition_time_embed_dim=cfg["addition_time_embed_dim"],
        norm_num_groups=cfg["norm_num_groups"],
        sample_size=cfg["sample_size"],
    )


def read_vae_spec(root: str | Path) -> VAESpec:
    """The VAESpec of a Kolors folder's vae/config.json."""
    cfg = json.loads((Path(root) / "vae" / "config.json").read_text())
    return VAESpec(
        block_out_channels=tuple(cfg["block_out_channels"]),
        layers_per_block=cfg["layers_per_block"],
        norm_num_groups=cfg["norm_num_groups"],
        scaling_factor=cfg["scaling_factor"],
        sample_size=cfg["sample_size"],
    )
