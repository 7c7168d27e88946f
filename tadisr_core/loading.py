"""Assemble a ready TADiSR model from a Kolors folder, a TADiSR checkpoint and a prompt cache."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .backbone import check_kolors_folder, load_unet, load_vae, read_unet_spec, read_vae_spec
from .checkpoint import apply_checkpoint, load_checkpoint
from .lora import merge_lora
from .model import TADiSRModel
from .prompt import PromptCache, compute_prompt_cache_from_kolors


def ensure_prompt_cache(path: str | Path, kolors_dir: str | Path, device: str = "cpu",
                        time_ids: tuple[float, ...] = (768, 768, 0, 0, 768, 768)) -> PromptCache:
    """Load the prompt cache at `path`, computing it once with the folder's ChatGLM3 when absent."""
    path = Path(path)
    if path.is_file():
        return PromptCache.load(path)
    cache = compute_prompt_cache_from_kolors(kolors_dir, time_ids=time_ids, device=device)
    path.parent.mkdir(parents=True, exist_ok=True)
    cache.save(path)
    return cache


def load_tadisr(kolors_dir: str | Path, checkpoint: str | Path, prompt_cache: str | Path | PromptCache | None = None,
                *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                merge_lora_weights: bool = True) -> TADiSRModel:
    """Load the Kolors backbone, apply a TADiSR checkpoint and the prompt conditioning.

    `prompt_cache` may be a PromptCache, a path (computed with ChatGLM3 and saved there when the
    file does not exist yet) or None (computed in memory from the Kolors folder).
    Under fp16 the VAE stays in fp32 (the SDXL VAE overflows in fp16). The LoRA is merged into the
    base weights unless `merge_lora_weights=False` (equal within float rounding, fewer kernels).
    """
    check_kolors_folder(kolors_dir)
    ckpt = load_checkpoint(checkpoint)
    spec = dataclasses.replace(ckpt.spec, unet=read_unet_spec(kolors_dir), vae=read_vae_spec(kolors_dir))
    if isinstance(prompt_cache, PromptCache):
        prompt = prompt_cache
    elif prompt_cache is not None:
        prompt = ensure_prompt_cache(prompt_cache, kolors_dir)
    else:
        prompt = compute_prompt_cache_from_kolors(kolors_dir)
    spec = dataclasses.replace(spec, prompt_tokens=prompt.prompt_embeds.shape[1],
                               text_hidden=prompt.prompt_embeds.shape[2])
    model = TADiSRModel(spec, load_unet(kolors_dir), load_vae(kolors_dir))
    apply_checkpoint(model, ckpt)
    if merge_lora_weights:
        merge_lora(model)
    model.eval().requires_grad_(False)
    model.to(device)
    model.unet.to(dtype)
    model.vae.to(torch.float32 if dtype == torch.float16 else dtype)
    model.mi_decoder.to(torch.float32 if dtype == torch.float16 else dtype)
    model.set_prompt(prompt)
    return model
