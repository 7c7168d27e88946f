"""Original SGM / LDM key names (what ComfyUI's own UNet and VAE loaders read) -> diffusers names.

Only the Kolors layout is needed: an SDXL-type UNet with 3 levels of 2 resnets (plus Kolors'
`encoder_hid_proj`, which keeps its name in both layouts) and the SDXL-type VAE. Renaming is by
name only; the VAE's 1x1-conv attention weights are reshaped to linear ones when assigned
(`streaming.assign_weights`). Anything that does not fit the layout is kept as it is, so the
identity check reports it as unexpected.
"""

from __future__ import annotations

import re

UNET_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "unet.")
VAE_PREFIXES = ("first_stage_model.", "vae.")
_LAYERS = 2  # resnets per UNet level (Kolors / SDXL)

_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_UNET_FIXED = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
               "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
               "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_VAE_RESNET = {"nin_shortcut": "conv_shortcut"}


def strip_prefix(key: str, prefixes: tuple[str, ...]) -> str:
    """`key` without the first of `prefixes` it starts with (unchanged when none)."""
    for p in prefixes:
        if key.startswith(p):
            return key[len(p):]
    return key


def is_ldm_unet(keys) -> bool:
    """Whether UNet keys use the SGM names (input_blocks / middle_block / output_blocks)."""
    return any(strip_prefix(k, UNET_PREFIXES).startswith(("input_blocks.", "middle_block.")) for k in keys)


def is_ldm_vae(keys) -> bool:
    """Whether VAE keys use the LDM names (encoder.down.N.block / decoder.up.N.block)."""
    return any(strip_prefix(k, VAE_PREFIXES).startswith(("encoder.down.", "decoder.up.")) for k in keys)


def _resnet(rest: str) -> str:
    for old, new in _RESNET.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def unet_key(key: str) -> str:
    """The diffusers name of one SGM UNet key (prefix such as model.diffusion_model. removed)."""
    k = strip_prefix(key, UNET_PREFIXES)
    for old, new in _UNET_FIXED.items():
        if k.startswith(old + "."):
            return new + k[len(old):]
    m = re.match(r"input_blocks\.(\d+)\.(\d+)\.(.*)", k)
    if m:
        n, part, rest = int(m[1]), int(m[2]), m[3]
        level, j = divmod(n - 1, _LAYERS + 1)
        if j == _LAYERS:  # the level's downsampler
            return f"down_blocks.{level}.downsamplers.0.conv.{rest.removeprefix('op.')}"
        if part == 0:
            return f"down_blocks.{level}.resnets.{j}.{_resnet(rest)}"
        return f"down_blocks.{level}.attentions.{j}.{rest}"
    m = re.match(r"middle_block\.(\d+)\.(.*)", k)
    if m:
        part, rest = int(m[1]), m[2]
        if part == 1:
            return f"mid_block.attentions.0.{rest}"
        return f"mid_block.resnets.{part // 2}.{_resnet(rest)}"
    m = re.match(r"output_blocks\.(\d+)\.(\d+)\.(.*)", k)
    if m:
        n, part, rest = int(m[1]), int(m[2]), m[3]
        level, j = divmod(n, _LAYERS + 1)
        if part == 0:
            return f"up_blocks.{level}.resnets.{j}.{_resnet(rest)}"
        if rest.startswith("conv."):  # an upsampler (after the attention, or alone)
            return f"up_blocks.{level}.upsamplers.0.{rest}"
        return f"up_blocks.{level}.attentions.{j}.{rest}"
    return k


def vae_key(key: str, levels: int = 4) -> str:
    """The diffusers name of one LDM VAE key (`levels`: the number of decoder up levels)."""
    k = strip_prefix(key, VAE_PREFIXES)
    m = re.match(r"(encoder|decoder)\.(down|up)\.(\d+)\.(block|downsample|upsample)\.(.*)", k)
    if m:
        side, _, i, kind, rest = m[1], m[2], int(m[3]), m[4], m[5]
        block = f"down_blocks.{i}" if side == "encoder" else f"up_blocks.{levels - 1 - i}"
        if kind in ("downsample", "upsample"):
            return f"{side}.{block}.{kind}rs.0.{rest}"
        j, _, inner = rest.partition(".")
        return f"{side}.{block}.resnets.{j}.{_sub(inner, _VAE_RESNET)}"
    m = re.match(r"(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.*)", k)
    if m:
        side, part, rest = m[1], m[2], m[3]
        if part == "attn_1":
            return f"{side}.mid_block.attentions.0.{_sub(rest, _VAE_ATTN)}"
        return f"{side}.mid_block.resnets.{int(part[-1]) - 1}.{_sub(rest, _VAE_RESNET)}"
    m = re.match(r"(encoder|decoder)\.norm_out\.(.*)", k)
    if m:
        return f"{m[1]}.conv_norm_out.{m[2]}"
    return k


def _sub(rest: str, table: dict[str, str]) -> str:
    head, dot, tail = rest.partition(".")
    return table.get(head, head) + dot + tail


def vae_levels(keys) -> int:
    """Number of decoder up levels in LDM VAE keys."""
    found = {int(m[1]) for k in keys if (m := re.match(r"decoder\.up\.(\d+)\.", strip_prefix(k, VAE_PREFIXES)))}
    return max(found) + 1 if found else 4
