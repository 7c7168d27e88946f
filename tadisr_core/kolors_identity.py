"""Is it Kolors? Read a UNet / VAE file's tensor table (no weights), check it, and find its spec.

The check runs before any module is built: a UNet that is not Kolors (no `encoder_hid_proj` text
projection, no `text_time` addition embedding, another block layout) or a VAE that is not the
SDXL-type VAE gets one `NotKolorsError` naming the file, what was expected and what was found.

An all-in-one checkpoint (ComfyUI's models/checkpoints: the UNet under `model.diffusion_model.`, the
VAE under `first_stage_model.`, perhaps a text encoder beside them) is read as each part's section;
the other tensors are left alone.

Widths are read from the tensor shapes. Two numbers are not in any shape: the attention head
counts and the GroupNorm group count. They come from the component's config.json when there is
one, else from a `config` entry in the safetensors metadata (`unet_config` / `vae_config` in a file
holding both; our tiny test files carry them), else Kolors' own values (64-wide heads, 32 groups),
which is what a real Kolors file needs.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from . import ldm_names
from .scaled_weights import is_side_tensor, iter_dequantized, unreadable_layout
from .spec import UNetSpec, VAESpec
from .streaming import Rename, WeightsHeader, read_header

KOLORS_HEAD_WIDTH = 64
CHECKPOINT_SECTIONS = {"unet": "model.diffusion_model.", "vae": "first_stage_model."}  # all-in-one files
SDXL_VAE_SCALING = 0.13025
_FULL = UNetSpec()


class NotKolorsError(ValueError):
    """A weights file is not (the right part of) Kolors; the message names file, expected, found."""


@dataclass(frozen=True)
class CheckedPart:
    """A checked UNet or VAE file: its spec and how its key names map to diffusers names."""

    path: Path
    spec: UNetSpec | VAESpec
    ldm_names: bool
    header: WeightsHeader
    section: str | None = None  # the part's key prefix in an all-in-one checkpoint

    def rename(self, key: str) -> str | None:
        """The diffusers name of one of the file's keys; None for a key of another part."""
        if self.section is not None:
            if not key.startswith(self.section):
                return None
            key = key[len(self.section):]
        if isinstance(self.spec, UNetSpec):
            return ldm_names.unet_key(key) if self.ldm_names else ldm_names.strip_prefix(key, ("unet.",))
        if self.ldm_names:
            return ldm_names.vae_key(key, len(self.spec.block_out_channels))
        return ldm_names.strip_prefix(key, ("vae.",))

    def tensors(self, dtype: torch.dtype | None, rename: Rename | None = None):
        """(diffusers name, tensor) of this part in `dtype`, one at a time; scaled weights (ComfyUI's scaled
        fp8) as stored x scale. `rename` (default `self.rename`) also picks which tensors are read."""
        return iter_dequantized(self.path, dtype, rename or self.rename, self.header)


def _config(path: Path, config: Path | None, header: WeightsHeader, part: str) -> dict:
    """The part's settings: its config.json, else its metadata entry, else none. NotKolorsError naming
    the config.json when that is not a JSON object; a metadata entry that is none (another tool's note,
    such as "v1-inference.yaml") is ignored, and the file is judged by its weights."""
    from .files import json_object, read_json_object

    if config is not None and config.is_file():
        hint = f"a Kolors {part} config is the JSON object of Kwai-Kolors/Kolors' {part}/config.json: download it again"
        try:
            return read_json_object(config, hint)
        except ValueError as exc:
            raise NotKolorsError(str(exc)) from None
    text = header.metadata.get(f"{part}_config") or header.metadata.get("config")
    try:
        return json_object(text, str(path), "") if text else {}
    except ValueError:
        return {}


def _section(header: WeightsHeader, part: str) -> str | None:
    """`part`'s key prefix when the file also holds other tensors (an all-in-one checkpoint), else None."""
    prefix = CHECKPOINT_SECTIONS[part]
    inside = sum(k.startswith(prefix) for k in header.tensors)
    return prefix if 0 < inside < len(header.tensors) else None


def _part_tensors(header: WeightsHeader, section: str | None) -> dict:
    """The part's weights by key, its section prefix taken off (as `CheckedPart.rename` takes it off);
    the scales and markers of scaled fp8 files are not weights of the model and are left out."""
    prefix = section or ""
    return {k[len(prefix):]: v for k, v in header.tensors.items() if k.startswith(prefix) and not is_side_tensor(k)}


def holds_vae(path: str | Path) -> bool:
    """Whether a UNet file is an all-in-one checkpoint with the VAE inside (`first_stage_model.` keys)."""
    try:
        return _section(read_header(path), "vae") is not None
    except (ValueError, OSError):
        return False


def _count(shapes: dict, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m[1] for k in shapes if (m := rx.match(k))})


def _fail(path: Path, what: str, expected: str, found: str, hint: str = "") -> NotKolorsError:
    tail = f" {hint}" if hint else ""
    return NotKolorsError(f"{path}: not a Kolors {what}: expected {expected}; found {found}.{tail}")


def _malformed_is_not_kolors(what: str):
    """A tensor table with Kolors' names but shapes no Kolors file has (too few dimensions, a missing
    block) fails as NotKolorsError too, never as a bare IndexError from deep inside the check."""
    def wrap(check):
        @functools.wraps(check)
        def checked(path: str | Path, config: str | Path | None = None) -> CheckedPart:
            try:
                return check(path, config)
            except (IndexError, KeyError, TypeError, ZeroDivisionError, RuntimeError) as exc:
                raise _fail(Path(path), what, "its tensors at the shapes of one",
                            f"a tensor table it cannot be ({type(exc).__name__}: {exc})") from None
        return checked
    return wrap


# -- UNet -------------------------------------------------------------------------------------------
@_malformed_is_not_kolors("UNet")
def check_unet(path: str | Path, config: str | Path | None = None) -> CheckedPart:
    """Check that `path` is a Kolors UNet (diffusers or SGM names) and return its spec."""
    path = Path(path)
    header = read_header(path)
    section = _section(header, "unet")
    tensors = _part_tensors(header, section)
    ldm = ldm_names.is_ldm_unet(tensors)
    rename = ldm_names.unet_key if ldm else (lambda k: ldm_names.strip_prefix(k, ("unet.",)))
    shapes = {rename(k): v.shape for k, v in tensors.items()}
    cfg = _config(path, Path(config) if config else None, header, "unet")
    what = "UNet"
    cross_key = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    cross = shapes.get(cross_key, shapes.get("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"))
    cross_dim = cross[1] if cross else None
    if "conv_in.weight" not in shapes:
        raise _fail(path, what, "a diffusion UNet (conv_in / input_blocks.0.0)",
                    f"none of its keys (first: {next(iter(tensors), 'no tensors')})",
                    "Is this a VAE, a text encoder or a LoRA?")
    hid = shapes.get("encoder_hid_proj.weight")
    if hid is None:
        raise _fail(path, what, "the ChatGLM3 text projection encoder_hid_proj 4096->2048",
                    f"no encoder_hid_proj (cross-attention dim {cross_dim}"
                    + (", an SDXL-type UNet" if "add_embedding.linear_1.weight" in shapes else "") + ")",
                    "SD 1.x / SDXL / other UNets cannot run TADiSR; use Kwai-Kolors/Kolors' unet.")
    if "add_embedding.linear_1.weight" not in shapes:
        raise _fail(path, what, "the text_time addition embedding (add_embedding / label_emb)", "none")
    why = unreadable_layout(header, section or "")  # before the shapes: packed 4-bit weights have other ones
    if why:
        raise NotKolorsError(f"{path}: a Kolors UNet whose weights are stored in a layout TADiSR does not read: "
                             f"{why}. Use its fp16 / bf16 file, or a plain or scaled fp8 one")
    if cross_dim is None or hid[0] != cross_dim:
        raise _fail(path, what, "encoder_hid_proj output = cross-attention dim", f"{hid[0]} vs {cross_dim}")
    n_blocks = _count(shapes, r"down_blocks\.(\d+)\.resnets\.0\.conv1\.weight")
    channels = tuple(shapes[f"down_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(n_blocks))
    layers = _count(shapes, r"down_blocks\.0\.resnets\.(\d+)\.conv1\.weight")
    depth = tuple(_count(shapes, rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.attn1\.to_q\.weight")
                  for i in range(n_blocks))
    layout = (n_blocks, layers, depth[1:] if n_blocks == 3 else depth, depth[0] if depth else None)
    if layout != (3, 2, _FULL.transformer_layers_per_block[1:], 0):
        raise _fail(path, what, "3 levels of 2 resnets, transformer depths (none, 2, 10)",
                    f"{n_blocks} levels of {layers} resnets, transformer depths {depth}")
    time_in = shapes["add_embedding.linear_1.weight"][1]
    extra = time_in - hid[1]
    if extra <= 0 or extra % 6:
        raise _fail(path, what, f"add_embedding input = text_embeds ({hid[1]}) + 6 time ids", f"input {time_in}")
    groups = cfg.get("norm_num_groups", _FULL.norm_num_groups)
    heads = cfg.get("attention_head_dim")
    heads = tuple(heads) if isinstance(heads, (list, tuple)) else (
        tuple(max(1, c // KOLORS_HEAD_WIDTH) for c in channels) if heads is None else (heads,) * n_blocks)
    spec = UNetSpec(block_out_channels=channels, layers_per_block=layers,
                    transformer_layers_per_block=(1, *depth[1:]), attention_head_dim=heads,
                    cross_attention_dim=cross_dim, encoder_hid_dim=hid[1], addition_time_embed_dim=extra // 6,
                    norm_num_groups=groups, sample_size=cfg.get("sample_size", _FULL.sample_size))
    _compare_with_meta(path, what, shapes, _meta_shapes_unet(spec))
    return CheckedPart(path, spec, ldm, header, section)


# -- VAE --------------------------------------------------------------------------------------------
@_malformed_is_not_kolors("VAE (the SDXL VAE)")
def check_vae(path: str | Path, config: str | Path | None = None) -> CheckedPart:
    """Check that `path` is an SDXL-type VAE (diffusers or LDM names) and return its spec."""
    path = Path(path)
    header = read_header(path)
    section = _section(header, "vae")
    tensors = _part_tensors(header, section)
    ldm = ldm_names.is_ldm_vae(tensors)
    levels = ldm_names.vae_levels(tensors) if ldm else 0
    shapes = {(ldm_names.vae_key(k, levels) if ldm else ldm_names.strip_prefix(k, ("vae.",))): v.shape
              for k, v in tensors.items()}
    cfg = _config(path, Path(config) if config else None, header, "vae")
    what = "VAE (the SDXL VAE)"
    quant = shapes.get("quant_conv.weight")
    if quant is None or "encoder.conv_in.weight" not in shapes or "decoder.conv_out.weight" not in shapes:
        raise _fail(path, what, "an AutoencoderKL with encoder, decoder and quant_conv",
                    f"keys such as {list(tensors)[:2]}", "Is this a UNet, or a checkpoint without a VAE?")
    latent = quant[0] // 2
    n = _count(shapes, r"encoder\.down_blocks\.(\d+)\.resnets\.0\.conv1\.weight")
    channels = tuple(shapes[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(n))
    if latent != 4 or n != 4:
        raise _fail(path, what, "4 latent channels and 4 levels (128, 256, 512, 512 at full size)",
                    f"{latent} latent channels, {n} levels {channels}",
                    "SD3 / Flux / other VAEs have another latent space.")
    scaling = cfg.get("scaling_factor", SDXL_VAE_SCALING)
    if abs(scaling - SDXL_VAE_SCALING) > 1e-6:
        raise _fail(path, what, f"scaling_factor {SDXL_VAE_SCALING} (the SDXL VAE)", f"{scaling}",
                    "A scaling factor of 0.18215 means an SD 1.x / 2.x VAE.")
    layers = _count(shapes, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.conv1\.weight")
    spec = VAESpec(block_out_channels=channels, layers_per_block=layers,
                   norm_num_groups=cfg.get("norm_num_groups", VAESpec().norm_num_groups), scaling_factor=scaling,
                   sample_size=cfg.get("sample_size", VAESpec().sample_size))
    _compare_with_meta(path, what, shapes, _meta_shapes_vae(spec))
    return CheckedPart(path, spec, ldm, header, section)


def rescaled_vae(part: CheckedPart, config: str | Path | None = None) -> str | None:
    """Why a checked VAE looks like madebyollin's sdxl-vae-fp16-fix (its config says force_upcast false, or
    its file or folder is named fp16-fix), else None. That VAE has the SDXL VAE's shapes and outputs but
    weights rescaled inside, so that fp16 does not overflow; TADiSR reads the VAE's inner features."""
    cfg = _config(part.path, Path(config) if config else None, part.header, "vae")
    if cfg.get("force_upcast") is False:
        return "its config says force_upcast false"
    named = f"{part.path.parent.name}/{part.path.name}".lower().replace("_", "-")
    return "it is named fp16-fix" if "fp16-fix" in named else None


# -- the structural comparison ----------------------------------------------------------------------
def _meta_shapes_unet(spec: UNetSpec) -> dict[str, tuple[int, ...]]:
    from .backbone import build_unet

    return {k: tuple(v.shape) for k, v in build_unet(spec, "meta").state_dict().items()}


def _meta_shapes_vae(spec: VAESpec) -> dict[str, tuple[int, ...]]:
    from .backbone import build_vae

    return {k: tuple(v.shape) for k, v in build_vae(spec, "meta").state_dict().items()}


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(s for s in shape if s != 1) or (1,)


def _compare_with_meta(path: Path, what: str, found: dict, expected: dict) -> None:
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    wrong = [k for k in expected if k in found and _squeezed(tuple(found[k])) != _squeezed(expected[k])]
    if not (missing or extra or wrong):
        return
    if wrong:
        k = wrong[0]
        raise _fail(path, what, f"{k} of shape {expected[k]}", f"{tuple(found[k])} ({len(wrong)} tensors differ)")
    if missing:
        raise _fail(path, what, f"{len(expected)} tensors including {missing[0]}",
                    f"{len(found)} tensors, {len(missing)} missing")
    raise _fail(path, what, f"{len(expected)} tensors", f"{len(extra)} more, e.g. {extra[0]}")
