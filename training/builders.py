"""Building blocks of the trainer: the model from a config, its trainable set, the loss, the data.

Kept apart from the loop in `train.py` so the benchmark and tests can build the same pieces.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from training.config import Config, ConfigError, DataConfig, ModelConfig

# where a config gives ChatGLM3, which computes a missing model.prompt_cache
PROMPT_SOURCE_KEYS = "model.text_encoder (a ChatGLM3 folder or file) or model.kolors_dir"

# scikit-image's bundled sample photos, text-free as used: "skimage" uses the five colour ones,
# "skimage-all" adds the rest (gray ones as RGB).
SKIMAGE_BACKGROUNDS = {
    "skimage": ("astronaut", "coffee", "chelsea", "immunohistochemistry", "hubble_deep_field"),
    "skimage-all": ("astronaut", "coffee", "chelsea", "immunohistochemistry", "hubble_deep_field", "retina",
                    "camera", "brick", "grass", "gravel", "moon", "coins"),
}

# Rows kept of a sample photo that shows text: below row 330 the astronaut wears a mission patch
# ("COLLINS ASHBY ...") and a name tag, which synthesis would teach as background.
SKIMAGE_TEXT_FREE_ROWS = {"astronaut": 330}


# -- model --------------------------------------------------------------------------------------
def _customise_spec(spec, cfg: Config, checkpoint: str | None = None):
    """`spec` with the config's model choices (ranks, mask input, skip convs). When `spec` is the one of
    the checkpoint a run starts from (`checkpoint` names it), a choice that would change its tensors' shapes
    is a ConfigError naming the key and the checkpoint's value, not a list of shape mismatches."""
    m = cfg.model
    mask_input = "mid-block" if cfg.ablation.no_taca else m.mask_input
    if checkpoint is not None:
        chosen = {"model.unet_rank": (m.unet_rank, spec.unet_lora.rank),
                  "model.vae_rank": (m.vae_rank, spec.vae_lora.rank),
                  "model.mask_input" + (" (ablation.no_taca)" if cfg.ablation.no_taca else ""):
                      (mask_input, spec.mask_input),
                  "model.skip_convs": (m.skip_convs, spec.skip_convs)}
        clashes = [f"{key} = {json.dumps(want)} but it has {json.dumps(has)}" for key, (want, has) in chosen.items()
                   if want is not None and want != has]
        if clashes:
            raise ConfigError(f"model.init_checkpoint {checkpoint} does not fit this config: {'; '.join(clashes)}. "
                              f"Set those keys to the checkpoint's values (the ranks and mask_input may be left "
                              f"out), or take only some of its parts with model.init_parts")
        return spec
    if m.unet_rank is not None or m.vae_rank is not None:
        spec = spec.with_ranks(m.unet_rank or spec.unet_lora.rank, m.vae_rank or spec.vae_lora.rank)
    if mask_input is not None:
        spec = dataclasses.replace(spec, mask_input=mask_input)
    return dataclasses.replace(spec, skip_convs=m.skip_convs)


def materialise_random_(model: nn.Module, device: str | torch.device, seed: int = 0) -> nn.Module:
    """Move a meta-device model to `device` with random weights (benchmarks: no CPU copy is made).

    Matrices and kernels get N(0, 0.02), 1-D weights (norm scales) 1, biases 0, LoRA B 0.
    """
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters(remove_duplicate=True):
            if ".lora_B." in name:
                p.zero_()
            elif p.ndim >= 2:
                p.normal_(0.0, 0.02, generator=g)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    return model


def base_files(m: ModelConfig):
    """The Kolors files a model config names (`tadisr_core.kolors_files.KolorsFiles`), None for a random base.

    `model.unet` / `model.vae` (a file or a folder) override the parts of `model.kolors_dir`, as the
    CLI's --unet / --vae override --kolors. ConfigError names the missing file or folder.
    """
    if not m.has_base:
        return None
    from tadisr_core.kolors_files import KolorsFolderError, find_kolors_files
    from tadisr_core.wording import command_line

    try:
        with command_line():  # its words are the flags, named below as the config's keys
            return find_kolors_files(m.kolors_dir, m.unet, m.vae)
    except KolorsFolderError as e:
        raise ConfigError(f"the Kolors base (model.kolors_dir, model.unet, model.vae): {e} (in a training config "
                          f"--kolors, --unet and --vae are model.kolors_dir, model.unet and model.vae)") from None


def init_checkpoint_file(m: ModelConfig) -> Path | None:
    """The file `model.init_checkpoint` names (None when unset): a shipped model by its `--model` name
    (`demo`, `demo-release`, found by `tadisr_core.model_ref.resolve_model` wherever the pack is
    installed), else the path as given. A shipped model whose file is missing is a FileNotFoundError
    saying how to restore it."""
    from tadisr_core.model_ref import resolve_model, shipped_models

    if not m.init_checkpoint:
        return None
    if m.init_checkpoint in shipped_models():
        return resolve_model(m.init_checkpoint, given_as="model.init_checkpoint").checkpoint
    return Path(m.init_checkpoint)


def build_model_from_config(cfg: Config, device: str | torch.device = "cpu",
                            log: Callable[[str], None] = print):
    """The TADiSR model a config describes, fp32, before any trainable/frozen split.

    - a Kolors base (`model.kolors_dir`, `model.unet`, `model.vae`; see `base_files`): its UNet and VAE
      weights, the prompt cache from `model.prompt_cache` (computed with ChatGLM3, from
      `model.text_encoder` or the Kolors folder, when the file is missing; unset, the one kept in the
      user's cache folder, `prompt_store.kept_prompt`);
    - otherwise random weights of the tiny or full spec and a random prompt (tests, benchmarks);
      a full random model on CUDA is built on the meta device and materialised there.
    `model.init_checkpoint` (release .pkl, native .safetensors, or a shipped model's name:
    `init_checkpoint_file`) is applied on top; its spec (variant, ranks, mask input, skip convs) is the
    model's, and a `model.variant`, rank, mask input or skip-conv setting that differs from it is an error;
    with `model.init_parts` the config defines the model, only those parts are taken (they must fit)
    and `log` is told what kept its initialisation.
    """
    from tadisr_core.checkpoint import GROUPS, apply_checkpoint, load_checkpoint
    from tadisr_core.model import TADiSRModel, build_model, random_prompt
    from tadisr_core.spec import spec_for_size

    m = cfg.model
    try:
        init = init_checkpoint_file(m)
        ckpt = load_checkpoint(init) if init is not None else None
    except OSError as e:  # not found, a folder, unreadable: the message names the file
        raise ConfigError(f"model.init_checkpoint: {e}") from None
    if ckpt is not None and ckpt.spec.variant != m.variant and m.init_parts is None:
        raise ConfigError(f"model.variant = {m.variant!r} but {m.init_checkpoint} is a {ckpt.spec.variant!r} "
                          f"checkpoint; set model.variant: {ckpt.spec.variant} (or model.init_parts: [unet, vae] "
                          f"to start a {m.variant!r} model from its backbone)")
    # With init_parts the config's variant and size define the model and the checkpoint only fills it.
    spec_from_ckpt = ckpt is not None and m.init_parts is None
    files = base_files(m)
    if files is not None:
        from tadisr_core.backbone import check_backbone, load_unet, load_vae
        from tadisr_core.loading import ensure_prompt_cache
        from tadisr_core.prompt_store import kept_prompt
        from tadisr_core.spec import HEATMAP_PROMPT, SDXL_TIME_IDS

        base = ckpt.spec if spec_from_ckpt else spec_for_size("full", m.variant)
        chatglm = m.text_encoder or m.kolors_dir
        if m.prompt_cache and not chatglm and not Path(m.prompt_cache).is_file():
            raise ConfigError(f"model.prompt_cache not found: {m.prompt_cache}; give an existing prompt cache, or "
                              f"{PROMPT_SOURCE_KEYS} to compute it there")
        prompt = (ensure_prompt_cache(m.prompt_cache, chatglm, given_as=("model.prompt_cache", PROMPT_SOURCE_KEYS))
                  if m.prompt_cache
                  else kept_prompt(chatglm, HEATMAP_PROMPT, SDXL_TIME_IDS, torch.device("cpu"), "model.prompt_cache"))
        unet, vae = check_backbone(files)  # headers only: a wrong file is named before anything is built
        spec = dataclasses.replace(base, unet=unet.spec, vae=vae.spec,
                                   prompt_tokens=prompt.prompt_embeds.shape[1],
                                   text_hidden=prompt.prompt_embeds.shape[2])
        spec = _customise_spec(spec, cfg, m.init_checkpoint if spec_from_ckpt else None)
        torch.manual_seed(m.init_seed)
        model = TADiSRModel(spec, load_unet(files, checked=unet), load_vae(files, checked=vae), prompt)
    else:
        base = ckpt.spec if spec_from_ckpt else spec_for_size(m.size, m.variant)
        spec = _customise_spec(base, cfg, m.init_checkpoint if spec_from_ckpt else None)
        if torch.device(device).type == "cuda" and m.size == "full":
            model = build_model(spec, device="meta")
            materialise_random_(model, device, m.init_seed)
            model.set_prompt(random_prompt(spec))
        else:
            model = build_model(spec, prompt=random_prompt(spec), seed=m.init_seed)
    if ckpt is not None:
        apply_checkpoint(model, ckpt, m.init_parts)
        if m.init_parts is not None:
            kept = [g for g in GROUPS if g not in m.init_parts]
            log(f"model.init_parts: took {', '.join(m.init_parts)} from {m.init_checkpoint}; kept their "
                f"initialisation: {', '.join(kept) or 'nothing'}")
    return model


def backbone_from_init_checkpoint(m: ModelConfig) -> bool:
    """Whether `model.init_checkpoint` gives the model backbone weights that no Kolors files hold: a
    checkpoint holding its whole backbone, taken (`model.init_parts`) for the UNet or the VAE. Such a run
    saves the whole backbone (`ModelConfig.saves_backbone`), so its checkpoints run and resume alone."""
    from tadisr_core.checkpoint import GROUPS, file_includes_backbone

    if not m.init_checkpoint or not {"unet", "vae"} & set(m.init_parts or GROUPS):
        return False
    return file_includes_backbone(init_checkpoint_file(m))


def configure_trainable(model, no_jsd: bool = False, backbone: bool = False) -> list[tuple[str, nn.Parameter]]:
    """Freeze everything, then unfreeze what TADiSR trains; returns (name, parameter) in a fixed order.

    Trained: UNet LoRA + unet.conv_in, VAE LoRA (+ skip-conv base weights), the whole mask decoder
    (`mi_decoder`, including W_a); with `backbone` every UNet and VAE weight as well (a model with
    no pretrained prior, such as the demo). With `no_jsd` the mask decoder stays frozen and the
    interaction blocks' image-side scales are zeroed, so the image stream is the plain (LoRA) VAE decoder.
    """
    model.requires_grad_(False)  # peft creates its LoRA tensors with requires_grad=True
    for name, p in model.unet.named_parameters():
        p.requires_grad_(backbone or "lora_" in name or name.startswith("conv_in."))
    for name, p in model.vae.named_parameters():
        p.requires_grad_(backbone or "lora_" in name or "skip_conv_" in name)
    if no_jsd:
        with torch.no_grad():
            for name, p in model.mi_decoder.named_parameters():
                if name.endswith(".a_l") or name.endswith(".b_l"):
                    p.zero_()
    else:
        model.mi_decoder.requires_grad_(True)
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def cast_frozen_(model: nn.Module, dtype: torch.dtype, keep_fp32: tuple[nn.Module, ...] = ()) -> None:
    """Store frozen weights in `dtype` (trainable ones stay fp32 for the optimiser)."""
    keep = {id(p) for mod in keep_fp32 for p in mod.parameters()}
    for p in model.parameters():
        if not p.requires_grad and id(p) not in keep and p.is_floating_point():
            p.data = p.data.to(dtype)


def _checkpointed(forward):
    from torch.utils.checkpoint import checkpoint

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)
    return run


def enable_gradient_checkpointing(model) -> None:
    """Checkpoint the UNet (diffusers) and, per block, the VAE encoder/decoder and the mask decoder.

    The VAE blocks are walked one by one by `TADiSRModel.encode/decode`, so diffusers' own VAE
    switch would not apply; their `forward` is wrapped per instance (state-dict keys unchanged).
    The UNet's recomputation repeats TACA's capture ops when the forward captured (see
    `AttentionStore.checkpoint_contexts`).
    """
    from torch.utils.checkpoint import checkpoint

    model.unet.enable_gradient_checkpointing(functools.partial(
        checkpoint, use_reentrant=False, context_fn=model.attention_store.checkpoint_contexts))
    blocks = [*model.vae.encoder.down_blocks, model.vae.encoder.mid_block, model.vae.decoder.mid_block,
              *model.vae.decoder.up_blocks, *model.mi_decoder.up_blocks, *model.mi_decoder.interaction_blocks]
    for block in blocks:
        if not getattr(block, "_tadisr_checkpointed", False):
            block.forward = _checkpointed(block.forward)
            block._tadisr_checkpointed = True


class TrainingForward(nn.Module):
    """encode -> denoise -> decode as one forward, so DDP/FSDP wrappers see (and sync) the whole step.

    With `full_precision_vae` (fp16 training) the encoder and decoders run in fp32 even inside the fp16
    autocast that wraps the step: the SDXL VAE's activations overflow fp16. The UNet stays in fp16."""

    def __init__(self, model, full_precision_vae: bool = False):
        super().__init__()
        self.model = model
        self.full_precision_vae = full_precision_vae

    def forward(self, lr_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vae = torch.autocast(lr_up.device.type, enabled=False) if self.full_precision_vae else contextlib.nullcontext()
        with vae:
            enc = self.model.encode(lr_up)
        den = self.model.denoise(enc.latents)
        latents, attention = den.latents, den.attention
        if self.full_precision_vae:  # the UNet's fp16 outputs, for decoders that run in fp32
            latents, attention = latents.float(), attention.float() if attention is not None else None
        with vae:
            dec = self.model.decode(latents, enc.skips, attention)
        return dec.image, dec.mask_logits


# -- loss ---------------------------------------------------------------------------------------
def loss_settings_of(cfg: Config):
    """The LossSettings a config describes: its `loss.preset` with the `loss` overrides, `ablation.no_mfl`
    and `loss.lpips_net: none` applied (`ablation.no_jsd` is applied by TADiSRLoss itself)."""
    from training.losses import TERMS, loss_settings

    lc = cfg.loss
    overrides = {k: getattr(lc, k) for k in (*TERMS, "lpips_net", "mfl_gamma", "mfl_detach_weight", "focal_alpha",
                                              "focal_gamma", "dice_smooth")}
    if cfg.ablation.no_mfl:
        overrides["mfl"] = 0.0
    settings = loss_settings(lc.preset, **overrides)
    if settings.lpips_net == "none":
        if lc.lpips not in (None, 0.0):
            raise ConfigError(f"loss.lpips = {lc.lpips} but loss.lpips_net = none: set one of them differently")
        settings = dataclasses.replace(settings, weights=dataclasses.replace(settings.weights, lpips=0.0))
    return settings


def check_loss_has_masks(cfg: Config) -> None:
    """ConfigError when the data has no text masks (`data.mask_dir: null`) but a loss term reads them:
    all-zero masks would teach the model that no image holds text."""
    from training.losses import GT_MASK_TERMS, MASK_TERMS

    if cfg.data.mask_dir is not None:
        return
    weights = loss_settings_of(cfg).weights
    dropped = (*MASK_TERMS, "mfl") if cfg.ablation.no_jsd else ()  # as TADiSRLoss(use_mask=False)
    on = [t for t in GT_MASK_TERMS if getattr(weights, t) and t not in dropped]
    if on:
        zeros = " ".join(f"--set loss.{t}=0" for t in on)
        raise ConfigError(f"data.mask_dir = null (a set without text masks), but the loss terms {', '.join(on)} "
                          f"read the text mask (loss.preset = {cfg.loss.preset}): set them to 0 ({zeros}) or "
                          f"name the mask folder")


def build_loss(cfg: Config, device: str | torch.device = "cpu"):
    """The TADiSRLoss a config describes (LPIPS loaded from `loss.lpips_weights` / the default dir)."""
    from training.losses import TADiSRLoss

    settings = loss_settings_of(cfg)
    lpips = None
    if settings.weights.lpips:  # 0 with loss.lpips_net: none
        from training.lpips import LPIPS

        lpips = LPIPS(settings.lpips_net, cfg.loss.lpips_weights, given_as="loss.lpips_weights",
                      instead="set loss.lpips_net: none").to(device)
    ocr_features = None
    if settings.weights.ocr:
        from training.ocr_features import RecognizerFeatures

        ocr_features = RecognizerFeatures()
    return TADiSRLoss(settings, lpips, use_mask=not cfg.ablation.no_jsd, ocr_features=ocr_features).to(device)


# -- optimiser ----------------------------------------------------------------------------------
def build_optimizer(cfg: Config, params: list[nn.Parameter]) -> torch.optim.AdamW:
    """AdamW with the config's `optim` settings, in torch's fused form: the same update as the
    per-tensor loop to float rounding, and much faster on the thousands of small LoRA tensors (demo
    spec, 3948 tensors, one CPU thread: 0.27 -> 0.06 s a step; `benchmarks/bench_optimizer_step.py`)."""
    o = cfg.optim
    return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps, fused=True)


# -- data ---------------------------------------------------------------------------------------
def write_backgrounds(kind: str, folder: Path, max_side: int, seed: int) -> Path:
    """Text-free backgrounds for synthesis: scikit-image's sample photos or smooth random fields.

    A folder written before is reused only when it was written for the same kind, size and seed;
    otherwise its images are replaced.
    """
    from PIL import Image

    from tadisr_core.files import atomic_path

    recipe = {"kind": kind, "max_side": max_side, "seed": seed, "rows_kept": SKIMAGE_TEXT_FREE_ROWS}
    done = folder / "COMPLETE"
    if done.is_file():
        text = done.read_text()
        try:
            record = json.loads(text)
        except ValueError:
            record = {"images": text.split()}  # written before the recipe was recorded: names only
        if {k: record.get(k) for k in recipe} == recipe:
            return folder
        for name in record.get("images", []):
            (folder / f"{name}.png").unlink(missing_ok=True)
        done.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    if kind in SKIMAGE_BACKGROUNDS:
        try:
            import skimage.data
        except ImportError:
            raise ConfigError(f"data.backgrounds = {kind} needs scikit-image (pip install scikit-image); "
                              "or use data.backgrounds = procedural, or a folder of photos") from None
        images = {name: getattr(skimage.data, name)() for name in SKIMAGE_BACKGROUNDS[kind]}
        images = {name: np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img for name, img in images.items()}
        images = {name: img[:SKIMAGE_TEXT_FREE_ROWS.get(name)] for name, img in images.items()}
    else:
        rng = np.random.default_rng(seed)
        images = {}
        for i in range(6):
            coarse = rng.integers(0, 256, (4 + i, 4 + i, 3), dtype=np.uint8)
            field = np.asarray(Image.fromarray(coarse).resize((max_side, max_side), Image.BICUBIC), np.float32)
            images[f"field_{i}"] = np.clip(field + rng.normal(0, 6, field.shape), 0, 255).astype(np.uint8)
    for name, img in images.items():
        im = Image.fromarray(img[..., :3])
        im.thumbnail((max_side, max_side), Image.LANCZOS)  # small files: synthesis decodes one per sample
        with atomic_path(folder / f"{name}.png") as tmp:
            im.save(tmp, format="PNG")
    done.write_text(json.dumps({**recipe, "images": sorted(images)}) + "\n")
    return folder


def degradation_preset(cfg: Config):
    """The configured degradation preset with `data.usm_gt` / `data.jpeg_codec` applied."""
    from training.data.degradation import get_preset

    d, preset = cfg.data, get_preset(cfg.data.degradation)
    changes = {k: v for k, v in (("usm_gt", d.usm_gt), ("jpeg_codec", d.jpeg_codec)) if v is not None}
    return dataclasses.replace(preset, **changes) if changes else preset


def build_datasets(cfg: Config, work_dir: str | Path,
                   log: Callable[[str], None] | None = print) -> tuple[Dataset, Dataset | None]:
    """(train, val) datasets; val is None when the config names no validation data. `log` is told of
    synthesis backgrounds smaller than the crop (they are upscaled, blurring the ground truth) and of
    triplet folders without LR images (degraded on the fly: with which preset); None skips both."""
    from training.data.datasets import OnTheFlySynthesisDataset, RealCEDataset, TripletFolderDataset, named_by_key

    d = cfg.data
    preset = degradation_preset(cfg)
    if d.kind == "synth":
        bg = d.backgrounds or "skimage"
        if bg in (*SKIMAGE_BACKGROUNDS, "procedural"):
            bg = write_backgrounds(bg, Path(work_dir) / f"backgrounds_{bg}", max(4 * (d.crop or 512), 256),
                                    cfg.train.seed)
        from training.data.synthesis import SynthesisConfig, small_backgrounds, small_backgrounds_warning

        def synthesis(size: int, length: int, seed: int) -> OnTheFlySynthesisDataset:
            synth = SynthesisConfig(size=size, scale=d.scale,
                                    **({"font_scale": tuple(d.font_scale)} if d.font_scale else {}))
            return OnTheFlySynthesisDataset(backgrounds=bg, fonts=d.fonts, text_crops=d.text_crops, length=length,
                                            size=size, scale=d.scale, preset=preset, seed=seed, config=synth)

        crops = {"data.crop": d.crop or 512, "data.val_crop": d.val_crop or d.crop or 512}
        train = synthesis(crops["data.crop"], d.length, cfg.train.seed)
        val = synthesis(crops["data.val_crop"], d.val_size, cfg.train.seed + 7919) if d.val_size else None
        for key, size in crops.items():
            if log is None or (key == "data.val_crop" and (val is None or size <= crops["data.crop"])):
                continue  # a validation canvas no larger than the training one: said for data.crop, if at all
            if small := small_backgrounds(train.synth.backgrounds, size):
                log(f"warning: {small_backgrounds_warning(small, len(train.synth.backgrounds), size, key)}")
        return train, val
    if d.kind == "triplets":
        dirs = dict(hr_dir=d.hr_dir, lr_dir=d.lr_dir, mask_dir=d.mask_dir)
        train = TripletFolderDataset(d.root, crop=d.crop, scale=d.scale, preset=preset, **dirs)
        val = (named_by_key(lambda root: TripletFolderDataset(root, crop=d.val_crop, scale=d.scale, preset=preset,
                                                              **dirs), d.val_root, "data.val_root")
               if d.val_root else None)
        if log is not None:
            for note in dict.fromkeys(ds.degradation_note() for ds in (train, val) if ds is not None):
                if note:
                    log(note)
            _warn_of_unused_degradation_keys(d, [ds.root for ds in (train, val)
                                                 if ds is not None and ds.degradation_note() is None], log)
        return train, val
    train = RealCEDataset(d.root, d.list_file, crop=d.crop, scale=d.scale, **realce_dirs(d))
    val = (RealCEDataset(d.root, d.val_list_file, crop=d.val_crop, scale=d.scale, **realce_dirs(d))
           if d.val_list_file else None)
    if log is not None:
        _warn_of_unused_degradation_keys(d, [d.root], log, how_to_use="")
    return train, val


def _warn_of_unused_degradation_keys(d: DataConfig, lr_read_from: list, log: Callable[[str], None],
                                     how_to_use: str = " (set data.lr_dir: null to degrade them)") -> None:
    """Say that `data.usm_gt` / `data.jpeg_codec`, when set, change nothing for data whose LR images are
    read from a folder (`lr_read_from`: those sets' roots): both act on the on-the-fly degradation."""
    keys = [f"data.{k}" for k in ("usm_gt", "jpeg_codec") if getattr(d, k) is not None]
    for root in dict.fromkeys(str(r) for r in lr_read_from) if keys else ():
        log(f"warning: {' and '.join(keys)} {'have' if len(keys) > 1 else 'has'} no effect on {root}: its LR "
            f"images are read from a folder, not degraded from the HR{how_to_use}")


def realce_dirs(d: DataConfig) -> dict[str, str | None]:
    """The Real-CE folders `data` names (hr_dir, lr_dir, mask_dir), as RealCEDataset arguments. A key at
    its default, the triplets' folder name (hr, lr, mask), names that folder when `data.root` has it, and
    is otherwise left out, so that Real-CE's own folder is read."""
    default = DataConfig()
    return {key: getattr(d, key) for key in ("hr_dir", "lr_dir", "mask_dir")
            if getattr(d, key) != getattr(default, key) or (Path(d.root) / getattr(d, key)).is_dir()}


class SeededItems(Dataset):
    """Makes item (epoch, index) a pure function of (seed, epoch, index), in any worker.

    The wrapped dataset's own randomness (crops, on-the-fly degradation) draws from torch's global
    RNG, which is forked and seeded per item here; datasets with `set_epoch` get the epoch too.
    This is what lets `--resume` reproduce an uninterrupted run exactly.
    """

    def __init__(self, inner: Dataset, seed: int):
        self.inner, self.seed = inner, seed

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, key) -> dict:
        from training.data.synthesis import sample_seed

        epoch, index = key if isinstance(key, tuple) else (0, key)
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index) % (2**63))
            return self.inner[index]


class StepBatchSampler:
    """Endless per-rank micro-batches of (epoch, index) keys, starting at micro-batch `start`.

    Each epoch is a seeded permutation; global micro-batch k takes `batch_size * world` consecutive
    indices of it, rank r the r-th slice. The tail of an epoch that fills no global batch is dropped.
    """

    def __init__(self, n: int, batch_size: int, world: int = 1, rank: int = 0, seed: int = 0, start: int = 0):
        self.n, self.batch_size, self.world, self.rank, self.seed, self.start = n, batch_size, world, rank, seed, start
        self.per_epoch = n // (batch_size * world)
        if self.per_epoch == 0:
            raise ValueError(f"the dataset has {n} items, fewer than one global batch "
                             f"({batch_size} per process x {world} processes)")

    def _perm(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self):
        k, cached = self.start, (None, None)
        while True:
            epoch, j = divmod(k, self.per_epoch)
            if cached[0] != epoch:
                cached = (epoch, self._perm(epoch))
            base = (j * self.world + self.rank) * self.batch_size
            yield [(epoch, i) for i in cached[1][base:base + self.batch_size]]
            k += 1
