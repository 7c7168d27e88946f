"""Load TADiSR Model, the logic: Kolors folder + TADiSR checkpoint + prompt cache -> a model handle."""

from __future__ import annotations

import logging
import os

import torch

from . import host
from .model_cache import TADiSRHandle, file_key, get_or_load

log = logging.getLogger("tadisr")

AUTO_CACHE = "auto (compute once)"
PROMPT_CACHE_PREFIX = "prompt_cache"
KOLORS_REQUIRED = ("unet", "vae")
CHATGLM_BYTES = 14 << 30  # ChatGLM3-6B in bf16 plus activations, for the one-off prompt cache


def kolors_choices() -> list[str]:
    """The Kolors base models the loader offers: folders in models/diffusers with unet/ and vae/.
    (The one place that lists Kolors candidates.)"""
    return host.list_subfolders(host.DIFFUSERS_FOLDER, KOLORS_REQUIRED)


def _is_prompt_cache(name: str) -> bool:
    return os.path.basename(name).lower().startswith(PROMPT_CACHE_PREFIX)


def checkpoint_choices() -> list[str]:
    """TADiSR checkpoints (.pkl / .safetensors) in models/tadisr, prompt caches left out."""
    return [f for f in host.list_files(host.TADISR_FOLDER, host.CHECKPOINT_EXTS) if not _is_prompt_cache(f)]


def prompt_cache_choices() -> list[str]:
    """"auto" plus the prompt_cache*.safetensors files in models/tadisr."""
    files = host.list_files(host.TADISR_FOLDER, (".safetensors",))
    return [AUTO_CACHE] + [f for f in files if _is_prompt_cache(f)]


def device_choices() -> list[str]:
    """"auto" (ComfyUI's device), "cpu" and the accelerators torch can see."""
    out = ["auto", "cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.append("mps")
    return out


def _folders(kind: str) -> str:
    return ", ".join(host.model_folders(kind))


def resolve_kolors(name: str) -> str:
    """Full path of a Kolors folder; FileNotFoundError saying where it belongs."""
    path = host.find_path(host.DIFFUSERS_FOLDER, name, folder=True) if name else None
    if path is None:
        raise FileNotFoundError(
            f"TADiSR: Kolors folder '{name}' not found in models/diffusers ({_folders(host.DIFFUSERS_FOLDER)}). "
            "Put the Kolors diffusers folder (with unet/, vae/, text_encoder/, tokenizer/) there, "
            "e.g. models/diffusers/Kolors.")
    missing = [r for r in KOLORS_REQUIRED if not os.path.isdir(os.path.join(path, r))]
    if missing:
        raise FileNotFoundError(f"TADiSR: Kolors folder {path} has no {' or '.join(m + '/' for m in missing)}: "
                                "it must be a Kolors diffusers folder (unet/, vae/, text_encoder/, tokenizer/).")
    return path


def resolve_checkpoint(name: str) -> str:
    """Full path of a TADiSR checkpoint; FileNotFoundError saying where it belongs."""
    path = host.find_path(host.TADISR_FOLDER, name) if name else None
    if path is None:
        raise FileNotFoundError(
            f"TADiSR: checkpoint '{name}' not found in models/tadisr ({_folders(host.TADISR_FOLDER)}). "
            "Put a TADiSR checkpoint there: the released tadisr_kolors_ftsr_526000.pkl or a converted .safetensors.")
    return path


def resolve_prompt_cache(name: str, kolors_path: str) -> str:
    """The prompt-cache file to use. "auto": prompt_cache_<kolors folder>.safetensors in models/tadisr
    (computed from the folder's ChatGLM3 on first use when it does not exist yet)."""
    if name == AUTO_CACHE or not name:
        auto = f"{PROMPT_CACHE_PREFIX}_{os.path.basename(os.path.normpath(kolors_path))}.safetensors"
        return host.find_path(host.TADISR_FOLDER, auto) or os.path.join(host.model_folders(host.TADISR_FOLDER)[0], auto)
    path = host.find_path(host.TADISR_FOLDER, name)
    if path is None:
        raise FileNotFoundError(f"TADiSR: prompt cache '{name}' not found in models/tadisr "
                                f"({_folders(host.TADISR_FOLDER)}); choose '{AUTO_CACHE}' to compute it.")
    return path


def resolve_device(name: str) -> torch.device:
    """"auto" -> ComfyUI's compute device; anything else as torch understands it."""
    if name in ("auto", "", None):
        return host.torch_device()
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"TADiSR: unknown device '{name}'; choose one of {device_choices()}") from exc


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" -> bf16 / fp16 on CUDA (as supported), fp32 elsewhere."""
    from tadisr_core.devices import DTYPE_CHOICES, resolve_dtype as core_resolve

    if name not in DTYPE_CHOICES:
        raise ValueError(f"TADiSR: unknown dtype '{name}'; choose one of {DTYPE_CHOICES}")
    return core_resolve(name, device)


def load_model(kolors: str, checkpoint: str, prompt_cache: str = AUTO_CACHE, dtype: str = "auto",
               device: str = "auto", merge_lora: bool = False) -> TADiSRHandle:
    """Resolve names to files and load (or reuse) the model. Errors name the file and its folder."""
    kolors_path = resolve_kolors(kolors)
    ckpt_path = resolve_checkpoint(checkpoint)
    cache_path = resolve_prompt_cache(prompt_cache, kolors_path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    key = (file_key(kolors_path), file_key(ckpt_path), os.path.realpath(cache_path), str(dt), str(dev), bool(merge_lora))

    def load() -> TADiSRHandle:
        from tadisr_core.loading import ensure_prompt_cache, load_tadisr

        if not os.path.isfile(cache_path):
            log.info("TADiSR: computing the prompt cache %s from %s (once)", cache_path, kolors_path)
            encoder_device = dev if dev.type == "cuda" else torch.device("cpu")
            host.make_room(CHATGLM_BYTES, encoder_device)
            ensure_prompt_cache(cache_path, kolors_path, device=str(encoder_device))
        log.info("TADiSR: loading %s + %s (%s, %s%s)", kolors_path, ckpt_path, dt, dev, ", LoRA merged" if merge_lora else "")
        model = load_tadisr(kolors_path, ckpt_path, cache_path, dtype=dt, device=host.offload_device(),
                            merge_lora_weights=bool(merge_lora))
        return TADiSRHandle(model, dev, dt, key, {"kolors": kolors_path, "checkpoint": ckpt_path, "prompt": cache_path},
                            host.make_patcher(model, dev))

    return get_or_load(key, load)


def validate_checkpoint(checkpoint: str) -> bool | str:
    """True, or the message saying where the checkpoint belongs (for the loader's early check)."""
    try:
        resolve_checkpoint(checkpoint)
    except FileNotFoundError as exc:
        return str(exc)
    return True
