"""LoRA adapters with the release's PEFT naming, the VAE skip convs, and merging for inference."""

from __future__ import annotations

import torch
from torch import nn

from .gc_pause import gc_paused
from .lowvram import fp8_weight, send_offloaded_block_home, set_fp8_weight
from .spec import LoRASpec, VAESpec

SKIP_CONV_INIT = 1e-5


@gc_paused()
def add_lora(module: nn.Module, spec: LoRASpec, exclude_prefixes: tuple[str, ...] = ()) -> nn.Module:
    """Inject a PEFT LoRA adapter named `spec.adapter_name` into `module` in place.

    Keys come out as `<path>.lora_A.<adapter>.weight`, exactly as `unet.add_adapter(LoraConfig(...))`
    wrote them in the release: gaussian init (A ~ N(0, 1/r), B = 0), no dropout.
    `exclude_prefixes` leaves sub-trees without LoRA (e.g. the VAE encoder when it has none).
    """
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, init_lora_weights="gaussian",
                        target_modules=list(spec.targets),
                        exclude_modules=[p.rstrip(".") for p in exclude_prefixes] or None)
    if exclude_prefixes:
        # exclude_modules matches whole names; widen it to every module below the prefixes.
        names = [n for n, _ in module.named_modules() if any(n.startswith(p) for p in exclude_prefixes)]
        config.exclude_modules = names
    inject_adapter_in_model(config, module, adapter_name=spec.adapter_name)
    return module


def add_skip_convs(vae: nn.Module, spec: VAESpec) -> None:
    """Attach the four bias-free 1x1 encoder-to-decoder convs to `vae.decoder` (weights 1e-5)."""
    for name, (cin, cout) in spec.skip_conv_channels().items():
        device = vae.decoder.conv_in.weight.device
        conv = nn.Conv2d(cin, cout, 1, bias=False, device=device)
        if device.type != "meta":
            nn.init.constant_(conv.weight, SKIP_CONV_INIT)
        setattr(vae.decoder, name, conv)


def skip_conv(vae: nn.Module, index: int) -> nn.Module:
    """The skip conv number `index` (1..4) of a VAE decoder."""
    return getattr(vae.decoder, f"skip_conv_{index}")


def lora_layers(module: nn.Module):
    """Every PEFT LoRA-wrapped layer below `module`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def merge_lora(module: nn.Module) -> int:
    """Fold every LoRA delta into its base weight (W += scaling * B @ A); returns the layer count.

    The wrappers stay (their forward skips the adapter once merged), so `unmerge_lora` restores
    the exact unmerged model up to rounding. A base weight kept in another dtype than it is read in
    (`lowvram.store_fp8`'s scaled fp8) is merged in float32 and stored back, rounded once more to fp8.
    """
    send_offloaded_block_home(module)  # else the merge would go into a device copy, dropped on its way home
    layers = [m for m in lora_layers(module) if not m.merged]
    for m in layers:
        if _stored_apart(m):
            _fold_stored(m, +1)
        else:
            m.merge()
    return len(layers)


def unmerge_lora(module: nn.Module) -> int:
    """Undo `merge_lora` (an fp8-stored base weight is rounded to fp8 once more, as by the merge)."""
    send_offloaded_block_home(module)
    layers = [m for m in lora_layers(module) if m.merged]
    for m in layers:
        if _stored_apart(m):
            _fold_stored(m, -1)
        else:
            m.unmerge()
    return len(layers)


def _stored_apart(layer: nn.Module) -> bool:
    """Whether the layer's base weight is a parametrization (fp8 storage read as the compute dtype), which
    PEFT's in-place merge would add to a temporary copy of instead of the stored tensor."""
    from torch.nn.utils import parametrize

    return parametrize.is_parametrized(layer.get_base_layer(), "weight")


@torch.no_grad()
def _fold_stored(layer: nn.Module, sign: int) -> None:
    """Merge (`sign` +1) or unmerge (-1) the layer's adapters into its stored base weight: in float32,
    from float32 copies of the factors, stored back in the storage dtype; PEFT's merge bookkeeping kept."""
    base = layer.get_base_layer()
    if sign > 0:
        adapters = [a for a in layer.active_adapters if a in layer.lora_A and a not in layer.merged_adapters]
    else:
        adapters = list(layer.merged_adapters)
    factors = [p for name, p in layer.named_parameters() if ".lora_" in f".{name}"]
    kept = [p.data for p in factors]
    try:
        for p in factors:
            p.data = p.data.float()
        weight = fp8_weight(base)
        for adapter in adapters:
            weight += sign * layer.get_delta_weight(adapter).reshape(weight.shape)
    finally:
        for p, data in zip(factors, kept):
            p.data = data
    set_fp8_weight(base, weight)
    if sign > 0:
        layer.merged_adapters.extend(adapters)
    else:
        layer.merged_adapters.clear()


def lora_rank(state_dict: dict[str, torch.Tensor], adapter: str) -> int | None:
    """The rank of an adapter read from its first lora_A tensor (None when there is none)."""
    for key, tensor in state_dict.items():
        if f".lora_A.{adapter}." in key:
            return int(tensor.shape[0])
    return None
