"""The mask stream of the joint segmentation decoders and its interaction blocks.

The image stream is the (LoRA-tuned) VAE decoder itself; `model.py` walks it up block by up block
and, before each, lets an interaction block exchange information between the streams.

Two variants share one layout (`interaction_blocks.i.0.*`, `up_blocks.i.*`, `out_block.*`):
- "release": MuGI blocks with tied branch weights, as stored in the released checkpoint.
  Their image stream passes unchanged; only the mask stream is updated.
- "paper": CDIB blocks (residual with zero-initialised scales, so identity at initialisation)
  and a text-segmentation decoder symmetric to the VAE decoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .spec import TADiSRSpec


class LayerNorm2d(nn.Module):
    """LayerNorm over channels at every pixel (biased variance, eps 1e-6), with affine weights."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        return (x - mu) / torch.sqrt(var + self.eps) * self.weight[:, None, None] + self.bias[:, None, None]


class DualStream(nn.Module):
    """Applies `seq_l` to the image stream and `seq_r` to the mask stream (tied: one module)."""

    def __init__(self, make, tied: bool):
        super().__init__()
        self.seq_l = make()
        self.seq_r = self.seq_l if tied else make()

    def forward(self, left, right):
        return self.seq_l(left), self.seq_r(right)


class CrossGate(nn.Module):
    """Split both streams into halves and gate each with the other's second half."""

    def __init__(self, sigmoid: bool):
        super().__init__()
        self.sigmoid = sigmoid

    def forward(self, left, right):
        l1, l2 = left.chunk(2, dim=1)
        r1, r2 = right.chunk(2, dim=1)
        if self.sigmoid:
            r2, l2 = r2.sigmoid(), l2.sigmoid()
        return l1 * r2, r1 * l2

    def gate_right(self, right: torch.Tensor, left_second_half: torch.Tensor) -> torch.Tensor:
        """The right output alone, from the right stream and only the second half of the left one."""
        r1 = right.chunk(2, dim=1)[0]
        return r1 * (left_second_half.sigmoid() if self.sigmoid else left_second_half)


class ChannelAttention(nn.Module):
    """x * conv1x1(global average pool(x)), without a sigmoid (as released)."""

    def __init__(self, channels: int):
        super().__init__()
        self.ca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, channels, 1))

    def forward(self, x):
        return x * self.ca(x)


class StreamSequential(nn.ModuleList):
    """A sequence of two-stream modules."""

    def forward(self, left, right):
        for module in self:
            left, right = module(left, right)
        return left, right


def _conv(cin: int, cout: int, k: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups)


class MuGIBlock(nn.Module):
    """The released interaction block: only the mask stream changes (scales a_r, b_r, zero init)."""

    def __init__(self, c: int):
        super().__init__()
        self.block1 = StreamSequential([
            DualStream(lambda: nn.Sequential(LayerNorm2d(c), _conv(c, 2 * c), _conv(2 * c, 2 * c, 3, 2 * c)), True),
            CrossGate(sigmoid=False),
            DualStream(lambda: nn.Sequential(ChannelAttention(c)), True),
            DualStream(lambda: nn.Sequential(_conv(c, c)), True),
        ])
        self.block2 = StreamSequential([
            DualStream(lambda: nn.Sequential(LayerNorm2d(c), _conv(c, 2 * c)), True),
            CrossGate(sigmoid=False),
            DualStream(lambda: nn.Sequential(_conv(c, c)), True),
        ])
        # a_l and b_l are stored by the release but never used: its image stream is left unchanged.
        for name in ("a_l", "a_r", "b_l", "b_r"):
            setattr(self, name, nn.Parameter(torch.zeros(1, c, 1, 1)))

    def forward(self, image, mask):
        # The released forward runs both branches and drops the image one. Only the second half of
        # the image branch's first stage reaches the mask (the cross gate's r1 * l2), so that half
        # alone is computed: the same convolutions on the same channels, the same numbers.
        block1, block2 = self.block1, self.block2
        d_mask = block1[1].gate_right(block1[0].seq_r(mask), _second_half(block1[0].seq_l, image))
        d_mask = block1[3].seq_r(block1[2].seq_r(d_mask))
        mask = mask + self.a_r * d_mask
        d_mask = block2[1].gate_right(block2[0].seq_r(mask), _second_half(block2[0].seq_l, image))
        return image, mask + self.b_r * block2[2].seq_r(d_mask)

    def forward_both(self, image, mask):
        """The released computation of both branches (what `forward` shortens): (image, mask, dropped d_image)."""
        d_image, d_mask = self.block1(image, mask)
        mask = mask + self.a_r * d_mask
        d_image2, d_mask = self.block2(image, mask)
        return image, mask + self.b_r * d_mask, (d_image, d_image2)


def _second_half(seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The last half of the output channels of `seq` (LayerNorm2d, then 1x1 / depthwise convs) on `x`."""
    for module in seq:
        if isinstance(module, nn.Conv2d):
            half = module.out_channels // 2
            if module.groups not in (1, module.out_channels):
                raise ValueError("only plain and depthwise convs can be halved")
            groups = 1 if module.groups == 1 else half
            weight, bias = module.weight[half:], None if module.bias is None else module.bias[half:]
            x = F.conv2d(x, weight, bias, module.stride, module.padding, module.dilation, groups)
        else:
            x = module(x)
    return x


class ResBlock(nn.Module):
    """diffusers' ResnetBlock2D without a time embedding."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        from diffusers.models.resnet import ResnetBlock2D

        self.block = ResnetBlock2D(in_channels=c, out_channels=c, temb_channels=None, groups=groups, eps=1e-6)

    def forward(self, x):
        return self.block(x, None)


class CDIBlock(nn.Module):
    """Paper CDIB: ResBlocks, 1x1 conv, sigmoid cross-gating, GN, SiLU, 1x1 conv, zero-init residual."""

    def __init__(self, c: int, groups: int, tied: bool = False):
        super().__init__()
        self.block = StreamSequential([
            DualStream(lambda: nn.Sequential(ResBlock(c, groups), ResBlock(c, groups), _conv(c, 2 * c)), tied),
            CrossGate(sigmoid=True),
            DualStream(lambda: nn.Sequential(nn.GroupNorm(groups, c, eps=1e-6), nn.SiLU(), _conv(c, c)), tied),
        ])
        self.a_l = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.a_r = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, image, mask):
        d_image, d_mask = self.block(image, mask)
        return image + self.a_l * d_image, mask + self.a_r * d_mask


def _up_block(cin: int, cout: int, layers: int, groups: int, upsample: bool):
    from diffusers.models.unets.unet_2d_blocks import UpDecoderBlock2D

    return UpDecoderBlock2D(in_channels=cin, out_channels=cout, num_layers=layers, resnet_eps=1e-6,
                            resnet_act_fn="silu", resnet_groups=groups, add_upsample=upsample, temb_channels=None)


class MaskDecoder(nn.Module):
    """Interaction blocks + mask up blocks + logit head (the checkpoint group `mi_decoder`).

    `attention_channels` > 0 adds W_a (`attention_proj`), a 1x1 conv from the TACA maps to the
    mask stream's width; otherwise the mask stream starts from the decoder's mid-block features.
    """

    def __init__(self, spec: TADiSRSpec, attention_channels: int = 0):
        super().__init__()
        vae = spec.vae
        groups = vae.norm_num_groups
        inter = vae.interaction_channels()
        c0, c1, c2, c3 = vae.block_out_channels
        self.variant = spec.variant
        if spec.variant == "release":
            outs, layers = (c3, c2, c1, c1), 2
            self.interaction_blocks = nn.ModuleList(StreamSequential([MuGIBlock(c)]) for c in inter)
        else:
            outs, layers = (c3, c2, c1, c0), vae.layers_per_block + 1
            self.interaction_blocks = nn.ModuleList(StreamSequential([CDIBlock(c, groups)]) for c in inter)
        if spec.variant == "paper":
            from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D

            self.mid_block = UNetMidBlock2D(in_channels=c3, resnet_eps=1e-6, resnet_groups=groups,
                                            attention_head_dim=c3, temb_channels=None, add_attention=True)
        self.up_blocks = nn.ModuleList(_up_block(inter[i], outs[i], layers, groups, i < 3) for i in range(4))
        self.out_block = nn.Sequential(nn.GroupNorm(groups, outs[-1], eps=1e-6), nn.SiLU(), _conv(outs[-1], 1, 3))
        if attention_channels:
            self.attention_proj = nn.Conv2d(attention_channels, c3, 1)

    @property
    def image_reads_mask(self) -> bool:
        """False for the release's MuGI blocks: their image stream passes unchanged."""
        return not all(isinstance(block[0], MuGIBlock) for block in self.interaction_blocks)

    def stream_input(self, mid_features: torch.Tensor, attention: torch.Tensor | None) -> torch.Tensor:
        """The mask stream's input at the latent grid."""
        if hasattr(self, "attention_proj"):
            if attention is None:
                raise ValueError("this model's mask stream reads the text attention maps: denoise with capture on")
            x = self.attention_proj(attention.to(mid_features.dtype))
        else:
            x = mid_features
        return self.mid_block(x) if hasattr(self, "mid_block") else x
