"""Load TADiSR Model, the logic: Kolors files + TADiSR checkpoint + prompt cache -> a model handle.

The Kolors choices and what they resolve to come from `tadisr_core.kolors_files` (every layout
users keep: diffusers folders, folders without vae/, single UNet + VAE files), read from ComfyUI's
model folders. Two more choices, the shipped demo models, need no Kolors at all.
"""

from __future__ import annotations

import logging
import os

import torch

from tadisr_core.files import file_identity

from . import host
from .model_cache import TADiSRHandle, get_or_load

log = logging.getLogger("tadisr")

AUTO_CACHE = "auto (compute once)"
PROMPT_CACHE_PREFIX = "prompt_cache"
DEMO_CHOICE = "demo (small built-in model, no Kolors needed)"
DEMO_RELEASE_CHOICE = "demo-release (small built-in model, release layout, no Kolors needed)"
DEMO_CHOICES = {DEMO_CHOICE: "demo", DEMO_RELEASE_CHOICE: "demo-release"}  # choice -> model_ref name
NO_CHECKPOINT = "none found (put one in models/tadisr)"


def _kolors_dirs() -> tuple[list[str], list[str], list[str], list[str]]:
    """(diffusers, diffusion_models = models/unet too, vae, checkpoints) folders, as ComfyUI knows them."""
    return (host.model_folders(host.DIFFUSERS_FOLDER), host.model_folders(host.UNET_FOLDER),
            host.model_folders(host.VAE_FOLDER), host.model_folders(host.CHECKPOINTS_FOLDER))


def demo_choices() -> list[str]:
    """The built-in demo models whose weights are in the pack."""
    from tadisr_core import model_ref

    shipped = model_ref.shipped_models()
    return [choice for choice, name in DEMO_CHOICES.items() if shipped[name].checkpoint.is_file()]


def kolors_choices() -> list[str]:
    """The Kolors backbones the loader offers (`kolors_files.list_kolors_candidates` over ComfyUI's
    diffusers, diffusion_models/unet, vae and checkpoints folders), then the demo models that are shipped."""
    from tadisr_core.kolors_files import list_kolors_candidates

    return list_kolors_candidates(*_kolors_dirs()) + demo_choices()


def _is_prompt_cache(name: str) -> bool:
    return os.path.basename(name).lower().startswith(PROMPT_CACHE_PREFIX)


def checkpoint_choices() -> list[str]:
    """TADiSR checkpoints (.pkl / .safetensors / .sft) in models/tadisr, prompt caches left out; a
    placeholder when there is none (the demo models need none)."""
    names = [f for f in host.list_files(host.TADISR_FOLDER, host.CHECKPOINT_EXTS) if not _is_prompt_cache(f)]
    return names or [NO_CHECKPOINT]


def prompt_cache_choices() -> list[str]:
    """"auto" plus the prompt_cache*.safetensors (or .sft) files in models/tadisr."""
    files = host.list_files(host.TADISR_FOLDER, host.SAFETENSORS_SUFFIXES)
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


def resolve_kolors(name: str, dtype: torch.dtype | None = None):
    """The `KolorsFiles` behind a Kolors choice for a load in `dtype` (`kolors_files.resolve_choice`);
    its KolorsFolderError (what is missing and where it belongs) passes through unchanged."""
    from tadisr_core.kolors_files import resolve_choice

    return resolve_choice(name, *_kolors_dirs(), dtype=dtype)


def resolve_checkpoint(name: str) -> str:
    """Full path of a TADiSR checkpoint; FileNotFoundError saying where it belongs."""
    path = host.find_path(host.TADISR_FOLDER, name) if name and name != NO_CHECKPOINT else None
    if path is None:
        found = [c for c in checkpoint_choices() if c != NO_CHECKPOINT]
        raise FileNotFoundError(
            f"TADiSR: checkpoint '{name}' not found in models/tadisr ({_folders(host.TADISR_FOLDER)}). "
            + (f"Choose one of {found}." if found else
               "Put a TADiSR checkpoint there: the released tadisr_kolors_ftsr_526000.pkl or a converted "
               ".safetensors.")
            + (" (The built-in demo Kolors choices ignore this input: pick any listed entry.)"
               if demo_choices() else ""))
    return path


def auto_cache_name(files) -> str:
    """prompt_cache_<Kolors folder name>.safetensors, or <UNet file stem> when there is no folder."""
    base = files.root.name if files.root is not None else files.unet.stem
    return f"{PROMPT_CACHE_PREFIX}_{base}.safetensors"


def resolve_prompt_cache(name: str, files) -> str:
    """The prompt-cache file to use. "auto": `auto_cache_name(files)` in models/tadisr (computed with
    ChatGLM3 on first use when it does not exist yet)."""
    if name == AUTO_CACHE or not name:
        auto = auto_cache_name(files)
        return host.find_path(host.TADISR_FOLDER, auto) or os.path.join(host.model_folders(host.TADISR_FOLDER)[0], auto)
    path = host.find_path(host.TADISR_FOLDER, name)
    if path is None:
        raise FileNotFoundError(f"TADiSR: prompt cache '{name}' not found in models/tadisr "
                                f"({_folders(host.TADISR_FOLDER)}); choose '{AUTO_CACHE}' to compute it.")
    return path


def text_encoder_source(files, problems: list[str] | None = None):
    """Where ChatGLM3 is read from to compute a prompt cache: the Kolors folder when its text_encoder/
    is whole (`prompt.find_text_encoder` finds its weights and tokenizer), else the first ChatGLM3
    (folder or single .safetensors file) found in models/LLM, models/LLM/checkpoints or models/diffusers;
    None if none. What the Kolors folder lacks, and why a ChatGLM3 file found there cannot be used,
    go to `problems`."""
    from tadisr_core.chatglm_file import add_tokenizer_root
    from tadisr_core.kolors_files import KolorsFolderError
    from tadisr_core.prompt import find_text_encoder, list_text_encoders

    problems = [] if problems is None else problems
    if files.root is not None and (files.root / "text_encoder").is_dir():
        try:
            find_text_encoder(files.root)
            return files.root
        except KolorsFolderError as exc:  # a partial download: ChatGLM3 from elsewhere
            problems.append(str(exc))
    if host.comfy_base_path():  # the node packs' tokenizer, when models/ lies outside the ComfyUI tree
        add_tokenizer_root(host.comfy_base_path())
    found = list_text_encoders(*host.llm_folders(), *host.model_folders(host.DIFFUSERS_FOLDER), problems=problems)
    return found[0] if found else None


def resolve_device(name: str) -> torch.device:
    """"auto" -> ComfyUI's compute device (`devices.resolve_device`); anything else as torch understands it."""
    from tadisr_core.devices import device_refusal_reason
    from tadisr_core.devices import resolve_device as core_resolve

    try:
        return core_resolve(name, auto=host.torch_device())
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"TADiSR: device '{name}' cannot be used ({device_refusal_reason(exc, name)}); choose one "
                         f"of {device_choices()}") from None


def resolve_dtype(name: str, device: torch.device, fp16_safe: bool = True) -> torch.dtype:
    """"auto" -> bf16 / fp16 on CUDA (as supported), fp16 on MPS (fp32 instead of fp16 for a model that is
    not `fp16_safe`), fp32 on the CPU (`devices.resolve_dtype`); fp8_e4m3fn stores the UNet in fp8."""
    from tadisr_core.devices import DTYPE_CHOICES
    from tadisr_core.devices import resolve_dtype as core_resolve

    if name not in DTYPE_CHOICES:
        raise ValueError(f"TADiSR: unknown dtype '{name}'; choose one of {list(DTYPE_CHOICES)}")
    return core_resolve(name, device, fp16_safe=fp16_safe)


def _ensure_prompt_cache(cache_path: str, files, dev: torch.device) -> None:
    """Compute the prompt cache once with ChatGLM3 (on the GPU when it has room, else the CPU)."""
    from tadisr_core.loading import ensure_prompt_cache
    from tadisr_core.prompt import CHATGLM_BYTES, text_encoder_device

    problems: list[str] = []
    source = text_encoder_source(files, problems)
    if source is None:
        found = f" ({'; '.join(problems)})" if problems else ""
        raise FileNotFoundError(
            f"TADiSR: the prompt cache {cache_path} does not exist and no usable ChatGLM3 was found to compute "
            f"it{found}: put Kolors' text_encoder/ + tokenizer/ in the Kolors folder, or a ChatGLM3 folder or "
            f"chatglm3-fp16.safetensors (with its tokenizer) in models/LLM ({', '.join(host.llm_folders())}), or "
            f"choose a prompt_cache*.safetensors file.")
    host.make_room(CHATGLM_BYTES, dev)
    encoder_device = text_encoder_device("auto", dev, host.free_memory(dev))
    log.info("TADiSR: computing the prompt cache %s with ChatGLM3 from %s on %s (once)", cache_path, source,
             encoder_device)
    ensure_prompt_cache(cache_path, source, device=encoder_device)


def _demo_files_key(name: str) -> tuple:
    """The files of a shipped demo model (model_ref name), each as `file_identity`; FileNotFoundError
    naming a missing one and what to do."""
    from tadisr_core import model_ref

    shipped = model_ref.shipped_models()[name]
    for path in (shipped.checkpoint, shipped.prompt_cache):
        if not path.is_file():
            raise FileNotFoundError(f"TADiSR: the built-in {name} model's {path.name} is missing from {path.parent} "
                                    "(this copy of the pack was installed without it): reinstall the pack, or "
                                    "choose a Kolors model instead.")
    return file_identity(shipped.checkpoint), file_identity(shipped.prompt_cache)


def _resolve(kolors: str, checkpoint: str, prompt_cache: str, dtype: torch.dtype | None):
    """(KolorsFiles, checkpoint path, prompt-cache path) of the loader's choices for a load in `dtype`, and
    the key of those files: their identities; the 'auto' prompt cache by its path alone (the first load
    writes it: its identity would change under the model just loaded)."""
    files = resolve_kolors(kolors, dtype)
    ckpt_path = resolve_checkpoint(checkpoint)
    cache_path = resolve_prompt_cache(prompt_cache, files)
    cache_key = os.path.realpath(cache_path) if prompt_cache == AUTO_CACHE else file_identity(cache_path)
    return files, ckpt_path, cache_path, (files.key(), file_identity(ckpt_path), cache_key)


def _load_demo(name: str, dt: torch.dtype, dev: torch.device, merge_lora: bool) -> TADiSRHandle:
    """A shipped demo model, by model_ref name (a standalone checkpoint: no Kolors, no checkpoint or
    prompt-cache input)."""
    from tadisr_core import model_ref

    shipped = model_ref.shipped_models()[name]
    ckpt = shipped.checkpoint
    key = (name, *_demo_files_key(name), str(dt), str(dev), bool(merge_lora))

    def load() -> TADiSRHandle:
        log.info("TADiSR: loading the %s model %s (%s, %s)", name, ckpt, dt, dev)
        model = model_ref.load_model(name, dtype=dt, device=host.offload_device(),
                                     merge_lora_weights=bool(merge_lora))
        return TADiSRHandle(model, dev, dt, key, {"checkpoint": str(ckpt), "prompt": str(shipped.prompt_cache)},
                            host.make_patcher(model, dev))

    return get_or_load(key, load)


def _device_and_dtype(kolors: str, dtype: str, device: str) -> tuple[torch.device, torch.dtype]:
    """The device and dtype a load of the Kolors choice `kolors` runs in (`resolve_device`, `resolve_dtype`:
    auto avoids fp16 for a shipped model that overflows it)."""
    from tadisr_core import model_ref

    dev = resolve_device(device)
    shipped = model_ref.shipped_models().get(DEMO_CHOICES.get(kolors, ""))
    return dev, resolve_dtype(dtype, dev, fp16_safe=shipped is None or shipped.fp16_safe)


# Where each of TADiSR's other weight files goes when chosen as the checkpoint (`CheckpointError.part`;
# the command line's words are tadisr_core.checkpoint.CLI_ADVICE).
NODE_ADVICE = {"unet": "put it in models/unet and choose it in the kolors list (with an SDXL VAE from models/vae)",
               "vae": "put it in models/vae: the kolors list pairs it with a UNet from models/unet",
               "text-encoder": "put it in models/LLM: the loader computes a missing prompt cache with it",
               "prompt-cache": "choose it as prompt_cache (a prompt_cache*.safetensors file in models/tadisr)"}


def load_model(kolors: str, checkpoint: str, prompt_cache: str = AUTO_CACHE, dtype: str = "auto",
               device: str = "auto", merge_lora: bool = True) -> TADiSRHandle:
    """Resolve names to files and load (or reuse) the model. Errors name the file and its folder;
    the Kolors ones (KolorsFolderError, NotKolorsError) are the library's own words."""
    from tadisr_core import model_ref

    dev, dt = _device_and_dtype(kolors, dtype, device)
    if kolors in DEMO_CHOICES:
        try:
            model_ref.check_dtype(DEMO_CHOICES[kolors], dt)
        except ValueError as exc:
            raise ValueError(f"TADiSR: {exc} (dtype auto chooses one for it)") from None
        return _load_demo(DEMO_CHOICES[kolors], dt, dev, merge_lora)
    files, ckpt_path, cache_path, files_key = _resolve(kolors, checkpoint, prompt_cache, dt)
    key = (*files_key, str(dt), str(dev), bool(merge_lora))

    def load() -> TADiSRHandle:
        from tadisr_core.checkpoint import CheckpointError
        from tadisr_core.loading import load_tadisr

        if not os.path.isfile(cache_path):
            _ensure_prompt_cache(cache_path, files, dev)
        log.info("TADiSR: loading %s + %s (%s, %s%s)", kolors, ckpt_path, dt, dev,
                 ", LoRA merged" if merge_lora else "")
        try:
            model = load_tadisr(files, ckpt_path, cache_path, dtype=dt, device=host.offload_device(),
                                merge_lora_weights=bool(merge_lora))
        except CheckpointError as exc:
            if exc.part is None:
                raise
            raise CheckpointError(f"TADiSR: {exc}; {NODE_ADVICE[exc.part]}") from None
        sources = {"kolors": str(files.root or files.unet), "checkpoint": ckpt_path, "prompt": cache_path}
        return TADiSRHandle(model, dev, dt, key, sources, host.make_patcher(model, dev))

    return get_or_load(key, load)


def fingerprint(kolors: str, checkpoint: str, prompt_cache: str = AUTO_CACHE, dtype: str = "auto",
                device: str = "auto") -> str | float:
    """The key of the files the loader would read (as its model cache keys them; `dtype` and `device` choose
    among a Kolors folder's fp16 and full-precision weights): a file replaced on disk under the same name
    is loaded again. An input fed by another node goes by ComfyUI's own rule. NaN (never equal: always
    run) when a choice does not resolve; running then says why."""
    if not all(isinstance(v, str) for v in (kolors, checkpoint, prompt_cache)):
        return "linked"  # ComfyUI passes None for an input fed by another node
    try:
        if kolors in DEMO_CHOICES:
            return repr(_demo_files_key(DEMO_CHOICES[kolors]))
        linked = not isinstance(dtype, str) or not isinstance(device, str)
        dt = None if linked else _device_and_dtype(kolors, dtype, device)[1]
        return repr(_resolve(kolors, checkpoint, prompt_cache, dt)[-1])
    except (OSError, ValueError):  # KolorsFolderError is an OSError, NotKolorsError a ValueError
        return float("nan")


def validate_checkpoint(checkpoint: str) -> bool | str:
    """True, or the message saying where the checkpoint belongs (for the loader's early check).
    The "none found" placeholder passes: it is fine with the demo models and reported at run otherwise."""
    if checkpoint == NO_CHECKPOINT:
        return True
    try:
        resolve_checkpoint(checkpoint)
    except FileNotFoundError as exc:
        return str(exc)
    return True
