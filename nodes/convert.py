"""ComfyUI tensors <-> tadisr_core tensors, at the node boundary only.

ComfyUI: IMAGE [B, H, W, C] float 0..1 (channels last), MASK [B, H, W] (sometimes [H, W]).
tadisr_core: images and masks [B, C, H, W] float 0..1.
"""

from __future__ import annotations

import torch

from tadisr_core.descriptor import DESCRIPTOR


def image_to_core(image: torch.Tensor, name: str = "the image") -> torch.Tensor:
    """IMAGE [B, H, W, C] -> float32 [B, C, H, W]; ValueError naming the input (`name`) and its shape
    if it is not a float image."""
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"TADiSR: {name} must be an IMAGE tensor, got {type(image).__name__}")
    given = tuple(image.shape)
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4 or image.shape[-1] not in DESCRIPTOR.input_channels:
        raise ValueError(f"TADiSR: {name} must be [batch, height, width, channels] with "
                         f"{DESCRIPTOR.channels_text()} channels, got shape {given}")
    if image.shape[0] == 0 or image.shape[1] < 1 or image.shape[2] < 1:
        raise ValueError(f"TADiSR: {name} is empty (shape {given})")
    if not (image.is_floating_point() or image.dtype == torch.bool):  # 0..255 integers would be clamped to white
        raise ValueError(f"TADiSR: {name} holds {str(image.dtype).removeprefix('torch.')} values; an IMAGE holds "
                         "floats in 0..1 (convert it with a node that outputs a ComfyUI IMAGE)")
    return image.movedim(-1, 1).float().contiguous()


def image_from_core(image: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """[B, C, H, W] -> IMAGE [B, H, W, C] float32 on `device`, clamped to 0..1."""
    return image.detach().movedim(1, -1).to(device, torch.float32).clamp(0, 1).contiguous()


def mask_from_core(mask: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """[B, 1, H, W] -> MASK [B, H, W] float32 on `device`, clamped to 0..1."""
    return mask.detach().reshape(mask.shape[0], *mask.shape[-2:]).to(device, torch.float32).clamp(0, 1).contiguous()


def mask_to_core(mask: torch.Tensor, name: str = "the mask") -> torch.Tensor:
    """MASK [B, H, W] or [H, W] -> float32 [B, 1, H, W]; ValueError naming the input (`name`) otherwise."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"TADiSR: {name} must be a MASK tensor, got {type(mask).__name__}")
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim != 3:
        raise ValueError(f"TADiSR: {name} must be a MASK [batch, height, width], got shape {tuple(mask.shape)}")
    return mask.unsqueeze(1).float()
