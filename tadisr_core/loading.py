"""Assemble a ready TADiSR model from the user's Kolors files, a TADiSR checkpoint and a prompt cache."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shlex
from pathlib import Path
from typing import Callable

import torch

from .backbone import check_backbone, load_unet, load_vae
from .checkpoint import Checkpoint, apply_checkpoint, cast_for_load, load_checkpoint
from .descriptor import WEIGHT_DTYPES, dtype_name, part_dtypes
from .devices import check_offload, place_model, resolve_device, resolve_dtype
from .files import source_identity
from .kolors_files import KolorsFiles, KolorsFolderError, find_kolors_files
from .lora import merge_lora
from .model import TADiSRModel
from .prompt import PromptCache, compute_prompt_cache_from_kolors, text_encoder_device
from .spec import HEATMAP_PROMPT, SDXL_TIME_IDS
from .streaming import fit_shape
from .wording import named

log = logging.getLogger("tadisr")


def ensure_prompt_cache(path: str | Path, kolors_dir: str | Path | None, device: str | torch.device = "cpu",
                        time_ids: tuple[float, ...] = SDXL_TIME_IDS,
                        compute: str | torch.device = "cpu",
                        given_as: tuple[str, str] | None = None,
                        prompt: str = HEATMAP_PROMPT) -> PromptCache:
    """Load the prompt cache at `path`, computing it once with ChatGLM3 when absent (of `prompt` and
    `time_ids`).

    `kolors_dir`: a Kolors folder, a ChatGLM3 folder or file, or a text_encoder folder with its
    tokenizer (`prompt.find_text_encoder`); `device` may be "auto": `compute` (the model's device) when it is
    a GPU with room for ChatGLM3, else the CPU (`prompt.text_encoder_device`). `given_as` names, in the
    caller's words, where the cache path and ChatGLM3 are given (by default `prompt_words`).
    """
    path = Path(path)
    cache_flag, encoder_flag = given_as or prompt_words()
    if path.is_file():
        return PromptCache.load(path)
    if kolors_dir is None:
        raise FileNotFoundError(f"prompt cache not found: {path}, and no ChatGLM3 to compute it from "
                                f"(pass {encoder_flag} or a Kolors folder with text_encoder/ and tokenizer/)")
    try:
        cache = compute_prompt_cache_from_kolors(kolors_dir, prompt=prompt, time_ids=time_ids,
                                                 device=text_encoder_device(device, compute))
    except KolorsFolderError as exc:  # no usable ChatGLM3: the missing cache is the news, maybe a typo
        raise KolorsFolderError(f"prompt cache not found: {path}; fix {cache_flag}, or pass {encoder_flag} "
                                f"to compute it (ChatGLM3: {exc})") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    cache.save(path)
    return cache


def prompt_words() -> tuple[str, str]:
    """How messages name the prompt-cache path and the ChatGLM3 source: the CLI's flags on the command line,
    else `load_tadisr`'s arguments (`wording.named`)."""
    return named("--prompt-cache", "prompt_cache"), named("--text-encoder DIR|FILE", "text_encoder=DIR|FILE")


def _load_prompt(prompt_cache: str | Path | None, encoder_source: str | Path | None, text_encoder_device_name: str,
                 compute: torch.device, given_as: tuple[str, str] | None,
                 conditioning: tuple[str, tuple[float, ...]]) -> PromptCache:
    """The prompt conditioning of `load_tadisr`: the cache at `prompt_cache` (computed and saved there when
    missing), or when None the one kept in the user's cache folder (`prompt_store.kept_prompt`: computed
    once); computed, with ChatGLM3 from `encoder_source`, it is that of `conditioning` (the prompt and
    time ids the checkpoint was trained with: `trained_conditioning`)."""
    from .prompt_store import kept_prompt

    prompt, time_ids = conditioning
    if prompt_cache is not None:
        return ensure_prompt_cache(prompt_cache, encoder_source, device=text_encoder_device_name, compute=compute,
                                   given_as=given_as, prompt=prompt, time_ids=time_ids)
    cache_flag, encoder_flag = given_as or prompt_words()
    if encoder_source is None:
        raise FileNotFoundError(f"no prompt cache given and no ChatGLM3 to compute one "
                                f"(pass {cache_flag} FILE or {encoder_flag})")
    return kept_prompt(encoder_source, prompt, time_ids, text_encoder_device(text_encoder_device_name, compute),
                       cache_flag)


def trained_conditioning(ckpt: Checkpoint) -> tuple[str, tuple[float, ...]]:
    """The prompt and SDXL time ids `ckpt` was trained with, as its metadata records them; the release's
    (`HEATMAP_PROMPT`, `SDXL_TIME_IDS`) where it records none (the release's .pkl)."""
    return ckpt.metadata.get("prompt") or HEATMAP_PROMPT, tuple(_recorded_time_ids(ckpt) or SDXL_TIME_IDS)


def _load_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype weights are streamed in: the storage dtype, except fp8 (cast after merging)."""
    storage, compute = WEIGHT_DTYPES.get(dtype_name(dtype), (dtype, None))
    return compute or storage


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _merge_in_fp32(model: TADiSRModel, parts: dict, ckpt) -> None:
    """Merge LoRA into low-precision base weights exactly as an fp32 merge followed by a cast would
    (the numbers of loading in fp32, merging and casting), one layer at a time: each base weight is
    read again in fp32 from its file (or taken from the checkpoint when the checkpoint sets it), the
    LoRA factors from the checkpoint, merged in fp32 and cast back."""
    from .lora import lora_layers

    for group, part in parts.items():
        module = getattr(model, group)
        todo = {id(m) for m in lora_layers(module)
                if not m.merged and m.get_base_layer().weight.dtype != torch.float32}
        layers = {name: m for name, m in module.named_modules() if id(m) in todo}
        if not layers:
            continue
        saved = ckpt.groups.get(group, {})
        wanted = {f"{name}.weight": name for name in layers if f"{name}.base_layer.weight" not in saved}

        def rename(key: str, part=part, wanted=wanted):
            new = part.rename(key)
            return new if new in wanted else None

        for name in layers:
            if f"{name}.base_layer.weight" in saved:  # merged into a copy: the checkpoint stays as it was
                _merge_layer(layers[name], name, saved[f"{name}.base_layer.weight"].clone(), saved)
        for key, weight in part.tensors(torch.float32, rename):
            _merge_layer(layers[wanted[key]], wanted[key], weight, saved)
            del weight  # one fp32 base weight alive at a time: gone before the next read


@torch.no_grad()
def _merge_layer(layer, name: str, weight: torch.Tensor, saved: dict) -> None:
    base = layer.get_base_layer()
    factors = [(p, saved[f"{name}.{pname}"]) for pname, p in layer.named_parameters() if ".lora_" in f".{pname}"]
    # The merged values are copied back into the tensors the layer already has: the fp32 temporaries
    # are then the only allocations, and each layer's reuse the last one's (no heap growth).
    kept = [(base.weight, base.weight.data)] + [(p, p.data) for p, _ in factors]
    base.weight.data = fit_shape(weight, base.weight.shape).to(base.weight.device, torch.float32)
    for p, value in factors:
        p.data = value.to(p.device, torch.float32)
    layer.merge()
    for p, storage in kept:
        storage.copy_(p.data)
        p.data = storage


def warn_of_other_conditioning(ckpt: Checkpoint, prompt: PromptCache, given: str | Path | PromptCache | None,
                               own_cache: bool = False) -> None:
    """Warn when the conditioning encodes another prompt, or other SDXL time ids, than the checkpoint was
    trained with (its metadata says; the release's .pkl does not, nor time ids before 2026-12-04): the
    model then runs on conditioning it never saw. The warning says how to compute a matching cache with
    ChatGLM3, or, with `own_cache` (a model whose conditioning is kept with it, e.g. a demo's random
    embedding, which no encoder makes), to use that one."""
    trained = ckpt.metadata.get("prompt")
    trained_ids = _recorded_time_ids(ckpt)
    used_ids = prompt.time_ids.flatten().tolist()
    other_prompt = trained is not None and trained != prompt.prompt
    other_ids = trained_ids is not None and (len(trained_ids) != len(used_ids) or
                                             any(abs(a - b) > 1e-3 for a, b in zip(trained_ids, used_ids)))
    if not (other_prompt or other_ids):
        return
    where = f"the prompt cache {given}" if isinstance(given, (str, Path)) else "the prompt conditioning"
    what = (f"the prompt {trained!r}, but {where} encodes {prompt.prompt!r}" if other_prompt else
            f"the time ids {_numbers(trained_ids)}, but {where} holds {_numbers(used_ids)}")
    if own_cache:
        fix = (f"use the prompt cache kept with it (its run's or its folder's: leave out "
               f"{named('--prompt-cache', 'prompt_cache')})")
    else:
        command = ["tadisr", "prompt-cache", "--kolors", "DIR", "-o", "FILE", "--prompt", trained or prompt.prompt]
        command += ["--time-ids", *_numbers(trained_ids).split()] if trained_ids is not None else []
        fix = f"compute a cache of its conditioning with `{shlex.join(command)}` (DIR: Kolors or ChatGLM3)"
    log.warning("%s was trained with %s: the output differs from what it learned; %s", ckpt.path or "the checkpoint",
                what, fix)


def _recorded_time_ids(ckpt: Checkpoint) -> list[float] | None:
    """The time ids a checkpoint's metadata records, or None (none recorded, or not a list of numbers)."""
    try:
        ids = json.loads(ckpt.metadata.get("time_ids") or "null")
    except ValueError:
        return None
    numbers = isinstance(ids, list) and all(isinstance(v, (int, float)) for v in ids)
    return [float(v) for v in ids] if numbers else None


def _numbers(values: list[float]) -> str:
    """Time ids as `prompt-cache --time-ids` takes them: 768 for 768.0."""
    return " ".join(str(int(v)) if v.is_integer() else repr(v) for v in values)


def load_tadisr(kolors_dir: str | Path | KolorsFiles | None, checkpoint: str | Path | Checkpoint,
                prompt_cache: str | Path | PromptCache | None = None, *, dtype: str | torch.dtype = torch.float32,
                device: str | torch.device = "cpu", merge_lora_weights: bool = True,
                unet: str | Path | None = None, vae: str | Path | None = None,
                text_encoder: str | Path | None = None, text_encoder_device_name: str | torch.device = "cpu",
                offload: str = "none", prompt_once: Callable | None = None,
                prompt_given_as: tuple[str, str] | None = None) -> TADiSRModel:
    """Load the Kolors backbone, apply a TADiSR checkpoint and the prompt conditioning.

    The backbone: `kolors_dir` (a Kolors folder, or a `KolorsFiles`) and/or `unet` / `vae` files or
    folders (which win). Both parts are checked to be Kolors from their headers before anything is
    built (NotKolorsError), then built on the meta device and streamed in the target dtype.
    `prompt_cache` may be a PromptCache, a path (computed with ChatGLM3 from `text_encoder`, else the
    Kolors folder, and saved there when the file does not exist yet) or None (computed once and kept in
    the user's cache folder, `prompt_store.kept_prompt`);
    `prompt_given_as` is `ensure_prompt_cache`'s `given_as`. `text_encoder_device_name` is where ChatGLM3
    runs when it must ("auto": `prompt.text_encoder_device`); a device this machine lacks is refused first.
    `prompt_once(make)`, when given, returns what `make()` (which loads or computes the prompt) returns,
    the way it chooses: `ranks.Ranks.from_rank0` runs it in one process of a launcher and hands the
    conditioning to the others, which then never load ChatGLM3.
    `dtype` fp8_e4m3fn stores the UNet weights in fp8 and computes in bf16; under fp16 the VAE stays
    fp32 (`descriptor.part_dtypes`). `offload="sequential"` keeps weights on the CPU between blocks.
    The LoRA is merged into the base weights unless `merge_lora_weights=False` (equal within float
    rounding, fewer kernels). `dtype` and `device` may also be given by name, as on the command line
    ("auto", "bf16", "cuda:1": `devices.resolve_dtype` / `resolve_device`).
    """
    check_offload(offload)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if text_encoder_device_name != "auto":  # refused before gigabytes of ChatGLM3 are read, not after
        text_encoder_device(text_encoder_device_name)
    files = kolors_dir if isinstance(kolors_dir, KolorsFiles) else find_kolors_files(kolors_dir, unet, vae, dtype)
    unet_part, vae_part = check_backbone(files)
    load_dtype = _load_dtype(dtype)
    wide = part_dtypes(load_dtype)["vae"]
    dtypes = {"unet": load_dtype, "vae": wide, "mi_decoder": wide}
    given = isinstance(checkpoint, Checkpoint)  # the caller's: never changed, never shared with the model
    ckpt = cast_for_load(checkpoint, dtypes) if given else load_checkpoint(checkpoint, dtypes)
    weights_id = (files.key(), source_identity(ckpt.path))
    spec = dataclasses.replace(ckpt.spec, unet=unet_part.spec, vae=vae_part.spec)
    encoder_source = text_encoder or files.root
    if isinstance(prompt_cache, PromptCache):
        prompt = prompt_cache
    else:
        conditioning = trained_conditioning(ckpt)

        def make() -> PromptCache:
            return _load_prompt(prompt_cache, encoder_source, text_encoder_device_name, device, prompt_given_as,
                                conditioning)

        prompt = prompt_once(make) if prompt_once is not None else make()
    try:  # before the weights are read
        prompt.check_fits(unet_part.spec.encoder_hid_dim)
    except ValueError as exc:
        where = "" if isinstance(prompt_cache, PromptCache) or prompt_cache is None else f"{prompt_cache}: "
        raise ValueError(f"{where}{exc}") from None
    warn_of_other_conditioning(ckpt, prompt, prompt_cache)
    spec = dataclasses.replace(spec, prompt_tokens=prompt.prompt_embeds.shape[1],
                               text_hidden=prompt.prompt_embeds.shape[2])
    unet_module = load_unet(files, load_dtype, checked=unet_part)
    vae_module = load_vae(files, wide, checked=vae_part)
    with _default_dtype(wide):  # LoRA, skip convs (and a given checkpoint's decoder) are born in their dtype;
        # the decoder of a checkpoint read here takes its tensors instead of a copy
        model = TADiSRModel(spec, unet_module, vae_module, decoder_device=None if given else "meta")
    if not merge_lora_weights:  # cast the checkpoint tensor by tensor: the same rounding as a cast afterwards
        for group, part_dtype in (("unet", load_dtype), ("vae", wide), ("mi_decoder", wide)):
            sd = ckpt.groups.get(group, {})
            for key in list(sd):
                sd[key] = sd[key].to(part_dtype) if sd[key].is_floating_point() else sd[key]
    apply_checkpoint(model, ckpt)
    if merge_lora_weights:
        _merge_in_fp32(model, {"unet": unet_part, "vae": vae_part}, ckpt)
        merge_lora(model)  # whatever is left (fp32 models merge here directly)
    del ckpt
    model.eval().requires_grad_(False)
    place_model(model, device, dtype, offload=offload)
    model.set_prompt(prompt)
    model.weights_id = weights_id
    return model
