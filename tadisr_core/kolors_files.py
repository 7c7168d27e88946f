"""Where a user's Kolors weights are: the layouts people keep, found and named without ComfyUI.

Accepted layouts (each UNet / VAE file may use diffusers or the original SGM / LDM key names):

* a Kolors diffusers folder: unet/, vae/ (+ text_encoder/, tokenizer/, scheduler/), fp16 variants ok
* a Kolors folder without vae/ (kijai's KwaiKolorsWrapper download) + a separate SDXL VAE file
* one UNet file (e.g. models/unet/kolors.safetensors) + one SDXL VAE file, no folder at all
* an all-in-one checkpoint (models/checkpoints: UNet and VAE in one file), or one without a VAE + a VAE file

`find_kolors_files` turns CLI-style arguments into `KolorsFiles`; `list_kolors_candidates` and
`resolve_choice` give the ComfyUI loader its list of named choices from plain folder lists.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .files import file_identity, read_json_object
from .safe_pickle import rereadable_torch_zip
from .streaming import SAFETENSORS_SUFFIXES, is_safetensors, shards_folder
from .wording import named

WEIGHT_NAMES = ("diffusion_pytorch_model", "model")
WEIGHT_EXTS = (".safetensors", ".bin")
TORCH_EXTS = (".pt", ".pth", ".bin", ".ckpt")  # torch zips, read with the weights-only loader after the pickle scan
SINGLE_FILE_EXTS = SAFETENSORS_SUFFIXES + TORCH_EXTS
FP16_VARIANT_DTYPES = ("float16", "float8_e4m3fn", "float8_e5m2")  # loads that read the fp16 variant first
VAE_PART = " + vae/"  # starts a choice name's VAE part; split at the last one (a file name may hold " + ")
log = logging.getLogger("tadisr")


def vae_hint() -> str:
    """What to give for the VAE, in the caller's words (`wording.named`)."""
    return (f"the Kolors VAE is the SDXL VAE: pass {named('--vae FILE|DIR', 'vae=FILE|DIR')} (e.g. "
            f"sdxl_vae.safetensors; in ComfyUI put it in models/vae)")


def base_args() -> str:
    """How the caller gives a Kolors base, in their words (`wording.named`)."""
    return named("--kolors DIR (or --unet FILE and --vae FILE)", "kolors_dir=DIR (or unet=FILE and vae=FILE)")


class KolorsFolderError(FileNotFoundError):
    """A Kolors file or folder we need is missing; the message says what belongs where."""


@dataclass(frozen=True)
class KolorsFiles:
    """The files one Kolors backbone is loaded from."""

    unet: Path                           # weights file
    vae: Path                            # weights file
    unet_config: Path | None = None      # config.json beside them, when in diffusers layout
    vae_config: Path | None = None
    root: Path | None = None             # the Kolors folder, when there is one (for its ChatGLM3)

    def key(self) -> tuple:
        """Identity for caches: real paths, sizes and modification times of both files."""
        return file_identity(self.unet), file_identity(self.vae)


def weights_file(folder: Path, dtype=None) -> Path | None:
    """The weights file of a diffusers component folder for a load in `dtype` (a torch dtype): the fp16
    variant first for fp16 and fp8 loads, the full-precision file first otherwise (fp32, bf16, None),
    .safetensors before .bin within a variant."""
    fp16_first = dtype is not None and str(dtype).removeprefix("torch.") in FP16_VARIANT_DTYPES
    for variant in ((".fp16", "") if fp16_first else ("", ".fp16")):
        for name in WEIGHT_NAMES:
            for ext in WEIGHT_EXTS:
                p = folder / f"{name}{variant}{ext}"
                if p.is_file():
                    return p
    return None


def config_beside(weights: Path) -> Path | None:
    """The config.json beside a weights file (a diffusers component folder's), which settles what the
    weights alone cannot (an SD 1.x VAE's scaling factor); None when there is none."""
    config = weights.parent / "config.json"
    return config if config.is_file() else None


def sharded_weights(folder: Path, sub: str) -> str | None:
    """Why `folder` cannot serve when it holds diffusers weights in shards (an *.index[.fp16].json; a
    fine-tune saved in fp32 is sharded at diffusers' default 10 GB), with how to join them; else None."""
    shards = sorted(folder.glob("diffusion_pytorch_model*.index*.json"))  # *.index.fp16.json: a variant's
    if not shards:
        return None
    variant = ", variant='fp16'" if ".fp16." in shards[0].name else ""
    return (f"{folder} holds its weights in shards ({shards[0].name}), which TADiSR does not read: save them as one "
            f"file, e.g. with diffusers' from_pretrained(DIR{variant}) then save_pretrained(NEW_DIR, "
            f"max_shard_size='50GB'), or use Kwai-Kolors/Kolors' {sub}/ as published")


def _component(path: Path, sub: str, dtype=None) -> tuple[Path, Path | None]:
    """(weights, config) of a --unet/--vae argument: a file, a component folder or a Kolors folder (the
    *.index.json of sharded weights stands for its folder); a folder's weights file as `weights_file`
    chooses it for a load in `dtype`."""
    path = shards_folder(path)
    if path.is_file():
        return path, config_beside(path)
    if not path.is_dir():
        raise KolorsFolderError(f"{sub} weights not found: {path}")
    folder = path / sub if (path / sub).is_dir() and not (path / "config.json").is_file() else path
    weights = weights_file(folder, dtype)
    if weights is None:
        sharded = sharded_weights(folder, sub)
        if sharded:
            raise KolorsFolderError(sharded)
        raise KolorsFolderError(f"no weights in {folder}: expected diffusion_pytorch_model[.fp16].safetensors "
                                f"(or .bin) from Kwai-Kolors/Kolors/{sub}/")
    return weights, config_beside(weights)


def _part_dtypes(dtype) -> dict:
    """The dtype each part's weights are read in for a load in `dtype` (`descriptor.part_dtypes`: the VAE of
    an fp16 load is fp32), the UNet's as stored; {} when the dtype is not known."""
    if dtype is None:
        return {}
    from .descriptor import part_dtypes

    return {"unet": dtype, "vae": part_dtypes(dtype)["vae"]}


def find_kolors_files(kolors: str | Path | None = None, unet: str | Path | None = None,
                      vae: str | Path | None = None, dtype=None) -> KolorsFiles:
    """The UNet and VAE files from a Kolors folder and/or explicit --unet / --vae paths (which win); of a
    folder holding both the full-precision and the fp16-variant weights, the file `weights_file` chooses
    for the dtype each part is loaded in when the model is loaded in `dtype` (a torch dtype).

    Raises KolorsFolderError naming the missing piece and what belongs there.
    """
    dtypes = _part_dtypes(dtype)
    root = Path(kolors) if kolors else None
    if root is not None and root.is_file():
        kolors_arg, unet_arg, vae_arg, encoder_arg = (named(f"--{flag}", arg) for flag, arg in (
            ("kolors", "kolors_dir"), ("unet", "unet"), ("vae", "vae"), ("text-encoder", "text_encoder")))
        raise KolorsFolderError(f"{kolors_arg} {root} is a file, not a Kolors folder: pass a Kolors UNet file (or an "
                                f"all-in-one checkpoint) as {unet_arg} with an SDXL VAE as {vae_arg}, a ChatGLM3 "
                                f"file as {encoder_arg}, and the Kwai-Kolors/Kolors diffusers folder as {kolors_arg}")
    if root is not None and not root.is_dir():
        raise KolorsFolderError(f"Kolors folder not found: {root} (download Kwai-Kolors/Kolors in diffusers layout)")
    parts = {}
    for sub, given in (("unet", unet), ("vae", vae)):
        if given:
            parts[sub] = _component(Path(given), sub, dtypes.get(sub))
        elif sub == "vae" and unet and (root is None or not (root / sub).is_dir()) and _holds_vae(parts["unet"][0]):
            parts[sub] = (parts["unet"][0], None)  # an all-in-one checkpoint's own VAE
        elif root is None:
            raise KolorsFolderError(f"no {sub} given: pass {named('--kolors DIR', 'kolors_dir=DIR')} (a Kolors "
                                    f"diffusers folder) or {named(f'--{sub} FILE|DIR', f'{sub}=FILE|DIR')}"
                                    + ("; the Kolors VAE is the SDXL VAE (e.g. sdxl_vae.safetensors; in ComfyUI "
                                       "put it in models/vae)" if sub == "vae" else ""))
        elif sub == "vae" and not (root / sub).is_dir():
            raise KolorsFolderError(f"{root} has no vae/ folder: {vae_hint()}")
        else:
            folder = root / sub
            if not (folder / "config.json").is_file():
                raise KolorsFolderError(f"{folder / 'config.json'} is missing: {root} is not a complete Kolors "
                                        f"diffusers folder (needs unet/, vae/, text_encoder/, tokenizer/, scheduler/; "
                                        f"or pass --{sub} FILE|DIR)")
            parts[sub] = _component(folder, sub, dtypes.get(sub))
    return KolorsFiles(parts["unet"][0], parts["vae"][0], parts["unet"][1], parts["vae"][1], root)


# -- the ComfyUI loader's list --------------------------------------------------------------------
def is_model_folder(folder: Path) -> bool:
    """Whether `folder` is one model's folder (a diffusers pipeline: model_index.json or unet/; a
    transformers or component folder: config.json), whose own sub-folders are its parts."""
    return (folder / "model_index.json").is_file() or (folder / "unet").is_dir() or (folder / "config.json").is_file()


def walk_folders(root: str | Path) -> Iterator[Path]:
    """The folders under `root` (not `root` itself), level by level and in name order, following links
    as ComfyUI's folder lists do (each real folder once); a model folder's (`is_model_folder`) own
    sub-folders are not walked into. Files are never opened, nor listed. What cannot be read (a
    looping link, another user's folder) is passed over, never the folders beside it."""
    seen = {os.path.realpath(root)}
    level = [Path(root)]
    while level:
        below = []
        for folder in level:
            try:
                with os.scandir(folder) as entries:
                    subs = sorted(e.name for e in entries if _is_folder(e))  # follows links
            except OSError:
                continue
            for name in subs:
                sub = folder / name
                if not _first_visit(seen, sub):
                    continue
                try:
                    model = is_model_folder(sub)
                except OSError:  # unreadable: nothing in it can be loaded
                    continue
                yield sub
                if not model:
                    below.append(sub)
        level = below


def _first_visit(seen: set[str], folder: str | Path) -> bool:
    """Whether `folder`'s real path is not in `seen` yet (then added): a walk that follows links takes
    each real folder once, so a link back up neither repeats its files nor loops."""
    real = os.path.realpath(folder)
    if real in seen:
        return False
    seen.add(real)
    return True


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a link that loops (ELOOP) or cannot be followed
        return False


def _is_kolors_unet_folder(folder: Path) -> bool:
    """Whether `folder` (a diffusers folder's unet/) holds a Kolors UNet's config.json; a damaged one is
    logged and passed over."""
    config = folder / "config.json"
    try:
        if not config.is_file():
            return False
        cfg = read_json_object(config, "download Kwai-Kolors/Kolors' unet/config.json again")
    except (OSError, ValueError) as exc:
        log.warning("%s is left out of the Kolors list: %s", folder.parent, exc)
        return False
    return cfg.get("encoder_hid_dim_type") == "text_proj" and cfg.get("addition_embed_type") == "text_time"


def _files(dirs, exts) -> dict[str, Path]:
    """The files under `dirs` ending in `exts`, by path relative to their root, following links; each real
    folder is walked once (a link back to a folder above would repeat its files, or never end)."""
    out: dict[str, Path] = {}
    for root in dirs:
        root = Path(root)
        if not root.is_dir():
            continue
        seen = {os.path.realpath(root)}
        for dirpath, subs, names in os.walk(root, followlinks=True):
            subs[:] = [sub for sub in sorted(subs) if _first_visit(seen, os.path.join(dirpath, sub))]
            for name in names:
                if name.lower().endswith(exts):
                    p = Path(dirpath) / name
                    out.setdefault(p.relative_to(root).as_posix(), p)
    return dict(sorted(out.items()))


_CHECKED: dict[tuple, bool] = {}  # (check, file version, config version) -> passed: changed files are re-checked
_SAID: set[str] = set()  # what the listing has logged once


def _version(path: Path | None) -> tuple | None:
    st = path.stat() if path is not None else None
    return (str(path), st.st_size, st.st_mtime_ns) if st is not None else None


def _quick(check, path: Path) -> bool:
    """Whether `check(path, config)` passes (with the config.json beside the file, `config_beside`),
    cached per file version; a torch file is opened only when its pickle passes the bounded scan
    (`safe_pickle`). A file that fails any way is left out of the list (never the whole list), and why
    is logged."""
    try:
        config = config_beside(path)
        key = (check.__name__, _version(path), _version(config))
    except OSError:
        return False
    if key not in _CHECKED:
        try:
            if not is_safetensors(path) and not rereadable_torch_zip(path):
                raise ValueError("not safetensors, nor a torch zip whose pickle passes the scan")
            check(path, config)
            _CHECKED[key] = True
        except (ValueError, OSError, KeyError) as exc:  # another model's file, or unreadable
            part = "unet" if "unet" in check.__name__ else "vae"
            sharded = "-of-" in path.name and sharded_weights(path.parent, part)
            if sharded and sharded not in _SAID:  # one shard of a UNet or VAE: said once, it would be missed
                _SAID.add(sharded)
                log.warning("not listed: %s", sharded)
            log.debug("%s is not listed: %s", path, exc)
            _CHECKED[key] = False
        except Exception as exc:  # noqa: BLE001 - one odd file must not empty the loader's list
            log.warning("%s is not listed: %s: %s", path, type(exc).__name__, exc)
            _CHECKED[key] = False
    return _CHECKED[key]


def _holds_vae(path: Path) -> bool:
    from .kolors_identity import holds_vae

    return holds_vae(path)


def _kolors_unet_files(unet_dirs) -> dict[str, Path]:
    from .kolors_identity import check_unet
    from .streaming import header_mentions

    # Kolors' text projection keeps its name in every layout: most other models are passed over unparsed
    return {n: p for n, p in _files(unet_dirs, SINGLE_FILE_EXTS).items()
            if header_mentions(p, "encoder_hid_proj") and _quick(check_unet, p)}


def _sdxl_vae_files(vae_dirs) -> dict[str, Path]:
    from .kolors_identity import check_vae

    return {n: p for n, p in _files(vae_dirs, SINGLE_FILE_EXTS).items() if _quick(check_vae, p)}


def list_kolors_candidates(diffusers_dirs, unet_dirs=(), vae_dirs=(), checkpoint_dirs=()) -> list[str]:
    """Every Kolors backbone that can be assembled from these folders, as choice names:

    "Kolors"                                     a complete diffusers folder in a diffusers dir
    "Kolors + vae/sdxl_vae.safetensors"          a folder without vae/ plus a VAE file
    "unet/kolors.safetensors + vae/sdxl_vae.safetensors"   single UNet file plus VAE file
    "checkpoints/kolors_aio.safetensors"         an all-in-one checkpoint with its SDXL VAE inside
    "checkpoints/kolors_ckpt.safetensors + vae/sdxl_vae.safetensors"   one without a VAE, plus a VAE file
    (an all-in-one file in a UNet folder is listed alone too, as "unet/NAME").
    Files are checked from their headers only (cheap); non-Kolors UNets and non-SDXL VAEs are left out.
    """
    from .kolors_identity import check_vae

    folders, no_vae = [], []
    for root in diffusers_dirs:
        for sub in walk_folders(root):
            if _is_kolors_unet_folder(sub / "unet"):
                name = sub.relative_to(root).as_posix()
                try:
                    has_vae = (sub / "vae" / "config.json").is_file()
                except OSError:  # vae/ unreadable: as without one
                    has_vae = False
                (folders if has_vae else no_vae).append(name)
    singles = {prefix: _kolors_unet_files(dirs) for prefix, dirs in (("unet/", unet_dirs),
                                                                    ("checkpoints/", checkpoint_dirs))}
    alone = {p for files in singles.values() for p in files.values() if _quick(check_vae, p)}  # VAE inside
    need_vae = no_vae or any(p not in alone for files in singles.values() for p in files.values())
    vaes = list(_sdxl_vae_files(vae_dirs)) if need_vae else []
    out = sorted(set(folders))
    out += [f"{f}{VAE_PART}{v}" for f in sorted(set(no_vae)) for v in vaes]
    for f in () if vaes else sorted(set(no_vae) - _SAID):
        _SAID.add(f)
        log.warning("Kolors folder %s has no vae/ and no SDXL VAE was found in models/vae (%s), so it is not "
                    "listed: put the SDXL VAE (e.g. sdxl_vae.safetensors) there", f, ", ".join(map(str, vae_dirs)))
    for prefix, files in singles.items():
        for name, path in files.items():
            out += [f"{prefix}{name}"] if path in alone else [f"{prefix}{name}{VAE_PART}{v}" for v in vaes]
    return out


def _find(dirs, rel: str, folder: bool = False) -> Path | None:
    rel = os.path.normpath(rel)
    if rel.startswith("..") or os.path.isabs(rel):
        return None
    for root in dirs:
        p = Path(root) / rel
        if (p.is_dir() if folder else p.is_file()):
            return p
    return None


def resolve_choice(name: str, diffusers_dirs, unet_dirs=(), vae_dirs=(), checkpoint_dirs=(), *,
                   dtype=None) -> KolorsFiles:
    """The files behind a name from `list_kolors_candidates` (also a bare folder name, as saved in
    older workflows), for a load in `dtype` (`find_kolors_files`). Raises KolorsFolderError saying
    where the missing part belongs."""
    first, part, rel = (name or "").rpartition(VAE_PART)
    if not part:  # no VAE part
        first, rel = rel, ""
    vae = None
    if rel:
        vae = _find(vae_dirs, rel)
        if vae is None:
            raise KolorsFolderError(f"VAE file '{rel}' not found in models/vae ({', '.join(map(str, vae_dirs))})")
    for prefix, dirs in (("unet/", unet_dirs), ("checkpoints/", checkpoint_dirs)):
        if not first.startswith(prefix):
            continue
        rel = first.removeprefix(prefix)
        unet = _find(dirs, rel)
        if unet is None:
            raise KolorsFolderError(f"UNet file '{rel}' not found in models/{prefix[:-1]} "
                                    f"({', '.join(map(str, dirs))})")
        if vae is None and not _holds_vae(unet):
            raise KolorsFolderError(f"'{name}': a single UNet file needs a VAE file too ({vae_hint()})")
        return find_kolors_files(None, unet, vae, dtype)
    folder = _find(diffusers_dirs, first, folder=True) if first else None
    if folder is None:
        raise KolorsFolderError(f"Kolors folder '{first}' not found in models/diffusers "
                                f"({', '.join(map(str, diffusers_dirs))}): put the Kolors diffusers folder "
                                "(unet/, vae/ or a separate SDXL VAE, text_encoder/, tokenizer/) there")
    return find_kolors_files(folder, None, vae, dtype)
