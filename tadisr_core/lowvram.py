"""Low-VRAM modes: fp8 weight storage and sequential CPU offload.

* `store_fp8`: the weights of every Linear / Conv2d keep fp8_e4m3fn storage (half of bf16), each tensor
  scaled by a power of two into fp8's range, and are cast to the compute dtype and scaled back when
  the layer runs (a weight parametrization, so `layer.weight` reads as the compute dtype everywhere
  and LoRA wrappers keep working). Biases, norms and LoRA factors stay in the compute dtype.
* `enable_sequential_offload`: weights wait on the CPU and one block at a time visits the GPU: the
  block a layer belongs to moves there when that layer runs, and the block that was there goes
  back. Every module of a block carries the hook, not only the block itself, because the model
  calls many blocks piece by piece (`TADiSRModel.encode` runs the VAE encoder's parts, and a
  `ModuleList` has no forward of its own). Small modules stay resident (so the model reports the
  GPU as its device and inputs land there). A visiting block's tensors point at device copies while
  their CPU tensors are kept: going back drops the copies and copies nothing (inference does not
  change weights), so each visit is one host-to-device copy and the CPU memory (pinned or not)
  stays as it was.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

FP8 = torch.float8_e4m3fn
RESIDENT_BYTES = 4 << 20        # modules this small stay on the GPU under sequential offload


class CastWeight(nn.Module):
    """Parametrization: stored in `storage` divided by `scale`, read as `compute`."""

    def __init__(self, storage: torch.dtype, compute: torch.dtype, scale: float = 1.0):
        super().__init__()
        self.storage, self.compute, self.scale = storage, compute, scale

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        weight = stored.to(self.compute)  # a new tensor (fp8 storage, another compute dtype): scaled in place
        return weight if self.scale == 1.0 else weight.mul_(self.scale)


def _fp8_scale(weight: torch.Tensor) -> float:
    """The per-tensor scale of a weight stored in fp8_e4m3fn: the power of two that brings its largest
    magnitude into (224, 448], fp8's top octave. Kolors' weights are mostly below fp8's normal range
    (2^-6), where a plain cast keeps 1-3 bits or none. A power of two makes the scaling exact both ways,
    and a weight stored again with another scale (a LoRA merge) keeps its values on the same grid."""
    if weight.is_meta or not weight.numel():  # a memory plan's meta model
        return 1.0
    amax = float(weight.detach().abs().max())
    if not 0.0 < amax < float("inf"):
        return 1.0
    return 2.0 ** math.ceil(math.log2(amax / torch.finfo(FP8).max))


def _to_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, float]:
    """`weight` as fp8_e4m3fn storage and the scale it was divided by (`_fp8_scale`)."""
    scale = _fp8_scale(weight)
    return (weight.float() / scale).to(FP8), scale


def fp8_weight(layer: nn.Module) -> torch.Tensor:
    """The float32 value of a `store_fp8` layer's weight: its fp8 storage times its scale."""
    cast = layer.parametrizations.weight[0]
    return layer.parametrizations.weight.original.float() * cast.scale


@torch.no_grad()
def set_fp8_weight(layer: nn.Module, weight: torch.Tensor) -> None:
    """Store `weight` (any float dtype) as a `store_fp8` layer's weight, with a scale of its own."""
    cast = layer.parametrizations.weight[0]
    stored, cast.scale = _to_fp8(weight)
    layer.parametrizations.weight.original.copy_(stored)


def store_fp8(module: nn.Module, compute: torch.dtype = torch.bfloat16) -> int:
    """Keep every Linear / Conv2d weight of `module` in fp8 with a per-tensor scale (LoRA factors
    excepted); the other tensors are cast to `compute`. Merge LoRA before calling this. Returns the
    layer count."""
    module.to(compute)
    count = 0
    for name, layer in module.named_modules():
        if ".lora_" in f".{name}" or not isinstance(layer, (nn.Linear, nn.Conv2d)):
            continue
        if parametrize.is_parametrized(layer, "weight"):
            continue
        stored, scale = _to_fp8(layer.weight.detach())
        layer.weight = nn.Parameter(stored, requires_grad=False)
        parametrize.register_parametrization(layer, "weight", CastWeight(FP8, compute, scale), unsafe=True)
        count += 1
    return count


def is_fp8(module: nn.Module) -> bool:
    """Whether `module` holds fp8-stored weights."""
    return any(t.dtype == FP8 for t in module.parameters())


def stored_dtype(module: nn.Module) -> torch.dtype:
    """The dtype `module`'s weights are kept in: fp8 when they are stored so (their reads give the
    compute dtype), else that of its first parameter."""
    return FP8 if is_fp8(module) else next(module.parameters()).dtype


def _bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.parameters())


def _to_device(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(_to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _tensors(block: nn.Module) -> list[torch.Tensor]:
    """The parameters and buffers of `block` (fp8 storage under parametrizations included), each once."""
    return [*block.parameters(), *block.buffers()]


class _OneBlockOnDevice:
    """Swaps blocks so that only the one whose layer runs now is on `device`."""

    def __init__(self, device: torch.device, home: torch.device):
        self.device, self.home = device, home
        self.active: nn.Module | None = None
        # the active block's tensors and their home data; None: the block moved as a whole (it trains)
        self.kept: list[tuple[torch.Tensor, torch.Tensor | None]] | None = None
        self.handles: list = []

    def bring(self, block: nn.Module) -> None:
        """`block` onto the device: each tensor points at a device copy, its home data kept aside. A block
        that trains (run with autograd on, trainable parameters) moves as a whole instead (gradients too),
        and goes back as a copy: an optimizer step may change it on the device."""
        self.send_home()
        if torch.is_grad_enabled() and any(t.requires_grad for t in block.parameters()):
            block.to(self.device)
            self.active, self.kept = block, None
            return
        kept = []
        for t in _tensors(block):
            home = t.data if _same_device(t.device, self.home) else None
            t.data = t.data.to(self.device)
            kept.append((t, home))
        self.active, self.kept = block, kept

    def send_home(self) -> None:
        """The active block back home: its tensors point at their kept home data again and the device
        copies are dropped, nothing copied back. A tensor whose home data no longer fits (cast since)
        or that came to the device otherwise is copied home, as is a training block."""
        block, kept = self.active, self.kept
        self.active, self.kept = None, None
        if block is None:
            return
        if kept is None:
            block.to(self.home)
            return
        for t, home in kept:
            if home is not None and home.dtype == t.dtype and home.shape == t.shape:
                t.data = home
            else:
                t.data = t.data.to(self.home)

    def hook(self, block: nn.Module) -> None:
        """Before any module of `block` runs: `block` on the device (the previous one sent home), the
        module's tensor inputs moved there too. Where the block is comes from its weights, not from
        memory: something else (a host freeing memory) may have moved the model meanwhile."""
        probe = next(block.parameters(), None)

        def before(mod, args, kwargs):
            if self.active is not block or (probe is not None and not _same_device(probe.device, self.device)):
                self.bring(block)
            return _to_device(args, self.device), _to_device(kwargs, self.device)

        for name, module in block.named_modules():
            if "parametrizations" not in name.split("."):  # reading an fp8 weight is not running a layer
                self.handles.append(module.register_forward_pre_hook(before, with_kwargs=True))


def offload_plan(model: nn.Module, block_bytes: int = 512 << 20,
                 resident_bytes: int = RESIDENT_BYTES) -> tuple[list[str], list[str]]:
    """(moving blocks, resident modules) for sequential offload, by name. Modules up to
    `block_bytes` move as one unit, larger ones are split into their children; modules under
    `resident_bytes` stay on the device. Works on meta models (for memory planning)."""
    moving, resident = [], []

    def visit(prefix: str, mod: nn.Module) -> None:
        size = _bytes(mod)
        children = list(mod.named_children())
        if size <= resident_bytes:
            resident.append(prefix)
        elif size <= block_bytes or not children:
            moving.append(prefix)
        else:
            for name, child in children:
                visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)
    return moving, resident


def sequential_offload_device(model: nn.Module) -> torch.device | None:
    """The device `enable_sequential_offload` runs `model`'s blocks on; None when it is not set up."""
    swapper = getattr(model, "_tadisr_offload", None)
    return swapper.device if swapper is not None else None


def send_offloaded_block_home(model: nn.Module) -> bool:
    """Under `enable_sequential_offload`, the block used last back home, its device copy dropped (True when
    one was on the device). Call it before changing weights in place (a LoRA merge) or moving the model
    as a whole: a block's device copy is never copied back."""
    swapper = getattr(model, "_tadisr_offload", None)
    if swapper is None or swapper.active is None:
        return False
    swapper.send_home()
    return True


def disable_sequential_offload(model: nn.Module) -> bool:
    """Take away the hooks of `enable_sequential_offload` (True when there were any). The weights stay
    where they are: whoever places the model next moves them."""
    swapper = getattr(model, "_tadisr_offload", None)
    if swapper is None:
        return False
    for handle in swapper.handles:
        handle.remove()
    del model._tadisr_offload
    return True


def enable_sequential_offload(model: nn.Module, device: torch.device | str, block_bytes: int = 512 << 20,
                              home: torch.device | str = "cpu", resident_bytes: int = RESIDENT_BYTES) -> list[str]:
    """Keep `model`'s weights on `home` and bring each block (`offload_plan`) to `device` when one of
    its modules runs; small modules, direct parameters of split modules and buffers stay on `device`.
    Returns the names of the moving blocks. Peak device memory: the resident part plus the
    largest block plus one block's activations; the block used last stays on `device` until another
    one runs (or `send_offloaded_block_home`). For inference: a block's device copy is dropped, not
    copied back, when it goes home (a block that trains, run with autograd on, moves whole both ways).
    """
    device, home = torch.device(device), torch.device(home)
    moving, _ = offload_plan(model, block_bytes, resident_bytes)
    send_offloaded_block_home(model)
    disable_sequential_offload(model)  # set up again (after a host moved the model, or on another device)
    swapper = _OneBlockOnDevice(device, home)
    model._tadisr_offload = swapper
    for name in moving:  # never the whole model on the device, not even for a moment
        block = model.get_submodule(name)
        block.to(home)
        swapper.hook(block)
    prefixes = ("",) if "" in moving else tuple(f"{name}." for name in moving)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if not name.startswith(prefixes):
            t.data = t.data.to(device)
    return moving
