"""Device and precision choice, free-memory queries, the tile-batch heuristic and OOM helpers."""

from __future__ import annotations

import contextlib
import logging
import os

import torch

from .descriptor import DESCRIPTOR, WEIGHT_DTYPES, dtype_name, part_dtypes
from .wording import named

log = logging.getLogger("tadisr")

DTYPES = {name: storage for name, (storage, _) in WEIGHT_DTYPES.items()}
# the dtypes that compute as they are stored (fp32, bf16, fp16); fp8 is a storage format only (computes in bf16)
COMPUTE_DTYPES = {name: storage for name, (storage, compute) in WEIGHT_DTYPES.items() if compute is None}
DTYPE_CHOICES = DESCRIPTOR.dtype_choices
MAX_AUTO_BATCH = {"cuda": 8, "cpu": 4}


def resolve_device(name: str | torch.device | None = "auto", auto: torch.device | str | None = None) -> torch.device:
    """The one meaning of "auto": the host's compute device (`auto`, e.g. ComfyUI's device, when the
    caller has one), else CUDA when present (cuda:LOCAL_RANK under a launcher), else MPS, else CPU."""
    if isinstance(name, torch.device):
        return name
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if name in ("auto", "", None):
        if auto is not None:
            return torch.device(auto)
        if torch.cuda.is_available():
            return torch.device("cuda", local % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{_flag(name)}not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                     and torch.backends.mps.is_available()):
        raise RuntimeError(f"{_flag(name)}MPS (Apple GPUs) is not available on this machine")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"{_flag(name)}CUDA is not available in this torch build / machine")
        if device.index is None:
            device = torch.device("cuda", local % torch.cuda.device_count())
    return device


def _flag(name: str) -> str:
    """How `resolve_device`'s refusals of `name` begin: the setting, in the caller's words (`wording`)."""
    return named(f"--device {name}: ", f"device={name!r}: ")


def resolve_device_setting(name: str | torch.device, cli: str, python: str) -> torch.device:
    """`resolve_device(name)` for a device setting other than the model's: a refusal names that setting,
    `cli` (a flag) or `python` (an argument) as the caller speaks (`wording.named`)."""
    try:
        return resolve_device(name)
    except (RuntimeError, ValueError) as exc:
        said = named(f"{cli} {name}: ", f"{python}={str(name)!r}: ")
        raise type(exc)(said + device_refusal_reason(exc, str(name))) from None


def device_refusal_reason(exc: BaseException, name: str) -> str:
    """The reason of `resolve_device`'s refusal `exc` of `name` without the `--device NAME: ` (or
    `device='NAME': `) it begins with, for callers that name the setting their own way (a node's device
    input, another CLI flag)."""
    return str(exc).removeprefix(_flag(name))


def resolve_dtype(name: str | torch.dtype = "auto", device: torch.device | str = "cpu", *,
                  fp16_safe: bool = True) -> torch.dtype:
    """"auto" -> bf16 on CUDA GPUs with bf16 units (compute capability 8.0+), fp16 on older ones and on
    Apple's MPS (fp32 for a model that is not `fp16_safe`), fp32 on the CPU; "fp8_e4m3fn" -> torch.float8_e4m3fn (UNet
    weight storage, computed in bf16). A torch dtype is returned as it is if TADiSR runs in it
    (ValueError otherwise, as for unknown names).

    The Kolors UNet runs in fp16; a model trained from scratch in fp32, such as the shipped demo models
    (`model_ref.runs_alone`), can overflow fp16's range (65504), so `auto` does not choose it for them.
    """
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ValueError(f"dtype {name} is not one TADiSR runs in; choose one of {DTYPE_CHOICES} (or its torch "
                             f"dtype)")
        return name
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda":
            # Not torch.cuda.is_bf16_supported(): it says yes on pre-Ampere GPUs (T4, V100), which only
            # emulate bf16 (slowly, with no cuDNN bf16 convolutions), and asks about the current device.
            if torch.cuda.get_device_capability(device) >= (8, 0):
                return torch.bfloat16
            return torch.float16 if fp16_safe else torch.float32
        if device.type == "mps":  # Apple GPUs: fp16, as ComfyUI runs them (bf16 lacks kernels on older macOS)
            return torch.float16 if fp16_safe else torch.float32
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {DTYPE_CHOICES}")
    return DTYPES[name]


@contextlib.contextmanager
def _quiet_diffusers_casts():
    """diffusers warns on every dtype cast of its models ("modules that should be kept in float32: []"),
    even with none to keep; the casts here are meant, so that warning is held back while they run."""
    cast_log = logging.getLogger("diffusers.models.modeling_utils")
    level = cast_log.level
    cast_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        cast_log.setLevel(level)


def check_offload(offload: str) -> None:
    """ValueError naming the choices when `offload` is not a mode `place_model` knows (loaders check it
    before reading any weight)."""
    if offload not in DESCRIPTOR.offload_modes:
        raise ValueError(f"unknown offload mode {offload!r}; choose one of {DESCRIPTOR.offload_modes}")


def check_compile(compile: bool, offload: str) -> None:
    """ValueError for `compile` with sequential offload: its hooks move each block's weights while the
    compiled code runs, which makes torch.compile trace them again and again (loaders say it before any
    weight is read)."""
    if compile and offload == "sequential":
        raise ValueError("compile and sequential offload do not go together (the offload moves the weights under "
                         "the compiled code, which then compiles again and again): choose one")


def place_model(model, device: torch.device | str | None = None, dtype: torch.dtype | None = None, *,
                offload: str = "none", channels_last: bool = False, compile: bool = False):
    """The one function that puts a TADiSR model where and how it runs. Returns the model.

    dtype: each part's precision by `descriptor.part_dtypes` (fp16 keeps VAE and mask decoder in
    fp32; fp8_e4m3fn stores UNet weights in fp8 and computes in bf16); None keeps the dtypes. A model
    whose UNet is stored in fp8 takes no other dtype (ValueError: load it again in that dtype).
    device: where it computes. offload "sequential": weights stay on the CPU and blocks visit
    `device` as they run (for GPUs smaller than the weights).
    """
    from .lowvram import disable_sequential_offload, enable_sequential_offload, is_fp8, store_fp8

    check_offload(offload)
    if dtype is not None:
        if dtype != torch.float8_e4m3fn and is_fp8(model.unet):
            raise ValueError(f"the UNet's weights are stored in fp8_e4m3fn, whose rounding a cast to "
                             f"{dtype_name(dtype)} cannot undo: load the model again in {dtype_name(dtype)}")
        want = part_dtypes(dtype)
        with _quiet_diffusers_casts():
            for name, target in want.items():
                module = getattr(model, name)
                if name == "unet" and dtype == torch.float8_e4m3fn:
                    if not is_fp8(module):
                        store_fp8(module, target)
                elif any(p.dtype != target for p in module.parameters()):
                    module.to(target)
    if device is not None:
        device = torch.device(device)
        if offload == "sequential" and device.type != "cpu":
            enable_sequential_offload(model, device)
        else:
            if offload == "sequential":
                log.warning("offload sequential has nothing to do on the CPU (the weights are in RAM already): "
                            "ignored")
            disable_sequential_offload(model)  # else its hooks would keep sending the blocks back home
            model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        from .lowvram import sequential_offload_device

        check_compile(compile, "sequential" if sequential_offload_device(model) is not None else "none")
        where = next(model.unet.parameters()).device
        if where.type == "cpu":
            log.warning("compile on the CPU: the first tile of each size compiles for minutes (7 min for a demo "
                        "tile on one core) and later tiles gain little; leave it off on the CPU")
        else:
            log.info("compile: the first tile of each size compiles for minutes; later tiles reuse it")
        for module in compile_targets(model):
            module.compile(dynamic=False)
    return model


def compile_targets(model) -> list[torch.nn.Module]:
    """The modules `--compile` compiles: the UNet and every VAE / mask-decoder block (decode calls
    them one by one, so compiling `vae.decoder` as a whole would never be used)."""
    enc, dec = model.vae.encoder, model.vae.decoder
    blocks = [model.unet, *enc.down_blocks, enc.mid_block, dec.mid_block, *dec.up_blocks]
    blocks += list(getattr(model.mi_decoder, "up_blocks", []))
    return blocks


def free_memory(device: torch.device | str) -> int:
    """Bytes that tensors on `device` could still take: free + cached-but-unused on CUDA, the host's
    available memory otherwise (`host_available_memory`; 8 GiB where it cannot be told)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    available = host_available_memory()
    return (8 << 30) if available is None else available


def host_available_memory() -> int | None:
    """The host's available memory in bytes: psutil's where it is installed (ComfyUI installs it), else
    MemAvailable (Linux) or the free pages (other Unixes); None where none of them answers."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def estimate_tile_bytes(model, tile_h: int, tile_w: int) -> int:
    """Rough peak activation bytes of one tile through encode -> denoise -> decode.

    The full-resolution decoder stage dominates: image stream (VAE c0 channels) and mask stream
    side by side, a few live tensors each, plus the stored encoder skip features; the paper layout
    adds its full-resolution interaction block (CDIB).
    """
    pixels = tile_h * tile_w
    c0 = model.spec.vae.block_out_channels[0]
    mask_c = c0
    ups = getattr(model.mi_decoder, "up_blocks", None)
    if ups is not None and len(ups):
        convs = [m.out_channels for m in ups[-1].modules() if isinstance(m, torch.nn.Conv2d)]
        mask_c = max(convs) if convs else c0
    elem = torch.finfo(model.vae.decoder.conv_in.weight.dtype).bits // 8
    per_pixel = 4 * (c0 + mask_c) + 2 * c0  # live tensors of both streams + skips (~1.4 c0)
    if model.spec.variant != "release":
        # CDIB (paper) runs its last interaction block at full resolution on both streams, each
        # widening to 2x its channels before the cross gate.
        per_pixel += 2 * (2 * model.spec.vae.interaction_channels()[3])
    return int(pixels * per_pixel * elem * 1.5)


def choose_tile_batch(model, tile_h: int, tile_w: int, units: int, device: torch.device | str | None = None,
                      headroom: float = 0.7) -> int:
    """Tiles per forward that fit `headroom` of the free memory (at least 1, at most the unit count)."""
    device = torch.device(device) if device is not None else model.device
    per_tile = max(1, estimate_tile_bytes(model, tile_h, tile_w))
    fit = int(free_memory(device) * headroom // per_tile)
    cap = MAX_AUTO_BATCH.get(device.type, 4)
    return max(1, min(fit, cap, units))


def choose_canvas_device(model, canvas_bytes: int, share: float = 0.2) -> torch.device:
    """Where "auto" canvases go: on the model's accelerator when they take at most `share` of its
    free memory (blending then never waits on host copies), else on the CPU."""
    device = model.device
    if device.type == "cuda" and canvas_bytes <= share * free_memory(device):
        return device
    return torch.device("cpu")


def is_oom(exc: BaseException) -> bool:
    """Whether `exc` is an accelerator or host out-of-memory error (torch's CPU allocator raises a
    RuntimeError that "can't allocate memory", Python a MemoryError)."""
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    if isinstance(exc, (oom_type, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def release_cached_memory() -> None:
    """Return cached allocator blocks to the driver (after an OOM, before a retry)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and hasattr(mps, "empty_cache") and torch.backends.mps.is_available():
        mps.empty_cache()
