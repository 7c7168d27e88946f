"""The Kolors backbone (UNet + VAE): built from a spec, or loaded from the user's Kolors files.

Loading checks the files are Kolors (`kolors_identity`, headers only), builds the modules on the
meta device and streams the tensors in the target dtype (`streaming`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .gc_pause import gc_paused
from .kolors_files import KolorsFiles, KolorsFolderError, find_kolors_files
from .kolors_identity import CheckedPart, NotKolorsError, check_unet, check_vae, rescaled_vae
from .spec import UNetSpec, VAESpec
from .streaming import assign_weights

__all__ = ["KolorsFiles", "KolorsFolderError", "NotKolorsError", "build_unet", "build_vae", "check_backbone",
           "load_unet", "load_vae"]

log = logging.getLogger("tadisr")


def _files(source, dtype: torch.dtype | None = None) -> KolorsFiles:
    return source if isinstance(source, KolorsFiles) else find_kolors_files(source, dtype=dtype)


@gc_paused()
def build_unet(spec: UNetSpec, device: str | torch.device = "cpu"):
    """A randomly initialised fp32 Kolors-layout UNet (use device "meta" for a weightless one)."""
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel(**spec.diffusers_config())


@gc_paused()
def build_vae(spec: VAESpec, device: str | torch.device = "cpu"):
    """A randomly initialised fp32 SDXL-layout VAE."""
    from diffusers import AutoencoderKL

    with torch.device(device):
        return AutoencoderKL(**spec.diffusers_config())


def check_backbone(source: str | Path | KolorsFiles) -> tuple[CheckedPart, CheckedPart]:
    """Identity check of both parts (headers only, nothing built); NotKolorsError on a wrong model, a
    warning for a VAE rescaled inside (`rescaled_vae`)."""
    files = _files(source)
    unet, vae = check_unet(files.unet, files.unet_config), check_vae(files.vae, files.vae_config)
    why = rescaled_vae(vae, files.vae_config)
    if why:
        log.warning("%s looks like sdxl-vae-fp16-fix (%s): the SDXL VAE's shapes with weights rescaled inside. "
                    "TADiSR's VAE LoRA, skip convolutions and text-mask decoder read the VAE's inner features, "
                    "trained on Kolors' own VAE, so its output will differ; use Kolors' vae/ or the original SDXL "
                    "VAE (the loader keeps the VAE in fp32 under fp16, so it does not overflow)", vae.path, why)
    return unet, vae


def _load(part: CheckedPart, build, dtype: torch.dtype | None):
    module = build(part.spec, "meta")
    assign_weights(module, part.tensors(dtype), part.path)
    return module


def load_unet(source: str | Path | KolorsFiles, dtype: torch.dtype | None = torch.float32, *,
              checked: CheckedPart | None = None):
    """The Kolors UNet from a Kolors folder or KolorsFiles, built on meta and streamed in `dtype`
    (None keeps the file's dtype). Checked to be Kolors first (NotKolorsError otherwise)."""
    if checked is None:
        files = _files(source, dtype)
        checked = check_unet(files.unet, files.unet_config)
    return _load(checked, build_unet, dtype)


def load_vae(source: str | Path | KolorsFiles, dtype: torch.dtype | None = torch.float32, *,
             checked: CheckedPart | None = None):
    """The SDXL-type VAE from a Kolors folder or KolorsFiles, streamed in `dtype`."""
    if checked is None:
        files = _files(source, dtype)
        checked = check_vae(files.vae, files.vae_config)
    return _load(checked, build_vae, dtype)
