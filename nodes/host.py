"""The few ComfyUI services the nodes use, behind plain functions.

This is the only module that touches `comfy.*` or `folder_paths`, always lazily and only when
ComfyUI itself has loaded them (so importing the pack never imports ComfyUI, and unit tests run
without it). Without ComfyUI: progress is a no-op, nothing is ever interrupted, model folders
come from $TADISR_MODELS_DIR (default <tmp>/tadisr_models) and models run where they are asked.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from typing import Callable, Iterator

import torch

from tadisr_core.streaming import SAFETENSORS_SUFFIXES

log = logging.getLogger("tadisr")

TADISR_FOLDER = "tadisr"          # models/tadisr: checkpoints and prompt caches (registered by us)
DIFFUSERS_FOLDER = "diffusers"    # models/diffusers: Kolors folders (ComfyUI's own folder name)
UNET_FOLDER = "diffusion_models"  # models/diffusion_models and models/unet: single Kolors UNet files
VAE_FOLDER = "vae"                # models/vae: the SDXL VAE file beside a single UNet
CHECKPOINTS_FOLDER = "checkpoints"  # models/checkpoints: all-in-one Kolors checkpoints (UNet + VAE)
LLM_FOLDER = "LLM"                # models/LLM: a ChatGLM3 folder or file (not registered by ComfyUI 0.3.75;
                                  # KwaiKolorsWrapper registers models/LLM/checkpoints under this name)
CHECKPOINT_EXTS = (".pkl",) + SAFETENSORS_SUFFIXES  # .safetensors and ComfyUI's .sft


# -- is ComfyUI here? -----------------------------------------------------------------------------
def _module(name: str):
    """`name` if ComfyUI is running in this process (its modules already imported), else None."""
    if os.environ.get("TADISR_NO_COMFY") == "1":
        return None
    if name in sys.modules:
        return sys.modules[name]
    if "comfy.model_management" not in sys.modules:
        return None
    try:
        return __import__(name, fromlist=["_"])
    except ImportError:
        return None


# -- progress and interruption --------------------------------------------------------------------
def progress_reporter(total: int) -> Callable[[int, int], None]:
    """A `progress(done, total)` callback that drives the node's progress bar in the UI."""
    utils = _module("comfy.utils")
    if utils is None:
        return lambda done, total: None
    bar = utils.ProgressBar(max(1, total))
    return lambda done, total: bar.update_absolute(done, max(1, total))


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed Cancel (reported as interrupted)."""
    mm = _module("comfy.model_management")
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


def cancel_callback() -> Callable[[], bool]:
    """A `cancel()` callback for the pipeline: raises the interrupt itself, else returns False."""
    def cancel() -> bool:
        check_interrupt()
        return False
    return cancel


# -- model folders --------------------------------------------------------------------------------
def _fallback_models_dir() -> str:
    return os.environ.get("TADISR_MODELS_DIR") or os.path.join(tempfile.gettempdir(), "tadisr_models")


def register_model_folders() -> None:
    """Register models/tadisr with ComfyUI. Folders a user added for "tadisr" in extra_model_paths.yaml
    come first; the default models/tadisr is always searched too."""
    fp = _module("folder_paths")
    if fp is None:
        return
    paths = list(fp.folder_names_and_paths.get(TADISR_FOLDER, ([], set()))[0])
    default = os.path.join(fp.models_dir, TADISR_FOLDER)
    if default not in paths:
        paths.append(default)
    try:  # so users see where checkpoints go
        os.makedirs(default, exist_ok=True)
    except OSError:
        pass
    fp.folder_names_and_paths[TADISR_FOLDER] = (paths, set(CHECKPOINT_EXTS))


def add_prompt_hook(hook: Callable[[dict], dict]) -> None:
    """Have ComfyUI pass every queued prompt's JSON through `hook` before it is validated (once per hook)."""
    server = _module("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is not None and hook not in getattr(instance, "on_prompt_handlers", [hook]):
        instance.add_on_prompt_handler(hook)


def is_output_class(class_type: str) -> bool | None:
    """Whether ComfyUI runs nodes of `class_type` as outputs (its OUTPUT_NODE flag); None outside
    ComfyUI or for a class it does not know."""
    registry = getattr(_module("nodes"), "NODE_CLASS_MAPPINGS", None)  # ComfyUI's nodes.py, not this package
    cls = registry.get(class_type) if isinstance(registry, dict) else None
    return None if cls is None else getattr(cls, "OUTPUT_NODE", False) is True


def model_folders(kind: str) -> list[str]:
    """The folders searched for `kind` (a ComfyUI folder name such as "tadisr", "diffusers", "vae",
    "diffusion_models"; extra_model_paths.yaml honoured), first one = where new files go."""
    fp = _module("folder_paths")
    if fp is not None:
        if kind == TADISR_FOLDER and kind not in fp.folder_names_and_paths:
            register_model_folders()
        try:
            return fp.get_folder_paths(kind)
        except KeyError:
            return [os.path.join(fp.models_dir, kind)]
    return [os.path.join(_fallback_models_dir(), kind)]


def llm_folders() -> list[str]:
    """Where ChatGLM3 is looked for: the folders registered as "LLM" plus models/LLM and
    models/LLM/checkpoints (Kolors-MZ keeps its files in the first, KwaiKolorsWrapper in the second
    and registers only that one), each once."""
    fp = _module("folder_paths")
    models = fp.models_dir if fp is not None else _fallback_models_dir()
    default = os.path.join(models, LLM_FOLDER)
    return list(dict.fromkeys([*model_folders(LLM_FOLDER), default, os.path.join(default, "checkpoints")]))


def comfy_base_path() -> str | None:
    """ComfyUI's own folder (the one holding custom_nodes/), None outside ComfyUI."""
    fp = _module("folder_paths")
    return getattr(fp, "base_path", None) if fp is not None else None


def list_files(kind: str, exts: tuple[str, ...]) -> list[str]:
    """Relative names of files with one of `exts` under the `kind` folders (sorted, recursive)."""
    fp = _module("folder_paths")
    if fp is not None and kind in fp.folder_names_and_paths:
        return sorted(f for f in fp.get_filename_list(kind) if f.lower().endswith(exts))
    names = set()
    for root in model_folders(kind):
        for dirpath, _, files in os.walk(root, followlinks=True):
            for f in files:
                if f.lower().endswith(exts):
                    names.add(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    return sorted(names)


def find_path(kind: str, name: str, folder: bool = False) -> str | None:
    """Full path of file (or folder) `name` in the `kind` folders, or None."""
    rel = os.path.normpath(name).lstrip(os.sep)
    if rel.startswith(".."):
        return None
    for root in model_folders(kind):
        path = os.path.join(root, rel)
        if (os.path.isdir(path) if folder else os.path.isfile(path)):
            return path
    return None


def input_directory() -> str:
    """ComfyUI's input folder (the current directory without ComfyUI)."""
    fp = _module("folder_paths")
    return fp.get_input_directory() if fp is not None else os.getcwd()


# -- devices and memory ---------------------------------------------------------------------------
def torch_device() -> torch.device:
    """The device ComfyUI computes on (CUDA/MPS/CPU as configured); the best available otherwise."""
    mm = _module("comfy.model_management")
    if mm is not None:
        return mm.get_torch_device()
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def offload_device() -> torch.device:
    """Where idle model weights wait (ComfyUI's UNet offload device; CPU otherwise)."""
    mm = _module("comfy.model_management")
    return mm.unet_offload_device() if mm is not None else torch.device("cpu")


def intermediate_device() -> torch.device:
    """Where node outputs (IMAGE, MASK) live between nodes."""
    mm = _module("comfy.model_management")
    return mm.intermediate_device() if mm is not None else torch.device("cpu")


class _Holder(torch.nn.Module):
    """Wraps a model for ComfyUI's ModelPatcher (which sets attributes such as `.device` on it)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.inner = model


def make_patcher(model: torch.nn.Module, device: torch.device):
    """A ComfyUI ModelPatcher for `model`, told the model's true size (`memory_plan.model_bytes`), so
    ComfyUI can unload it when others need memory; None without ComfyUI (or if this ComfyUI's
    patcher cannot wrap a plain module)."""
    from tadisr_core.memory_plan import model_bytes

    mp = _module("comfy.model_patcher")
    if mp is None:
        return None
    try:
        return mp.ModelPatcher(_Holder(model), load_device=device, offload_device=offload_device(),
                               size=model_bytes(model))
    except Exception as exc:  # noqa: BLE001 - fall back to plain .to() moves
        log.warning("TADiSR: ComfyUI model patcher unavailable (%s); managing devices directly", exc)
        return None


def low_vram_host() -> bool:
    """True when ComfyUI runs with --lowvram or --novram."""
    mm = _module("comfy.model_management")
    state = getattr(getattr(mm, "vram_state", None), "name", "")
    return state in ("LOW_VRAM", "NO_VRAM")


def free_memory(device: torch.device) -> int:
    """Bytes free on `device` (ComfyUI's count inside ComfyUI)."""
    mm = _module("comfy.model_management")
    if mm is not None:
        return int(mm.get_free_memory(device))
    from tadisr_core.devices import free_memory as core_free

    return core_free(device)


def offload_mode(model: torch.nn.Module, device: torch.device, memory_required: int = 0) -> str:
    """"sequential" (weights stay on the CPU, blocks visit the GPU) on --lowvram / --novram hosts or when
    the weights plus `memory_required` exceed the whole device (ComfyUI evicts other models first);
    else "none" (`memory_plan.choose_offload`)."""
    from tadisr_core.memory_plan import choose_offload, model_bytes

    mm = _module("comfy.model_management")
    if mm is None or device.type == "cpu":
        return "none"
    return choose_offload(model_bytes(model), memory_required, int(mm.get_total_memory(device)), low_vram_host())


@contextlib.contextmanager
def model_on_device(model: torch.nn.Module, device: torch.device, patcher=None,
                    memory_required: int = 0) -> Iterator[torch.nn.Module]:
    """Run with `model` on `device`.

    With a patcher, ComfyUI loads it (evicting other models if needed) and keeps it loaded until
    something else needs the memory; on a low-VRAM host, a device too small for the weights, or when
    ComfyUI could load only part of them, the weights stay on the CPU, each block visits the device as
    it runs, and what is left there goes home afterwards. Without a patcher, memory is freed first
    (inside ComfyUI), the model moved, and offloaded afterwards.
    """
    from tadisr_core.devices import place_model

    mm = _module("comfy.model_management")
    if patcher is not None and mm is not None:
        sequential = offload_mode(model, device, memory_required) == "sequential"
        loaded = False
        if not sequential:
            try:
                mm.load_models_gpu([patcher], memory_required=memory_required)
            except Exception as exc:  # noqa: BLE001 - a ComfyUI whose patcher cannot drive a plain module
                log.warning("TADiSR: ComfyUI could not load the model (%s); moving it directly", exc)
            else:
                loaded = True
                if device.type != "cpu" and _loaded_partially(patcher):
                    log.info("TADiSR: ComfyUI could load only part of the model: running it block by block")
                    sequential = True
        if sequential:
            # ComfyUI knows nothing of these weights: the resident modules and the block used last go
            # home after the run, as without a patcher
            _sequential(model, device, memory_required)
            try:
                yield model
            finally:
                _move_home(model, mm)
            return
        if loaded:
            # no move after a full load; plain modules ComfyUI left out, and an earlier sequential run's
            # hooks (a larger tile) taken away
            place_model(model, device)
            yield model
            return
    if mm is not None and device.type != "cpu":
        from tadisr_core.memory_plan import model_bytes

        mm.free_memory(model_bytes(model) + memory_required, device)
    place_model(model, device)
    try:
        yield model
    finally:
        if mm is not None and device.type != "cpu":
            _move_home(model, mm)


def _loaded_partially(patcher) -> bool:
    """Whether ComfyUI loaded only part of the weights (its low-VRAM partial load): the patcher counts fewer
    loaded bytes than the model's (`loaded_size() < model_size()`, as ComfyUI's own offloaded-memory
    count), or says `model_lowvram` (older ComfyUI)."""
    try:
        if int(patcher.loaded_size()) < int(patcher.model_size()):
            return True
    except (AttributeError, TypeError, ValueError):
        pass
    return getattr(getattr(patcher, "model", None), "model_lowvram", False) is True


def _move_home(model: torch.nn.Module, mm) -> None:
    """Weights ComfyUI does not manage back to the offload device (the block used last dropping its device
    copy, not copied back), the cache of freed blocks emptied."""
    from tadisr_core.lowvram import send_offloaded_block_home

    send_offloaded_block_home(model)
    model.to(offload_device())
    mm.soft_empty_cache()


def _sequential(model: torch.nn.Module, device: torch.device, memory_required: int) -> None:
    """Sequential offload onto `device` (`devices.place_model`), set up on every run: ComfyUI may have
    moved the model home since the last one, resident modules included."""
    from tadisr_core.devices import place_model
    from tadisr_core.lowvram import sequential_offload_device
    from tadisr_core.memory_plan import weight_bytes

    mm = _module("comfy.model_management")
    mm.free_memory(weight_bytes(model, "sequential") + memory_required, device)  # resident + one block
    if sequential_offload_device(model) != device:
        log.info("TADiSR: low VRAM: weights stay on the CPU, blocks run on %s one at a time", device)
    place_model(model, device, None, offload="sequential")


def make_room(nbytes: int, device: torch.device) -> None:
    """Ask ComfyUI to unload models until `nbytes` are free on `device` (no-op on CPU / without ComfyUI)."""
    mm = _module("comfy.model_management")
    if mm is not None and device.type != "cpu":
        mm.free_memory(nbytes, device)

