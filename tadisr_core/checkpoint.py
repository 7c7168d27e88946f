"""TADiSR checkpoints: safe import of the released pickle, the native safetensors format, a CLI.

Released layout (tadisr_kolors_ftsr_526000.pkl, a zip-based torch.save of a dict):
    state_dict_unet  UNet LoRA (adapter "default") + conv_in        -> model.unet
    state_dict_vae   VAE LoRA (adapter "vae_skip") + skip convs     -> model.vae
    mi_decoder       mask decoder + interaction blocks (or js_decoder) -> model.mi_decoder
    rank_unet, unet_lora_target_modules
Native layout: one safetensors file, keys prefixed `unet.` / `vae.` / `mi_decoder.`, tied
duplicates stored once, and metadata with the spec (variant, ranks, alphas, targets, schedule) and prompt.

CLI (also `tadisr inspect` / `tadisr convert`):
    python -m tadisr_core.checkpoint inspect PATH [--json] [--verify-sha]   (PATH: a file, or what --model takes)
    python -m tadisr_core.checkpoint convert IN OUT.safetensors [--force]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import pickle
import sys
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .files import atomic_path, require_readable, same_file
from .finite import first_problem
from .lora import lora_rank
from .prompt import PromptCache
from .spec import TADiSRSpec, full_spec, size_name, tiny_spec
from .streaming import (
    SAFETENSORS_SUFFIXES,
    TorchFileError,
    is_safetensors,
    load_torch_file,
    unreadable_format,
)
from .wording import command_line

NATIVE_FORMAT = "tadisr/1"
GROUPS = ("unet", "vae", "mi_decoder")
# Published release files: name -> (bytes, sha256) (checkpoints/manifest.json of the release).
MANIFEST = {
    "tadisr_kolors_ftsr_526000.pkl":
        (195_866_454, "4baef8b1fad319caf7d606c82539035c6fc9483c81f94601377c64813251e7f7"),
    "tadisr_cogview4_realce_17500.pkl":
        (785_453_495, "7cec8d0917305037cbafcb1b1bf81062add1613b561f5d7e2d1e599fe0baf5e0"),
}


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model; the message names file and key.

    `part`: set when the file is another of TADiSR's inputs ("unet", "vae", "text-encoder",
    "prompt-cache"; the message says which): each caller words where it goes (`CLI_ADVICE`, the node's)."""

    part: str | None = None


# How the command line takes each of TADiSR's other weight files (`CheckpointError.part`).
CLI_ADVICE = {"unet": "pass it as --unet", "vae": "pass it as --vae",
              "text-encoder": "pass it as --text-encoder, or to `tadisr prompt-cache --kolors`",
              "prompt-cache": "pass it as --prompt-cache"}


class BaseMismatchError(CheckpointError):
    """An adapter checkpoint met another backbone than the one it was trained on (`check_base`); `key`
    names the base tensor that differs."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


@dataclass
class Checkpoint:
    """Trainable tensors of a TADiSR model, grouped, plus the spec they belong to."""

    path: Path
    source: str                                  # "official" or "native"
    spec: TADiSRSpec
    groups: dict[str, dict[str, torch.Tensor]]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def includes_backbone(self) -> bool:
        """Whether every UNet and VAE weight is inside (a model trained whole, such as the demo)."""
        return _backbone_included(self.metadata)


def _backbone_included(metadata: dict[str, str]) -> bool:
    return metadata.get("backbone") == "included"


def file_includes_backbone(path: str | Path) -> bool:
    """`Checkpoint.includes_backbone` of the file at `path`, from a native file's header alone (a release
    .pkl holds the adapters only)."""
    from .streaming import read_header

    return is_safetensors(path) and _backbone_included(read_header(path).metadata)


# -- which tensors a model saves ----------------------------------------------------------------
def _is_saved(group: str, key: str, backbone: bool = False) -> bool:
    if backbone or group == "mi_decoder":
        return True
    if group == "unet":
        return "lora" in key or key.startswith("conv_in.")
    if group == "vae":
        return "lora" in key or "skip_conv" in key
    return True


def trainable_state_dict(model, backbone: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """The tensors a TADiSR checkpoint holds, per group, with the release's key names.

    `backbone`: every UNet and VAE tensor too, not only the adapters (a model trained whole).
    """
    return {g: {k: v for k, v in getattr(model, g).state_dict().items() if _is_saved(g, k, backbone)}
            for g in GROUPS}


# Frozen base tensors (no LoRA target, never trained) whose first values identify the base model.
_BASE_PROBES = {"unet": ("time_embedding.linear_1.weight", "add_embedding.linear_1.weight"),
                "vae": ("quant_conv.weight", "post_quant_conv.weight")}
_PROBE_VALUES = 16
_FP8_RELATIVE, _FP8_ABSOLUTE = 0.13, 1e-3


def base_probe(model) -> dict[str, list[float]]:
    """The first values of a few frozen base tensors: a dtype-tolerant fingerprint of the backbone."""
    probe = {}
    for group, keys in _BASE_PROBES.items():
        sd = getattr(model, group).state_dict()
        for key in keys:
            if key in sd and sd[key].device.type != "meta":
                probe[f"{group}.{key}"] = [round(float(v), 6) for v in sd[key].flatten()[:_PROBE_VALUES].float()]
    return probe


def base_metadata(model, backbone: bool) -> dict[str, str]:
    """Metadata naming the base a checkpoint needs: inside it, or the backbone it was trained on."""
    if backbone:
        return {"backbone": "included"}
    return {"backbone": "external", "base_probe": json.dumps(base_probe(model))}


def check_base(model, ckpt: "Checkpoint") -> None:
    """Refuse an adapter checkpoint applied to another backbone than the one it was trained on."""
    recorded = json.loads(ckpt.metadata.get("base_probe") or "{}")
    found = base_probe(model)
    for key, want in recorded.items():
        have = found.get(key)
        if have is None or len(have) != len(want):
            continue
        # fp8 storage of the same base (a user's fp8 or scaled fp8 Kolors file) rounds each value by up to
        # 1/16 (e4m3) or 1/8 (e5m2) of itself, or 2^-10 below e4m3's normal range; another base misses that.
        if any(abs(a - b) > _FP8_RELATIVE * abs(b) + _FP8_ABSOLUTE for a, b in zip(have, want)):
            raise BaseMismatchError(
                f"{ckpt.path} was trained on a different base model: its {key} does not match the loaded "
                f"backbone's. Load it with the Kolors files it was trained on (its training config's "
                f"model.kolors_dir, model.unet, model.vae), or retrain it on this base.", key)


def _dedupe_tied(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop `seq_r` keys whose `seq_l` twin holds the same values (tied branches are stored twice)."""
    out = {}
    for key, value in sd.items():
        twin = key.replace(".seq_r.", ".seq_l.")
        if twin != key and twin in sd and sd[twin].shape == value.shape and torch.equal(sd[twin], value):
            continue
        out[key] = value
    return out


def _untie(sd: dict[str, torch.Tensor], copy: bool = False) -> dict[str, torch.Tensor]:
    """Re-create `seq_r` keys for tied blocks from their `seq_l` twins (`copy`: as their own tensors)."""
    out = dict(sd)
    for key, value in sd.items():
        twin = key.replace(".seq_l.", ".seq_r.")
        if ".seq_l." in key and twin not in out:
            out[twin] = value.clone() if copy else value
    return out


# -- reading ------------------------------------------------------------------------------------
def sha256_of(path: str | Path) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_manifest(path: str | Path) -> str:
    """Check a release file's size and SHA-256 against the published manifest; returns the digest.

    The file is known by its name, or, when renamed, by its size (the published files all differ in size).
    """
    path = Path(path)
    have = path.stat().st_size
    name = path.name if path.name in MANIFEST else next((n for n, (size, _) in MANIFEST.items() if size == have), None)
    if name is None:
        published = ", ".join(f"{n} ({size:,} bytes)" for n, (size, _) in MANIFEST.items())
        raise CheckpointError(f"{path}: {have:,} bytes, neither the name nor the size of a published release file "
                              f"({published}): a renamed, incomplete or other file")
    size, digest = MANIFEST[name]
    if have != size:
        raise CheckpointError(f"{path}: {have} bytes, the release has {size}: incomplete download?")
    actual = sha256_of(path)
    if actual != digest:
        raise CheckpointError(f"{path}: SHA-256 {actual} does not match the release's {digest} ({name})")
    return actual


_RELEASE_HINT = "the release file tadisr_kolors_ftsr_526000.pkl is on Hugging Face: huqiming513/TADiSR-Models"


def safe_torch_load(path: str | Path, what: str = "checkpoint", mmap: bool = False) -> object:
    """`torch.load(weights_only=True)` after a bounded scan of the pickle (see `safe_pickle`), memory-mapped
    when `mmap` (the tensors are then read as they are touched).

    Every tensor view is also checked to lie inside its storage. CheckpointError names the file.
    """
    from .safe_pickle import UnsafePickleError, scan_torch_zip

    path = require_readable(path, what, _RELEASE_HINT if what == "checkpoint" else "")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(unreadable_format(path) or f"{path}: not a zip-based torch checkpoint (truncated or "
                                                         f"corrupt download, or another kind of file?)")
    try:
        scan_torch_zip(path)
        raw = load_torch_file(path, mmap=mmap)
    except (UnsafePickleError, TorchFileError) as e:
        raise CheckpointError(str(e)) from None
    except pickle.UnpicklingError as e:
        text = str(e)
        reason = text.split("Unsupported global: ")[-1].splitlines()[0].strip() if "Unsupported global" in text else ""
        reason = f" ({reason})" if reason else ""
        raise CheckpointError(f"{path}: refused: the file holds pickled objects other than tensors{reason}; nothing "
                              f"from it was executed") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be read, truncated or corrupt ({str(e).splitlines()[0]})") from None
    return raw


def _torch_load(path: Path) -> dict:
    # memory-mapped: another file given as the checkpoint (a 10 GB Kolors UNet .bin) is told apart by its
    # keys without reading its tensors
    raw = safe_torch_load(path, mmap=True)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a dict of state dicts, found {type(raw).__name__}")
    return raw


def check_groups(groups: dict[str, dict[str, torch.Tensor]], path: Path) -> None:
    """Refuse non-float, non-finite or absurdly large tensors, naming the file and the first bad key."""
    for g, sd in groups.items():
        bad = first_problem(sd)
        if bad:
            raise CheckpointError(f"{path}: {g}.{bad[0]} {bad[1]}; the file is damaged (re-download or re-convert "
                                  f"it)")


def check_spec(spec: TADiSRSpec, path: Path) -> None:
    """Range-check a spec read from a file's metadata (CheckpointError naming the field)."""
    import math

    problems = []
    if not (isinstance(spec.timestep, int) and 0 < spec.timestep < 1000):
        problems.append(f"timestep {spec.timestep!r} (must be an integer in 1..999)")
    for name, lora in (("unet_lora", spec.unet_lora), ("vae_lora", spec.vae_lora)):
        if not (isinstance(lora.rank, int) and lora.rank >= 1):
            problems.append(f"{name}.rank {lora.rank!r} (must be >= 1)")
        if not (isinstance(lora.alpha, (int, float)) and math.isfinite(lora.alpha) and 0 < lora.alpha <= 1e4):
            problems.append(f"{name}.alpha {lora.alpha!r} (must be a finite number > 0)")
    if spec.variant not in ("release", "paper"):
        problems.append(f"variant {spec.variant!r}")
    if problems:
        raise CheckpointError(f"{path}: bad spec metadata: {'; '.join(problems)}")


def _some_keys(keys: Iterable, shown: int = 5) -> str:
    """The first few of many keys and how many there are, for a message of one line."""
    names = sorted(map(str, keys))
    more = f", ... ({len(names)} keys)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more if names else "no keys"


WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DistributedDataParallel, torch.compile


def _unwrapped(sd: dict) -> dict:
    """`sd` with a wrapper's prefix (`WRAPPER_PREFIXES`) taken off its keys, when every key has it: the
    state dict of a module saved inside DataParallel or after torch.compile."""
    while sd:
        prefix = next((p for p in WRAPPER_PREFIXES if all(isinstance(k, str) and k.startswith(p) for k in sd)), None)
        if prefix is None:
            break
        sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _official_groups(raw: dict, path: Path) -> dict[str, dict[str, torch.Tensor]]:
    if {"state_dict_transformer", "js_decoder"} <= raw.keys():
        raise CheckpointError(f"{path}: this is the CogView4 release; only the Kolors release is supported")
    decoder = raw.get("js_decoder", raw.get("mi_decoder"))
    missing = [k for k in ("state_dict_unet", "state_dict_vae") if k not in raw]
    missing += ["mi_decoder"] if decoder is None else []
    if missing:
        raise CheckpointError(f"{path}: not a TADiSR Kolors checkpoint: missing top-level group(s) {missing} "
                              f"(found {_some_keys(raw)})")
    groups = {"unet": raw["state_dict_unet"], "vae": raw["state_dict_vae"], "mi_decoder": decoder}
    for name, sd in groups.items():
        if not isinstance(sd, dict) or not sd:
            raise CheckpointError(f"{path}: group {name!r} is empty or not a state dict")
        groups[name] = sd = _unwrapped(sd)
        bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(f"{path}: group {name!r} key {bad[0]!r} is not a tensor")
    check_groups(groups, path)
    vae = {}
    for key, value in groups["vae"].items():
        # PEFT < 0.7 saved the wrapped skip convs' base weights without ".base_layer".
        if "skip_conv_" in key and key.endswith(".weight") and "lora" not in key and ".base_layer." not in key:
            key = key[: -len("weight")] + "base_layer.weight"
        vae[key] = value
    groups["vae"] = vae
    deduped = _dedupe_tied(dict(groups["mi_decoder"]))
    untied = [k for k in deduped if ".seq_r." in k]
    if untied:  # the release's interaction blocks share one module between both branches
        twin = untied[0].replace(".seq_r.", ".seq_l.")
        raise CheckpointError(f"{path}: tied branch weights differ: {untied[0]} != {twin}")
    groups["mi_decoder"] = deduped
    return groups


def _spec_for(groups: dict[str, dict[str, torch.Tensor]], path: Path) -> TADiSRSpec:
    conv_in = groups["unet"].get("conv_in.weight")
    if conv_in is None:
        raise CheckpointError(f"{path}: group 'unet' has no conv_in.weight")
    base = full_spec("release") if conv_in.shape[0] == 320 else tiny_spec("release")
    r_unet = lora_rank(groups["unet"], "default")
    r_vae = lora_rank(groups["vae"], "vae_skip")
    if r_unet is None or r_vae is None:
        raise CheckpointError(f"{path}: no LoRA tensors for adapter {'default' if r_unet is None else 'vae_skip'}")
    return base.with_ranks(r_unet, r_vae)


def load_checkpoint(path: str | Path, dtypes: dict[str, torch.dtype] | None = None) -> Checkpoint:
    """Read a released `.pkl` (weights-only unpickling) or a native `.safetensors` checkpoint.

    `dtypes` (group -> dtype) casts each floating tensor of a group as it is read, except the
    tensors of LoRA layers (factors and base weights), which keep the file's precision for a merge
    in fp32. A native file is read one tensor at a time without a memory map, so a load holds the
    checkpoint once, in its target dtype.
    """
    path = Path(path)
    if is_safetensors(path):
        return _load_native(path, dtypes or {})
    raw = _torch_load(path)
    try:
        groups = _official_groups(raw, path)
    except CheckpointError as exc:  # a torch zip of another input (a Kolors UNet saved with torch.save)
        del raw
        kind = weights_kind(path)
        if kind is None:
            raise
        raise _other_input(f"{exc}: it is {kind[0]}", kind[1]) from None
    del raw
    # off the memory map: the model holds its own tensors, and the file is not kept open
    groups = {g: {k: v.clone() for k, v in sd.items()} for g, sd in groups.items()}
    return cast_for_load(Checkpoint(path, "official", _spec_for(groups, path), groups), dtypes or {})


def _other_input(message: str, part: str) -> CheckpointError:
    """The CheckpointError of a file that is TADiSR's `part` input, not a checkpoint."""
    exc = CheckpointError(message)
    exc.part = part
    return exc


def cast_for_load(ckpt: Checkpoint, dtypes: dict[str, torch.dtype]) -> Checkpoint:
    """A copy of a read checkpoint cast as `load_checkpoint(path, dtypes)` would have read it (the
    original is left as it is; tensors that need no cast are shared)."""
    groups = {g: {k: _cast_for_load(g, k, v, dtypes) for k, v in sd.items()} for g, sd in ckpt.groups.items()}
    return dataclasses.replace(ckpt, groups=groups)


def _cast_for_load(group: str, key: str, value: torch.Tensor, dtypes: dict[str, torch.dtype]) -> torch.Tensor:
    dtype = dtypes.get(group)
    if dtype is None or not value.is_floating_point() or ".lora_" in f".{key}" or ".base_layer." in f".{key}":
        return value
    return value.to(dtype)


def _load_native(path: Path, dtypes: dict[str, torch.dtype]) -> Checkpoint:
    from .streaming import iter_tensors, read_header

    require_readable(path, "checkpoint")
    try:
        header = read_header(path)
        meta = header.metadata
        if meta.get("format") != NATIVE_FORMAT:
            cache = meta.get("format", "").startswith("tadisr-prompt-cache")
            what, part = ("a prompt cache", "prompt-cache") if cache else weights_kind(path) or (None, None)
            message = (f"{path}: not a native TADiSR checkpoint (metadata format={meta.get('format')!r})"
                       + (f": it is {what}" if what else ""))
            raise _other_input(message, part) if part else CheckpointError(message)
        tensors = {key: _cast_for_load(key.partition(".")[0], key.partition(".")[2], value, dtypes)
                   for key, value in iter_tensors(path, header=header)}
    except CheckpointError:
        raise
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot be read, truncated or corrupt ({e})") from None
    try:
        spec = TADiSRSpec.from_json(meta["spec"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable spec metadata ({type(e).__name__}: {e})") from None
    check_spec(spec, path)
    groups: dict[str, dict[str, torch.Tensor]] = {g: {} for g in GROUPS}
    for key, value in tensors.items():
        group, _, rest = key.partition(".")
        if group not in groups:
            raise CheckpointError(f"{path}: key {key!r} belongs to no group ({', '.join(GROUPS)})")
        groups[group][rest] = value
    check_groups(groups, path)
    return Checkpoint(path, "native", spec, groups, meta)


# -- writing ------------------------------------------------------------------------------------
def _spec_metadata(spec: TADiSRSpec, prompt: PromptCache | str | None) -> dict[str, str]:
    """The metadata every native checkpoint carries: its format, spec and prompt; given the prompt
    conditioning itself, also its `time_ids` (JSON), which `loading` compares with the cache used."""
    from .spec import HEATMAP_PROMPT

    conditioning = {}
    if isinstance(prompt, PromptCache):
        conditioning["time_ids"] = json.dumps(prompt.time_ids.flatten().tolist())
        prompt = prompt.prompt
    return {"format": NATIVE_FORMAT, "spec": spec.to_json(), "variant": spec.variant,
            "unet_rank": str(spec.unet_lora.rank), "unet_alpha": str(spec.unet_lora.alpha),
            "vae_rank": str(spec.vae_lora.rank), "vae_alpha": str(spec.vae_lora.alpha),
            "unet_targets": ",".join(spec.unet_lora.targets), "vae_targets": ",".join(spec.vae_lora.targets),
            "schedule": spec.schedule, "timestep": str(spec.timestep), "prompt": prompt or HEATMAP_PROMPT,
            **conditioning}


def save_native(groups: dict[str, dict[str, torch.Tensor]], spec: TADiSRSpec, path: str | Path,
                extra_metadata: dict[str, str] | None = None, prompt: PromptCache | str | None = None) -> Path:
    """Write a native checkpoint atomically (temp file + rename). `prompt`: the conditioning the weights
    were trained with (its prompt and time ids are recorded), or only its prompt string."""
    from safetensors.torch import save_file

    path = Path(path)
    flat = {}
    for g, sd in groups.items():
        sd = _dedupe_tied(sd) if g == "mi_decoder" else sd
        flat.update({f"{g}.{k}": v.detach().cpu().contiguous() for k, v in sd.items()})
    meta = {**_spec_metadata(spec, prompt), **(extra_metadata or {})}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=meta)
    return path


def save_model(model, path: str | Path, extra_metadata: dict[str, str] | None = None,
               backbone: bool = False) -> Path:
    """Write a model's trainable tensors (with `backbone`, every tensor) as a native checkpoint."""
    meta = {**base_metadata(model, backbone), **(extra_metadata or {})}
    return save_native(trainable_state_dict(model, backbone), model.spec, path, meta, model.prompt)


def save_official(groups: dict[str, dict[str, torch.Tensor]], spec: TADiSRSpec, path: str | Path) -> Path:
    """Write the release's pickle layout (used to build test fixtures of that exact format)."""
    raw = {"state_dict_unet": groups["unet"], "state_dict_vae": groups["vae"],
           "mi_decoder": _untie(groups["mi_decoder"]),
           "unet_lora_target_modules": list(spec.unet_lora.targets), "rank_unet": spec.unet_lora.rank}
    torch.save(raw, path)
    return Path(path)


# -- checking against a model -------------------------------------------------------------------
@dataclass
class KeyReport:
    """How a checkpoint's keys fit a model: per group counts, missing, unexpected, shape mismatches."""

    counts: dict[str, int]
    missing: dict[str, list[str]]
    unexpected: dict[str, list[str]]
    mismatched: dict[str, list[tuple[str, tuple, tuple]]]

    @property
    def ok(self) -> bool:
        problems = (self.missing, self.unexpected, self.mismatched)
        return not any(v for kind in problems for v in kind.values())

    def only(self, groups: Iterable[str]) -> "KeyReport":
        """The report of these groups alone (the others count as fitting)."""
        keep = set(groups)
        return KeyReport(self.counts, *({g: v if g in keep else [] for g, v in kind.items()}
                                        for kind in (self.missing, self.unexpected, self.mismatched)))


def compare(ckpt: Checkpoint, model) -> KeyReport:
    """Compare checkpoint keys and shapes with what `model` saves (works on meta models)."""
    expected = trainable_state_dict(model, ckpt.includes_backbone)
    counts, missing, unexpected, mismatched = {}, {}, {}, {}
    for g in GROUPS:
        have = _untie(ckpt.groups.get(g, {})) if g == "mi_decoder" else ckpt.groups.get(g, {})
        want = expected[g]
        counts[g] = len(have)
        missing[g] = sorted(set(want) - set(have))
        unexpected[g] = sorted(set(have) - set(want))
        mismatched[g] = [(k, tuple(want[k].shape), tuple(have[k].shape)) for k in sorted(set(want) & set(have))
                         if tuple(want[k].shape) != tuple(have[k].shape)]
    return KeyReport(counts, missing, unexpected, mismatched)


def describe_problems(report: KeyReport, path: Path, limit: int = 5) -> str:
    """One message listing the first problems of each kind."""
    lines = []
    for g in GROUPS:
        for k, want, got in report.mismatched[g][:limit]:
            lines.append(f"  {g}.{k}: expected shape {list(want)}, checkpoint has {list(got)}")
        for k in report.missing[g][:limit]:
            lines.append(f"  {g}.{k}: missing from the checkpoint")
        for k in report.unexpected[g][:limit]:
            lines.append(f"  {g}.{k}: not in the model (unexpected)")
    return f"{path} does not fit the model:\n" + "\n".join(lines)


def apply_checkpoint(model, ckpt: Checkpoint, parts: Iterable[str] | None = None) -> KeyReport:
    """Load a checkpoint into a model; raises CheckpointError unless every key and shape fits.

    With `parts` (some of GROUPS) only those parts are loaded, and only they must fit; the others
    keep their initialisation (a training run started from another variant's backbone).
    """
    taken = tuple(GROUPS if parts is None else parts)
    if not set(taken) <= set(GROUPS):
        raise ValueError(f"parts {list(taken)}: choose among {list(GROUPS)}")
    report = compare(ckpt, model)
    if not report.only(taken).ok:
        raise CheckpointError(describe_problems(report.only(taken), ckpt.path))
    if not ckpt.includes_backbone:
        check_base(model, ckpt)
    for g in taken:
        module = getattr(model, g)
        # A part built on the meta device (the loader's mask decoder) takes the checkpoint's tensors
        # themselves, in their dtype, instead of a copy of them.
        assign = any(p.is_meta for p in module.parameters())
        sd = _untie(ckpt.groups[g], copy=assign) if g == "mi_decoder" else ckpt.groups[g]
        module.load_state_dict(sd, strict=False, assign=assign)
    bad = first_problem((n, p) for n, p in model.named_parameters()
                        if n.split(".", 1)[0] in ("unet", "vae") and not _is_saved(*n.split(".", 1)))
    if bad:  # the base weights, read from the Kolors files
        part = bad[0].split(".", 1)[0]
        name = {"unet": "UNet", "vae": "VAE"}[part]
        raise CheckpointError(f"base weight {bad[0]} {bad[1]}: the Kolors {name} weights are damaged (re-download "
                              f"the {name} file given as --{part}, or the Kolors folder's {part}/)")
    return report


# -- CLI ----------------------------------------------------------------------------------------
def _inspected_file(ref: str | Path) -> Path:
    """The checkpoint file `ref` names, as `--model` takes it (`model_ref.resolve_model`): a shipped model's
    name, a training run folder, one of its step folders, an exported model's folder, or a file. A path
    with nothing there is left to `load_checkpoint`, which names it (and where the release is)."""
    from .model_ref import resolve_model, shipped_models

    if str(ref) not in shipped_models() and (Path(ref).is_file() or not Path(ref).exists()):
        return Path(ref)
    try:
        return resolve_model(ref, given_as="inspect").checkpoint
    except ValueError as e:  # a run's damaged config.json
        raise CheckpointError(str(e)) from None


def inspect(path: str | Path, verify_sha: bool = False) -> dict:
    """Everything `inspect` prints: variant, size, group sizes, key fit against the meta model, SHA-256.
    `path` is a checkpoint file or what `--model` takes (`_inspected_file`)."""
    from .model import build_model

    path = _inspected_file(path)
    ckpt = load_checkpoint(path)
    model = build_model(ckpt.spec, device="meta")
    report = compare(ckpt, model)
    spec = ckpt.spec
    info = {
        "path": str(ckpt.path), "bytes": ckpt.path.stat().st_size, "source": ckpt.source, "variant": spec.variant,
        "size": size_name(spec),
        "unet_lora": {"rank": spec.unet_lora.rank, "alpha": spec.unet_lora.alpha},
        "vae_lora": {"rank": spec.vae_lora.rank, "alpha": spec.vae_lora.alpha},
        "groups": report.counts,
        "unique_decoder_tensors": len(ckpt.groups["mi_decoder"]),
        "missing": report.missing, "unexpected": report.unexpected,
        "shape_mismatches": {g: [{"key": k, "expected": list(w), "actual": list(a)} for k, w, a in v]
                             for g, v in report.mismatched.items()},
        "fits_model": report.ok,
        "sha256": verify_manifest(path) if verify_sha else sha256_of(path),
    }
    if verify_sha:
        info["sha256_verified"] = True
    return info


def convert(src: str | Path, dst: str | Path, force: bool = False) -> Path:
    """Official (or native) checkpoint -> native safetensors, tensors copied bit for bit; a native
    source keeps its metadata (whole backbone, the base it was trained on, prompt, training config).

    Refuses to write over `src`, and over any existing `dst` unless `force`; creates `dst`'s folder.
    """
    from safetensors import SafetensorError

    dst = Path(dst)
    if dst.exists() and same_file(src, dst):
        raise CheckpointError(f"{dst}: refusing to convert a file onto itself; name another output")
    if dst.suffix.lower() not in SAFETENSORS_SUFFIXES:
        raise CheckpointError(f"{dst}: the native format is safetensors; name the output *.safetensors")
    if dst.exists() and not force:
        raise CheckpointError(f"{dst} exists; pass --force to replace it")
    ckpt = load_checkpoint(src)
    kept = {k: v for k, v in ckpt.metadata.items() if k not in _spec_metadata(ckpt.spec, None)}
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        return save_native(ckpt.groups, ckpt.spec, dst, {**kept, "converted_from": Path(src).name},
                           ckpt.metadata.get("prompt"))
    except SafetensorError as exc:
        raise CheckpointError(f"cannot write {dst}: {exc}") from None


def _print_human(info: dict) -> None:
    print(f"{info['path']}: {info['source']} TADiSR checkpoint, variant {info['variant']} ({info['size']} size), "
          f"{info['bytes']:,} bytes")
    print(f"  UNet LoRA r={info['unet_lora']['rank']} alpha={info['unet_lora']['alpha']}; "
          f"VAE LoRA r={info['vae_lora']['rank']} alpha={info['vae_lora']['alpha']}")
    print("  groups: " + ", ".join(f"{g} {n} keys" for g, n in info["groups"].items()))
    for kind in ("missing", "unexpected"):
        for g, keys in info[kind].items():
            for k in keys[:10]:
                print(f"  {kind}: {g}.{k}")
    for g, items in info["shape_mismatches"].items():
        for it in items[:10]:
            print(f"  shape mismatch: {g}.{it['key']} expected {it['expected']} got {it['actual']}")
    print(f"  fits the model: {'yes' if info['fits_model'] else 'NO'}")
    print(f"  sha256: {info['sha256']}" + ("  (matches the release manifest)" if info.get("sha256_verified") else ""))


def add_commands(sub) -> None:
    """The `inspect` and `convert` sub-commands (shared by `tadisr` and `python -m tadisr_core.checkpoint`)."""
    p = sub.add_parser("inspect", help="report a checkpoint's variant, size, groups and key fit against its model",
                       description="Check a TADiSR checkpoint without running it: the pickle is scanned before "
                                   "loading, every tensor is checked finite. Exit 0 fits, 1 does not fit, "
                                   "2 unreadable or not a TADiSR checkpoint (a Kolors UNet, VAE or ChatGLM3 "
                                   "file is named as such, with the flag that takes it).")
    p.add_argument("path", help="a checkpoint file, or what --model takes: demo, demo-release, a training run "
                                "folder (its model_final or newest checkpoint), one of its step folders, an "
                                "exported model's folder")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--verify-sha", action="store_true", help="check size and SHA-256 against the release manifest")
    p.set_defaults(run=run)
    p = sub.add_parser("convert", help="convert a checkpoint to the native safetensors format (lossless)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--force", action="store_true", help="replace an existing DST (never SRC itself)")
    p.set_defaults(run=run)


def main(argv: list[str] | None = None) -> int:
    """`python -m tadisr_core.checkpoint inspect|convert ...` (the same as `tadisr inspect|convert`)."""
    parser = argparse.ArgumentParser(prog="python -m tadisr_core.checkpoint", description=__doc__.split("\n")[0])
    add_commands(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))


def other_weights(path: str | Path) -> str | None:
    """What a weights file that is not a TADiSR checkpoint is, when it is one of the files TADiSR
    also takes (`weights_kind`), and how to pass it on the command line; None for anything else."""
    kind = weights_kind(path)
    return None if kind is None else f"it is {kind[0]}: {CLI_ADVICE[kind[1]]}"


def weights_kind(path: str | Path) -> tuple[str, str] | None:
    """(what the file is, the input it belongs to: "unet", "vae" or "text-encoder") for a Kolors UNet,
    an SDXL VAE, an all-in-one Kolors checkpoint or ChatGLM3; None for anything else. Safetensors headers
    are read, and the tensor tables of torch zips whose pickle passes the scan (a pickle the scan refused
    is never opened again)."""
    from .chatglm_file import is_chatglm_file, quantized_bits
    from .kolors_files import KolorsFolderError, config_beside
    from .kolors_identity import check_unet, check_vae, holds_vae
    from .safe_pickle import rereadable_torch_zip

    path = Path(path)
    if not is_safetensors(path) and not rereadable_torch_zip(path):
        return None
    if is_chatglm_file(path):
        try:
            bits = quantized_bits(path)
        except KolorsFolderError:
            bits = None
        return f"the ChatGLM3 text encoder{f' ({bits}-bit)' if bits else ''}", "text-encoder"
    config = config_beside(path)  # a component folder's (unet/, vae/)
    for check, what in ((check_unet, "a Kolors UNet"), (check_vae, "an SDXL VAE")):
        try:
            check(path, config)
        except (ValueError, OSError):  # not this part (NotKolorsError), or unreadable
            continue
        if check is check_unet and holds_vae(path):
            return "an all-in-one Kolors checkpoint (UNet and VAE)", "unet"
        return what, "unet" if check is check_unet else "vae"
    return None


def with_cli_advice(exc: Exception, path: str | Path | None = None) -> str:
    """The message of a failed checkpoint read (of `path`, when given, looked at when the error did not say
    what the file is), with how the command line takes the file when it is another of TADiSR's inputs."""
    part = getattr(exc, "part", None)
    if part is not None:  # the message already says what it is
        return f"{exc}; {CLI_ADVICE[part]}"
    other = other_weights(path) if path is not None and Path(path).is_file() else None
    return f"{exc}" + (f"; {other}" if other else "")


@command_line()
def run(args: argparse.Namespace) -> int:
    """Run a parsed `inspect` / `convert` command; weight-file problems print one line and return 2."""
    try:
        if args.command == "inspect":
            info = inspect(args.path, args.verify_sha)
            print(json.dumps(info, indent=2)) if args.json else _print_human(info)
            return 0 if info["fits_model"] else 1
        out = convert(args.src, args.dst, args.force)
        print(f"wrote {out}")
        return 0
    except (CheckpointError, OSError) as e:
        path = args.path if args.command == "inspect" else args.src
        print(f"error: {with_cli_advice(e, path)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
