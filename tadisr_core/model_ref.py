"""Runnable models by reference: a shipped demo, a training run's folder, or a checkpoint file.

    --model demo                       the demo model shipped in tadisr_core/demo/ (no other files)
    --model demo-release               its release-layout twin, shipped in tadisr_core/demo_release/
    --model runs/demo                  a training run: model_final.safetensors, else its newest checkpoint
    --model runs/demo/checkpoints/step_00000600   one checkpoint of a run (the folder or its model.safetensors)
    --model path/to/model.safetensors  a native checkpoint (or the release .pkl); a prompt_cache.safetensors
                                       beside it is its prompt conditioning
    --model exported/                  a folder of `training.export_model`: one .safetensors + prompt_cache.safetensors

A checkpoint that holds its whole backbone (trained, or a base no Kolors folder holds; `backbone=included`
in its metadata) runs alone. One that holds adapters only needs the Kolors weights it was trained on
(`kolors` / `unet` / `vae`, or the run's `model.kolors_dir` / `model.unet` / `model.vae`); another
backbone is refused (`checkpoint.check_base`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import BaseMismatchError, Checkpoint, CheckpointError, apply_checkpoint, load_checkpoint
from .files import read_json_object, source_identity
from .kolors_files import base_args
from .prompt import PromptCache
from .wording import named

DEMO_DIR = Path(__file__).resolve().parent / "demo"
DEMO_CHECKPOINT = DEMO_DIR / "tadisr_demo.safetensors"
DEMO_PROMPT_CACHE = DEMO_DIR / "prompt_cache.safetensors"
DEMO_RELEASE_DIR = Path(__file__).resolve().parent / "demo_release"
DEMO_RELEASE_CHECKPOINT = DEMO_RELEASE_DIR / "tadisr_demo_release.safetensors"
DEMO_RELEASE_PROMPT_CACHE = DEMO_RELEASE_DIR / "prompt_cache.safetensors"
RUN_FINAL = "model_final.safetensors"
RUN_PROMPT_CACHE = "prompt_cache.safetensors"
RUN_CHECKPOINTS = "checkpoints"          # a run's step checkpoints: RUN/checkpoints/step_00000600/
RUN_STEP_DIR = re.compile(r"^step_(\d{8})$")
RUN_STEP_MODEL = "model.safetensors"     # the weights in each step folder
RUN_CONFIG = "config.json"               # the run's training config (training.config.Config.to_dict)
RUN_METRICS = "metrics.jsonl"            # the run's log: one JSON line per step (training.train)
RUN_CONFIG_SECTIONS = ("model", "data", "loss", "optim", "train", "ablation")  # its top-level keys
NO_WEIGHTS_HELP = ("no model given. Try the shipped demo model: --model demo (small, trained on synthetic "
                   "text scenes). For the real model: --kolors DIR (Kwai-Kolors/Kolors) and --checkpoint "
                   "tadisr_kolors_ftsr_526000.pkl (huqiming513/TADiSR-Models); see README, Weights")


@dataclass(frozen=True)
class ModelFiles:
    """What a model reference points at: a checkpoint, its prompt cache and Kolors base when known."""

    checkpoint: Path
    prompt_cache: Path | None = None
    kolors: str | None = None
    run: Path | None = None     # the training run folder the checkpoint belongs to
    unet: str | None = None     # the run's model.unet / model.vae (files or folders overriding kolors')
    vae: str | None = None
    init_checkpoint: str | None = None  # the run's model.init_checkpoint (its weights before training)


@dataclass(frozen=True)
class ShippedModel:
    """A model that comes with the pack: its files, the Makefile target that re-creates them, whether
    it runs in fp16 (the demos, trained in fp32, overflow it) and the colour fix `color_fix="auto"`
    gives it (the demos shift colours; the wavelet fix was chosen on their validation set)."""

    checkpoint: Path
    prompt_cache: Path
    make_target: str
    fp16_safe: bool = False
    color_fix: str = "wavelet"


def shipped_models() -> dict[str, ShippedModel]:
    """The pack's own models by reference name (`--model NAME`), whether their files are present or not."""
    return {"demo": ShippedModel(DEMO_CHECKPOINT, DEMO_PROMPT_CACHE, "demo-model"),
            "demo-release": ShippedModel(DEMO_RELEASE_CHECKPOINT, DEMO_RELEASE_PROMPT_CACHE, "demo-model-release")}


def shipped_model(ref: str | Path) -> ShippedModel | None:
    """The shipped model `ref` stands for: by its name, or by a path to its folder or weights file."""
    models = shipped_models()
    if str(ref) in models:
        return models[str(ref)]
    try:
        checkpoint = resolve_model(ref).checkpoint.resolve()
    except FileNotFoundError:
        return None
    return next((m for m in models.values() if m.checkpoint.resolve() == checkpoint), None)


def check_dtype(ref: str | Path, dtype: torch.dtype) -> None:
    """ValueError when `ref` stands for a shipped model that overflows fp16 and `dtype` is fp16."""
    shipped = shipped_model(ref)
    if shipped is not None and not shipped.fp16_safe and dtype == torch.float16:
        raise ValueError(f"the {ref} model overflows fp16 (it was trained in fp32, and its activations exceed "
                         f"fp16's 65504): use bf16 or fp32")


def run_step_folder(step: int) -> str:
    """The name of a run's checkpoint folder for `step` (the one `RUN_STEP_DIR` matches)."""
    return f"step_{step:08d}"


def _newest_checkpoint(run: Path) -> Path | None:
    steps = sorted(p for p in (run / RUN_CHECKPOINTS).glob(f"step_*/{RUN_STEP_MODEL}")
                   if RUN_STEP_DIR.match(p.parent.name))
    return steps[-1] if steps else None


def _run_config(folder: Path) -> Path | None:
    """`folder`'s config.json when it is a training run's: any but a JSON object holding none of a run
    config's sections (a diffusers or transformers config.json kept beside the weights, which is left
    alone). A damaged one counts, so that loading names it."""
    config = folder / RUN_CONFIG
    if not config.is_file():
        return None
    try:
        keys = read_json_object(config, "")
    except (OSError, ValueError):
        return config
    return config if any(section in keys for section in RUN_CONFIG_SECTIONS) else None


def _run_of(checkpoint: Path) -> Path | None:
    """The run folder of a run's checkpoint (RUN/checkpoints/step_N/model.safetensors, or
    RUN/model_final.safetensors beside the run's config.json), else None."""
    path = Path(os.path.abspath(checkpoint))  # `..` and `.` folded, symlinks kept
    step = path.parent
    if path.name == RUN_STEP_MODEL and RUN_STEP_DIR.match(step.name) and step.parent.name == RUN_CHECKPOINTS:
        return step.parent.parent
    if path.name == RUN_FINAL and _run_config(path.parent) is not None:
        return path.parent
    return None


def resolve_model(ref: str | Path, given_as: str | None = None) -> ModelFiles:
    """Turn a shipped model's name (`demo`, `demo-release`), a run folder, one of its step folders or a
    checkpoint file into files; FileNotFoundError names what is missing, and the flag or argument
    `given_as` the user gave `ref` with (by default `--model` on the command line, else `model`)."""
    said = f"{given_as or named('--model', 'model')} {ref}"
    shipped = shipped_models().get(str(ref))
    if shipped is not None:
        if not shipped.checkpoint.is_file():
            raise FileNotFoundError(f"the {ref} model is missing from {shipped.checkpoint.parent}; reinstall the "
                                    f"pack or re-create it with `make {shipped.make_target}`")
        return ModelFiles(shipped.checkpoint, shipped.prompt_cache)
    path = Path(ref).expanduser()
    if path.is_dir() and (path / RUN_STEP_MODEL).is_file():
        path = path / RUN_STEP_MODEL  # one step's folder of a run: runs/X/checkpoints/step_N/
    if path.is_file():
        run = _run_of(path)
        return _with_run_files(path, run) if run is not None else ModelFiles(path, _prompt_beside(path))
    if not path.is_dir():
        names = ", ".join(f"'{n}'" for n in shipped_models())
        raise FileNotFoundError(f"{said}: no such file or folder (give {names}, a training run folder, "
                                f"one of its {RUN_CHECKPOINTS}/step_N folders, an exported model folder or a "
                                f"checkpoint file)")
    checkpoint = path / RUN_FINAL if (path / RUN_FINAL).is_file() else _newest_checkpoint(path)
    if checkpoint is not None:
        return _with_run_files(checkpoint, path)
    weights = sorted(p for p in path.glob("*.safetensors") if p.name != RUN_PROMPT_CACHE)
    if len(weights) == 1 and _is_tadisr_checkpoint(weights[0]):  # an exported model (training.export_model)
        return ModelFiles(weights[0], _prompt_beside(weights[0]))
    config = _run_config(path)
    if config is not None:
        raise FileNotFoundError(f"{said}: a training run with no checkpoint yet: its first is saved "
                                f"{_first_checkpoint(config)}, or when the run is stopped (Ctrl-C)")
    found = f" (it holds {len(weights)} .safetensors files: give one)" if len(weights) > 1 else ""
    raise FileNotFoundError(f"{said}: the folder holds neither {RUN_FINAL} nor "
                            f"{RUN_CHECKPOINTS}/step_*/{RUN_STEP_MODEL}, nor one exported model{found}; is it a "
                            f"training run's output_dir?")


def _first_checkpoint(config: Path) -> str:
    """When the run of `config` saves its first checkpoint, from its `train` settings, for a message."""
    try:
        train = read_json_object(config, "")["train"]
        every, last = int(train["checkpoint_every"]), int(train["max_steps"])
    except (OSError, ValueError, TypeError, KeyError):
        return "at a step its train.checkpoint_every sets"
    return f"at step {every} (its train.checkpoint_every)" if 0 < every < last else f"at its end, step {last}"


def _is_tadisr_checkpoint(path: Path) -> bool:
    """Whether a .safetensors file is a native TADiSR checkpoint (by its header's format)."""
    from .checkpoint import NATIVE_FORMAT
    from .streaming import read_header

    try:
        return read_header(path).metadata.get("format") == NATIVE_FORMAT
    except ValueError:
        return False


def _prompt_beside(checkpoint: Path) -> Path | None:
    """The prompt cache kept next to a checkpoint outside a run (an exported model's), if any."""
    prompt = checkpoint.parent / RUN_PROMPT_CACHE
    return prompt if prompt.is_file() else None


def _with_run_files(checkpoint: Path, run: Path) -> ModelFiles:
    """`checkpoint` with what its run folder knows: the prompt cache and the Kolors base of its config."""
    prompt = run / RUN_PROMPT_CACHE
    model_cfg = {}
    config = _run_config(run)
    if config is not None:
        hint = ("the run's config.json says which base and prompt its checkpoints take: restore it from a "
                "copy of the run")
        model_cfg = read_json_object(config, hint).get("model")
        if not isinstance(model_cfg, dict):
            raise ValueError(f"{config}: no 'model' section; {hint}")
        if not prompt.is_file() and model_cfg.get("prompt_cache"):
            prompt = Path(model_cfg["prompt_cache"])
    return ModelFiles(checkpoint, prompt if prompt.is_file() else None, model_cfg.get("kolors_dir"), run,
                      model_cfg.get("unet"), model_cfg.get("vae"), model_cfg.get("init_checkpoint"))


def load_standalone(checkpoint: str | Path | Checkpoint, prompt_cache: str | Path | PromptCache):
    """Build a model from a checkpoint that holds its whole backbone (fp32, CPU, eval mode)."""
    from .loading import warn_of_other_conditioning
    from .model import build_model

    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    if not ckpt.includes_backbone:
        raise CheckpointError(f"{ckpt.path} holds adapters only; it needs the Kolors base weights it was "
                              f"trained on ({base_args()})")
    prompt = prompt_cache if isinstance(prompt_cache, PromptCache) else PromptCache.load(prompt_cache)
    try:
        prompt.check_fits(ckpt.spec.unet.encoder_hid_dim)
    except ValueError as exc:
        raise ValueError(f"{prompt_cache}: {exc}" if not isinstance(prompt_cache, PromptCache) else str(exc)) from None
    warn_of_other_conditioning(ckpt, prompt, prompt_cache, own_cache=True)
    model = build_model(ckpt.spec, prompt=prompt)
    apply_checkpoint(model, ckpt)
    model.weights_id = (source_identity(ckpt.path),)
    return model.eval().requires_grad_(False)


def standalone_prompt(files: ModelFiles, given: str | Path | PromptCache | None = None) -> str | Path | PromptCache:
    """The prompt cache a model that runs alone takes: `given`, else the one kept with it (its run's);
    FileNotFoundError naming both when there is none, rather than Kolors' advice: it needs the one it
    was trained with."""
    prompt = given or files.prompt_cache
    if isinstance(prompt, PromptCache):
        return prompt
    if prompt is None:
        raise FileNotFoundError(f"{files.checkpoint} needs its prompt conditioning: pass "
                                f"{named('--prompt-cache FILE', 'prompt_cache=FILE')} (a training run keeps it as "
                                f"{RUN_PROMPT_CACHE})")
    if not Path(prompt).exists():
        raise FileNotFoundError(f"prompt cache not found: {prompt} ({files.checkpoint} runs alone and takes the "
                                f"prompt cache it was trained with: its run's {RUN_PROMPT_CACHE}"
                                + (f", {files.prompt_cache}; leave out {named('--prompt-cache', 'prompt_cache')} "
                                   f"to use it)"
                                   if files.prompt_cache else ")"))
    return prompt


def runs_alone(ref: str | Path) -> bool:
    """Whether the model `ref` names holds its whole backbone (`backbone=included`), from the file's header."""
    from .streaming import is_safetensors, read_header

    checkpoint = resolve_model(ref).checkpoint
    return is_safetensors(checkpoint) and read_header(checkpoint).metadata.get("backbone") == "included"


def load_model(ref: str | Path, *, kolors_dir: str | Path | None = None, unet: str | Path | None = None,
               vae: str | Path | None = None, text_encoder: str | Path | None = None,
               text_encoder_device_name: str | torch.device = "cpu",
               prompt_cache: str | Path | PromptCache | None = None,
               dtype: str | torch.dtype = torch.float32, device: str | torch.device = "cpu",
               merge_lora_weights: bool = True, offload: str = "none", prompt_once: Callable | None = None):
    """Load the model `ref` names (see the module doc), on `device` in `dtype`; the LoRA is merged
    unless `merge_lora_weights=False`, and `offload` is as in `devices.place_model`.

    A checkpoint of adapters takes its base from `kolors_dir`, `unet`, `vae` and `text_encoder` as
    `loading.load_tadisr` does; without `kolors_dir` its run's recorded base fills in what is not given
    (`model.kolors_dir`, `model.unet`, `model.vae`). One that holds its whole backbone refuses them
    (ValueError), rather than ignoring them. `dtype` and `device` may be names, as in `loading.load_tadisr`,
    and `prompt_once` is as there (one that runs alone reads its prompt cache: no ChatGLM3 to share).
    `prompt_cache` (a path or a `PromptCache`) replaces the conditioning kept with the model; a model that
    runs alone warns when it is not the one it was trained with.
    """
    from .devices import check_offload, place_model, resolve_device, resolve_dtype
    from .lora import merge_lora

    check_offload(offload)
    files = resolve_model(ref)
    shipped = shipped_model(ref)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device, fp16_safe=not runs_alone(ref))  # as the CLI's auto
    check_dtype(ref, dtype)
    prompt = prompt_cache or files.prompt_cache
    ckpt = load_checkpoint(files.checkpoint)
    if ckpt.includes_backbone:
        given = [named(f"--{flag}", arg) for flag, arg, value in (
            ("kolors", "kolors_dir", kolors_dir), ("unet", "unet", unet), ("vae", "vae", vae),
            ("text-encoder", "text_encoder", text_encoder)) if value]
        if given:
            raise ValueError(f"{files.checkpoint} holds its whole backbone and takes no base weights: leave out "
                             + ", ".join(given))
        model = load_standalone(ckpt, standalone_prompt(files, prompt_cache))
        if shipped is not None:
            model.default_color_fix = shipped.color_fix
        if merge_lora_weights:
            merge_lora(model)
        return place_model(model, device, dtype, offload=offload)
    recorded = not kolors_dir and files.run is not None
    if not kolors_dir:  # a given Kolors folder is the whole base; else the run's, with given parts overriding
        kolors_dir, unet, vae = files.kolors, unet or files.unet, vae or files.vae
    if not (kolors_dir or unet or vae):
        raise FileNotFoundError(f"{files.checkpoint} holds adapters only: give the Kolors base it was trained "
                                f"on with {base_args()}")
    from .kolors_files import KolorsFolderError, find_kolors_files
    from .loading import load_tadisr

    try:
        base = find_kolors_files(kolors_dir, unet, vae, dtype)
    except KolorsFolderError as e:
        if not recorded:
            raise
        raise KolorsFolderError(f"{e} (the Kolors base recorded in {files.run / RUN_CONFIG}, whose relative "
                                f"paths are relative to the folder training ran in: run from there, or give "
                                f"{base_args()})") from None
    try:
        return load_tadisr(base, ckpt, prompt, dtype=dtype, device=device, merge_lora_weights=merge_lora_weights,
                           text_encoder=text_encoder, text_encoder_device_name=text_encoder_device_name,
                           offload=offload, prompt_once=prompt_once)
    except BaseMismatchError as e:
        if files.run is None or not _same_paths((kolors_dir, unet, vae), (files.kolors, files.unet, files.vae)):
            raise
        raise BaseMismatchError(_recorded_base_mismatch(files, e.key), e.key) from None


def _same_paths(given: tuple, recorded: tuple) -> bool:
    """Whether two (kolors, unet, vae) triples name the same files or folders (relative ones from here)."""
    def resolved(paths: tuple) -> tuple:
        return tuple(Path(p).expanduser().resolve() if p else None for p in paths)

    return resolved(given) == resolved(recorded)


def _recorded_base_mismatch(files: ModelFiles, key: str) -> str:
    """Why an adapter checkpoint of a run does not fit the very Kolors base its run's config records, and
    what to do (advice to load "the Kolors files it was trained on" would name the same files again)."""
    named = ", ".join(f"model.{k} {v}" for k, v in (("kolors_dir", files.kolors), ("unet", files.unet),
                                                      ("vae", files.vae)) if v)
    head = (f"{files.checkpoint} was trained on another backbone than the Kolors base its run records "
            f"({named}, in {files.run / RUN_CONFIG}): its {key} does not match. ")
    if files.init_checkpoint:
        return head + (f"That backbone came from the run's model.init_checkpoint ({files.init_checkpoint}), "
                       f"which the version of TADiSR that trained the run did not save in its checkpoints: "
                       f"train the run again with this version, whose checkpoints hold it (and run alone)")
    return head + ("The files there have changed since the run trained: give the Kolors files it was trained on "
                   f"with {base_args()}")
