"""Training configuration: one dataclass tree, loaded from YAML, with command-line overrides.

    cfg = load_config("training/configs/tiny.yaml", overrides=["train.max_steps=10", "optim.lr=1e-4"])
    cfg = load_config("tiny")   # a shipped config by name (training/configs/, installed with the package)

Unknown keys are errors naming the key and the file. Relative paths in the YAML stay relative to
the working directory (as BasicSR does); ``~`` and ``$VARS`` are expanded. `model.init_checkpoint`
also takes a shipped model's name (`demo`, `demo-release`), as `--model` does.
"""
from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# yaml (the `train` extra) is imported where it is used, so that the commands can say it is missing


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the file and the key."""


@dataclass
class ModelConfig:
    """Which model to train and where its weights come from."""

    variant: str = "paper"                  # paper | release (old spelling: official-kolors)
    size: str = "tiny"                      # tiny | demo | full (only used without a base: random weights)
    train_backbone: bool = False            # train every UNet/VAE weight too (saved inside the checkpoint,
                                            # as is a random base that no Kolors files hold, e.g. tiny's)
    kolors_dir: str | None = None           # Kolors diffusers folder with the base UNet/VAE weights
    unet: str | None = None                 # Kolors UNet file or folder (overrides kolors_dir's unet/)
    vae: str | None = None                  # SDXL VAE file or folder (overrides kolors_dir's vae/, which
                                            # kijai's KwaiKolorsWrapper folder lacks)
    text_encoder: str | None = None         # ChatGLM3 folder or file for a missing prompt_cache (else kolors_dir's)
    init_checkpoint: str | None = None      # TADiSR checkpoint (.safetensors or the release .pkl) to start from,
                                            # or a shipped model's name: demo, demo-release (as --model takes)
    init_parts: list[str] | None = None     # take only these parts of init_checkpoint (unet, vae, mi_decoder),
                                            # e.g. another variant's backbone; None: all of it
    prompt_cache: str | None = None         # prompt cache file; computed with Kolors' ChatGLM3 when absent;
                                            # unset: kept in ~/.cache/tadisr/prompt (TADISR_PROMPT_CACHE_DIR)
    unet_rank: int | None = None            # None: the variant's default (4)
    vae_rank: int | None = None             # None: the variant's default (2)
    mask_input: str | None = None           # attention | mid-block; None: the variant's default
    skip_convs: bool = True
    init_seed: int = 0                      # seed of the random initialisation (LoRA A, decoders, tiny backbone)

    @property
    def has_base(self) -> bool:
        """Whether the backbone comes from Kolors files (kolors_dir, unet, vae) rather than random weights."""
        return bool(self.kolors_dir or self.unet or self.vae)

    @property
    def saves_backbone(self) -> bool:
        """Whether the run's checkpoints hold every UNet and VAE weight: trained ones, or a base that no Kolors
        files hold (random, or taken from init_checkpoint: `training.builders.backbone_from_init_checkpoint`,
        which reads that file's header), without which its checkpoints could not run."""
        from training.builders import backbone_from_init_checkpoint

        return self.train_backbone or not self.has_base or backbone_from_init_checkpoint(self)


@dataclass
class DataConfig:
    """Training and validation data. Items are dicts (lr, hr, mask, name)."""

    kind: str = "synth"                     # synth | triplets | realce
    root: str | None = None                 # triplets: folder with hr/ mask/ [lr/]; realce: dataset root
    hr_dir: str = "hr"                      # the folder names under root. triplets (the authors' FTSR: gt,
    lr_dir: str | None = "lr"               # sr_bicubic, mask): LR files at 1/scale of the HR, or at the HR
    mask_dir: str | None = "mask"           # size (an upscaled LR such as sr_bicubic: the model's input);
                                            # lr_dir null (or the default lr/ absent): LR degraded on the fly.
                                            # realce: these defaults read Real-CE's 52mm_aligned_1024,
                                            # 13mm_aligned_1024, mask-52mm-bts-1024-v2 (or hr/, lr/, mask/
                                            # where root has such a folder); mask_dir null reads a
                                            # set without its text masks, trained by the loss terms that read
                                            # no mask: mse, lpips
    list_file: str | None = None            # realce: training list
    backgrounds: str | None = "skimage"     # synth: a folder of text-free images, or built-in samples:
                                            # "skimage" (5 photos) / "skimage-all" (12)
    fonts: str | None = None                # synth: a font folder; None: system fonts
    text_crops: str | None = None           # synth: TextSeg/BTS/CTR-layout folder of text crops
    length: int = 1000                      # synth: samples per epoch
    crop: int | None = 512                  # HR crop (synth: canvas size); None: whole images (synth: 512)
    font_scale: tuple[float, float] | None = None  # synth: font size / canvas side; None: (0.04, 0.16)
    scale: int = 4
    degradation: str = "ftsr"               # ftsr | realesrgan | realesrgan-mild | bicubic (on-the-fly LR)
    usm_gt: bool | None = None              # sharpen the GT as Real-ESRGAN does (None: the preset's choice)
    jpeg_codec: str | None = None           # kornia (fast) | libjpeg (exact); None: the preset's choice
    val_root: str | None = None             # triplets: validation folder; None: no validation for triplets
    val_list_file: str | None = None        # realce: validation list
    val_size: int = 4                       # validation items used
    val_crop: int | None = None             # validation HR crop (synth: canvas size); None: whole images
                                            # (synth: `crop`, else 512)


@dataclass
class LossConfig:
    """Loss preset plus per-term overrides (None keeps the preset's value)."""

    preset: str = "paper"                   # paper | release
    mse: float | None = None
    lpips: float | None = None
    mfl: float | None = None
    ocr: float | None = None                # legibility: PP-OCR recogniser features on the text (off)
    mask_mse: float | None = None
    mask_focal: float | None = None
    mask_dice: float | None = None
    lpips_net: str | None = None            # alex | vgg | none (none: no LPIPS term; must be explicit)
    lpips_weights: str | None = None        # folder or file of converted LPIPS weights; None: default dir
    mfl_gamma: float | None = None
    mfl_detach_weight: bool | None = None   # true: the MFL does not train the mask stream
    focal_alpha: float | None = None        # weight of the text class in [0, 1]; -1: none (the reproduction's)
    focal_gamma: float | None = None
    dice_smooth: float | None = None


@dataclass
class OptimConfig:
    """AdamW (torch's fused form, `builders.build_optimizer`): linear warm-up, then a constant or cosine rate."""

    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    decay: str = "constant"                 # constant | cosine (towards 5 % of lr, which the update after
                                            # the last would take: diffusers' count; the last is a hair above)


@dataclass
class TrainConfig:
    """The loop: steps, batches, precision, logging, checkpoints, validation."""

    output_dir: str = "runs/default"
    max_steps: int = 1000
    batch_size: int = 1                     # per process
    grad_accum: int = 1
    mixed_precision: str = "no"             # no | bf16 | fp16
    gradient_checkpointing: bool = False
    seed: int = 0                           # data order and sampling
    log_every: int = 1                      # progress-bar refresh (metrics.jsonl gets every step)
    checkpoint_every: int = 500
    keep_checkpoints: int = 3               # newest N kept (0: keep all)
    validate_every: int = 0                 # 0: never
    num_workers: int = 0
    max_nonfinite: int = 20                 # skipped non-finite steps tolerated before aborting
    max_bad_samples: int = 100              # different damaged samples skipped (and logged) before aborting
    weight_digest: bool = False             # write a per-rank digest of the trainable weights at the end
    inject_nonfinite_at: list[int] = field(default_factory=list)  # testing aid: steps whose loss is made NaN


@dataclass
class AblationConfig:
    """Paper ablations: no joint segmentation decoders, no TACA, no modified focal loss."""

    no_jsd: bool = False                    # mask losses off, mask stream frozen and unused
    no_taca: bool = False                   # mask stream from mid-block features instead of attention
    no_mfl: bool = False                    # MFL weight 0


@dataclass
class Config:
    """The whole training configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)

    def to_dict(self) -> dict:
        """Plain nested dict (tuples as lists), e.g. for YAML/JSON dumps."""
        return _plain(dataclasses.asdict(self))

    def validate(self, source: str = "<config>") -> "Config":
        """Check enumerations and ranges; raises ConfigError naming the key."""
        if self.model.variant == "official-kolors":  # the old spelling of "release"
            self.model.variant = "release"
        choices = {
            "model.variant": (self.model.variant, ("paper", "release", "official-kolors")),
            "model.size": (self.model.size, ("tiny", "demo", "full")),
            "model.mask_input": (self.model.mask_input, (None, "attention", "mid-block")),
            "data.kind": (self.data.kind, ("synth", "triplets", "realce")),
            "data.degradation": (self.data.degradation, ("ftsr", "realesrgan", "realesrgan-mild", "bicubic")),
            "loss.preset": (self.loss.preset, ("paper", "release")),
            "loss.lpips_net": (self.loss.lpips_net, (None, "alex", "vgg", "none")),
            "train.mixed_precision": (self.train.mixed_precision, ("no", "bf16", "fp16")),
            "optim.decay": (self.optim.decay, ("constant", "cosine")),
            "data.jpeg_codec": (self.data.jpeg_codec, (None, "kornia", "libjpeg")),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ConfigError(f"{source}: {key} = {value!r}; choose one of {[a for a in allowed if a]}")
        self._check_ranges(source)
        for key in ("crop", "val_crop"):
            crop = getattr(self.data, key)
            if crop is not None and crop % (8 * self.data.scale):
                raise ConfigError(f"{source}: data.{key} = {crop} must be a multiple of 8 x data.scale "
                                  f"({8 * self.data.scale}) so the LR crop and the latent grid line up")
        if self.data.kind in ("triplets", "realce") and not self.data.root:
            raise ConfigError(f"{source}: data.root is required for data.kind = {self.data.kind}")
        if self.data.kind == "realce" and not self.data.list_file:
            raise ConfigError(f"{source}: data.list_file is required for data.kind = realce")
        if self.data.lr_dir is None and self.data.kind == "realce":
            raise ConfigError(f"{source}: data.lr_dir = null (LR degraded on the fly) is for data.kind = triplets; "
                              f"data.kind = realce reads its LR folder (by default 13mm_aligned_1024)")
        if self.data.mask_dir is None and self.data.kind != "realce":
            raise ConfigError(f"{source}: data.mask_dir = null (a set without text masks) is for data.kind = "
                              f"realce; data.kind = {self.data.kind} needs its masks")
        parts = self.model.init_parts
        if parts is not None:
            from tadisr_core.checkpoint import GROUPS

            if not self.model.init_checkpoint:
                raise ConfigError(f"{source}: model.init_parts = {parts} needs model.init_checkpoint")
            if not parts or any(p not in GROUPS for p in parts):
                raise ConfigError(f"{source}: model.init_parts = {parts}; choose one or more of {list(GROUPS)}")
        if self.ablation.no_mfl and self.loss.mfl:
            raise ConfigError(f"{source}: ablation.no_mfl turns the modified focal loss off, but loss.mfl = "
                              f"{self.loss.mfl}; drop one of them")
        self._check_base(source)
        return self

    def _check_base(self, source: str) -> None:
        """A base of files without a Kolors folder needs a way to the prompt cache (the files themselves
        are found, or named as missing, by `training.builders.base_files`)."""
        m = self.model
        if m.has_base and not m.kolors_dir:
            if not m.prompt_cache and not m.text_encoder:
                raise ConfigError(f"{source}: a base of model.unet / model.vae files without model.kolors_dir needs "
                                  f"model.prompt_cache (an existing file, or one to compute with "
                                  f"model.text_encoder: a ChatGLM3 folder or file; `python -m tadisr_core "
                                  f"prompt-cache` writes one)")
        if m.size == "full" and not m.has_base and m.init_checkpoint:
            raise ConfigError(f"{source}: model.init_checkpoint needs the base weights (model.kolors_dir, or "
                              f"model.unet and model.vae)")

    def _check_ranges(self, source: str) -> None:
        """Numbers outside their meaningful range: ConfigError naming the field."""
        import math

        m, d, o, t, ls = self.model, self.data, self.optim, self.train, self.loss
        at_least = {  # key: (value, minimum); None values are allowed where the field is optional
            "train.max_steps": (t.max_steps, 1), "train.batch_size": (t.batch_size, 1),
            "train.grad_accum": (t.grad_accum, 1), "data.scale": (d.scale, 1), "data.length": (d.length, 1),
            "data.crop": (d.crop, 8 * d.scale), "data.val_crop": (d.val_crop, 8 * d.scale),
            "data.val_size": (d.val_size, 0), "model.unet_rank": (m.unet_rank, 1), "model.vae_rank": (m.vae_rank, 1),
            "optim.warmup_steps": (o.warmup_steps, 0), "optim.weight_decay": (o.weight_decay, 0),
            "train.log_every": (t.log_every, 1), "train.checkpoint_every": (t.checkpoint_every, 0),
            "train.keep_checkpoints": (t.keep_checkpoints, 0), "train.validate_every": (t.validate_every, 0),
            "train.num_workers": (t.num_workers, 0), "train.max_nonfinite": (t.max_nonfinite, 0),
            "train.max_bad_samples": (t.max_bad_samples, 0), "train.seed": (t.seed, 0),
            **{f"loss.{k}": (getattr(ls, k), 0) for k in ("mse", "lpips", "mfl", "ocr", "mask_mse", "mask_focal",
                                                         "mask_dice", "mfl_gamma", "focal_gamma", "dice_smooth")},
        }
        for key, (value, low) in at_least.items():
            if value is not None and (isinstance(value, float) and not math.isfinite(value) or value < low):
                raise ConfigError(f"{source}: {key} must be >= {low}, got {value}")
        above_zero = {"optim.lr": o.lr, "optim.eps": o.eps, "optim.max_grad_norm": o.max_grad_norm}
        for key, value in above_zero.items():
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{source}: {key} must be a finite number > 0, got {value}")
        for i, beta in enumerate(o.betas):
            if not 0 <= beta < 1:
                raise ConfigError(f"{source}: optim.betas[{i}] must be in [0, 1), got {beta}")
        if ls.focal_alpha is not None and not (0 <= ls.focal_alpha <= 1 or ls.focal_alpha == -1):
            raise ConfigError(f"{source}: loss.focal_alpha must be in [0, 1], or -1 for no class weight, "
                              f"got {ls.focal_alpha}")
        if d.font_scale is not None and (problem := font_scale_problem(d.font_scale)):
            raise ConfigError(f"{source}: data.font_scale {problem}")


def font_scale_problem(font_scale) -> str | None:
    """Why `font_scale` (data.font_scale, tadisr-synthesize's --font-scale) is no range of font sizes, or None."""
    if len(font_scale) == 2 and 0 < font_scale[0] <= font_scale[1]:
        return None
    return f"must be [smallest, largest] font size / canvas side, with 0 < smallest <= largest, got {list(font_scale)}"


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x



def _coerce(value: Any, annotation, where: str, default: Any = None):
    """Coerce a YAML value to a field's annotated type (ints to floats, lists to tuples, strings to numbers:
    `1e3`, which YAML reads as text, is 1000 for an int field). `default`, the field's, is the example a
    wrong list is shown."""
    hints = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, type(int | None)) else ()
    if hints:  # Optional[...]
        if value is None:
            return None
        annotation = next(h for h in hints if h is not type(None))
    origin = typing.get_origin(annotation)
    try:
        if annotation is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            if not isinstance(value, bool):
                raise TypeError
            return value
        if annotation is int:
            whole = f"{where}: {value!r} is not a whole number (e.g. 1000, or 1e3)"
            try:
                number = float(value) if isinstance(value, str) else value
            except ValueError:
                raise ConfigError(whole) from None
            if isinstance(number, bool) or not isinstance(number, (int, float)) or not float(number).is_integer():
                raise ConfigError(whole)
            return int(number)
        if annotation is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if annotation is str:
            if isinstance(value, bool):
                raise ConfigError(f"{where}: YAML reads {value!r} as a boolean here; quote the text (e.g. \"no\")")
            if not isinstance(value, (str, int, float)):
                raise TypeError
            return os.path.expandvars(os.path.expanduser(str(value)))
        if origin is tuple:
            args = typing.get_args(annotation)
            if not isinstance(value, (list, tuple)) or len(value) != len(args):
                example = list(default) if isinstance(default, tuple) else [0.1 * i for i in range(1, len(args) + 1)]
                raise ConfigError(f"{where}: {value!r} is not a list of {len(args)} numbers, e.g. {example}")
            return tuple(_coerce(v, a, where) for v, a in zip(value, args))
        if origin is list:
            (arg,) = typing.get_args(annotation)
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return [_coerce(v, arg, where) for v in value]
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {value!r} is not a valid {getattr(annotation, '__name__', annotation)}") from None
    return value


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _apply(section_obj, values: dict, section: str, source: str) -> None:
    types = _field_types(type(section_obj))
    for key, value in values.items():
        if key not in types:
            raise ConfigError(f"{source}: unknown key '{section}.{key}' (known keys of '{section}': "
                              f"{', '.join(types)})")
        default = getattr(type(section_obj)(), key)
        setattr(section_obj, key, _coerce(value, types[key], f"{source}: {section}.{key}", default))


def config_from_dict(data: dict | None, source: str = "<dict>") -> Config:
    """Build a Config from a nested dict; unknown sections or keys raise ConfigError naming them and `source`."""
    cfg = Config()
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections ({', '.join(SECTIONS)})")
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section '{section}' (known: {', '.join(SECTIONS)})")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{section}' must be a mapping, got {type(values).__name__}")
        _apply(getattr(cfg, section), values, section, source)
    return cfg


def apply_overrides(cfg: Config, overrides: list[str], source: str = "command line") -> Config:
    """Apply ``section.key=value`` strings: values parsed as YAML (``1e-4``, ``true``, ``[1, 2]``, ``null``),
    except for text fields, which take the text as typed (`_text_override`)."""
    import yaml

    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"{source}: override {item!r} is not of the form section.key=value")
        section, name = key.strip().split(".", 1)
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section '{section}' in override {item!r} "
                              f"(known: {', '.join(SECTIONS)})")
        hint = _field_types(type(getattr(cfg, section))).get(name)
        if hint in (str, str | None):
            value = _text_override(raw)
        else:
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError as e:
                raise ConfigError(f"{source}: override {item!r}: the value is not valid YAML ({_yaml_problem(e)})"
                                  ) from None
        _apply(getattr(cfg, section), {name: value}, section, source)
    return cfg


def _yaml_problem(e: Exception) -> str:
    """PyYAML's error in one line: its problem without the multi-line excerpt of the text."""
    return getattr(e, "problem", None) or str(e).splitlines()[0]


def _yaml_place(path: Path, e: Exception) -> str:
    """`path:line:column` of a PyYAML error (1-based), or the path when it has no position."""
    mark = getattr(e, "problem_mark", None)
    return f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)


def _load_yaml_once_each(path: Path) -> Any:
    """The YAML document in `path`, refusing a key given twice in one mapping at any level (PyYAML keeps
    the last one silently: a second `train:` section would replace the first). ConfigError naming the
    file, the key and both lines."""
    import yaml

    loader = yaml.SafeLoader(path.read_text(encoding="utf-8"))
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_keys_once(node, path, (), set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_keys_once(node: Any, path: Path, where: tuple[str, ...], seen: set[int]) -> None:
    """Raise ConfigError for the first key met twice in a mapping under `node` (`where`: the keys above)."""
    import yaml

    if id(node) in seen:  # an alias: its node was checked where it was defined
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_keys_once(item, path, where, seen)
    elif isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            name = str(key.value) if isinstance(key, yaml.ScalarNode) else str(id(key))
            line = key.start_mark.line + 1
            if key.tag != "tag:yaml.org,2002:merge":  # `<<:` merges, however often given
                if (key.tag, name) in first:  # by tag too: `1:` and `'1':` are two keys
                    dotted = ".".join((*where, name))
                    raise ConfigError(f"{path}:{line}: {dotted} is given twice (lines {first[key.tag, name]} and "
                                      f"{line}); keep one of them (the later one would silently replace the earlier)")
                first[key.tag, name] = line
            _check_keys_once(value, path, (*where, name), seen)


YAML_NULLS = ("", "~", "null", "Null", "NULL")


def _text_override(raw: str) -> str | None:
    """A text field's value from the command line: the text as typed, stripped ("/runs/exp #2" keeps its
    " #2", which YAML would read as a comment; "no" stays "no", "[2024] scans" is no list); None for
    YAML's null spellings (and nothing); a quoted YAML scalar without its quotes."""
    import yaml

    text = raw.strip()
    if text in YAML_NULLS:
        return None
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:  # quotes inside, as in 'a' and 'b': the text as typed
            return text
        if isinstance(value, str):
            return value
    return text


CONFIG_DIR = Path(__file__).resolve().parent / "configs"   # the shipped configs (package data)
CONFIG_DIR_IN_REPO = Path("training", "configs")          # how the docs spell their folder


def shipped_configs() -> dict[str, Path]:
    """The configs that ship with the package, by name (`tiny`, `demo`, ...): its own configs/ folder."""
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.yaml"))}


def config_path(given: str | os.PathLike) -> Path:
    """The config file `given` names: the path itself when it is a file; else a shipped config by its name
    (`tiny`, `tiny.yaml`) or as the docs spell it (`training/configs/tiny.yaml`), wherever the package
    is installed. FileNotFoundError listing the shipped names otherwise."""
    path = Path(given)
    if path.is_file():
        return path
    shipped = shipped_configs()
    name = path.name.removesuffix(".yaml")
    if not path.is_file() and path.parent in (Path("."), CONFIG_DIR_IN_REPO) and name in shipped:
        return shipped[name]
    raise FileNotFoundError(f"config file not found: {given}; give a YAML file or a shipped config's name: "
                            f"{', '.join(shipped)}")


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (a file, or a shipped config's name: `config_path`; None: defaults), apply
    overrides, validate."""
    import yaml

    if path is None:
        cfg, source = Config(), "<defaults>"
    else:
        path = config_path(path)
        try:
            data = _load_yaml_once_each(path)
        except yaml.YAMLError as e:
            raise ConfigError(f"{_yaml_place(path, e)}: not valid YAML ({_yaml_problem(e)})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e}); save the config as UTF-8") from None
        if data is None:  # an empty file (or only comments) would train every default: a 512 px synth run
            raise ConfigError(f"{path}: the config is empty; copy a shipped one (training/configs/tiny.yaml) and "
                              f"change what you need")
        cfg, source = config_from_dict(data, str(path)), str(path)
    apply_overrides(cfg, overrides or [])
    try:
        return cfg.validate(source)
    except ConfigError as e:
        problem = str(e).removeprefix(f"{source}: ")
        last = {item.split("=", 1)[0].strip(): item for item in overrides or []}  # the ones that took effect
        for key, item in last.items():
            if problem.startswith((key + " ", key + "[")):  # the value came from the command line
                raise ConfigError(f"command line ({item}): {problem}") from None
        if named := [item for key, item in last.items() if re.search(rf"\b{re.escape(key)}\b", problem)]:
            # a rule between keys that an override broke, e.g. data.crop against --set data.scale
            raise ConfigError(f"{source} with command line ({', '.join(named)}): {problem}") from None
        raise
