"""Text-aware cross-attention capture (TACA).

A processor on the chosen `attn2` layers computes the layer output with SDPA (so the UNet result
is unchanged) and, while capturing, the softmax probabilities of the selected token columns only.
`AttentionStore.assemble` resizes every kept head's map to the latent grid and stacks them as
channels in forward-execution order, the layout the mask stream's W_a projection reads.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from .spec import AttentionSpec


def cross_attention_layers(unet: nn.Module, spec: AttentionSpec) -> list[tuple[str, nn.Module]]:
    """The attn2 modules TACA reads, in forward-execution order (down, mid, up)."""
    layers = [(n, m) for n, m in unet.named_modules() if n.endswith(".attn2")]
    if not spec.include_mid():
        layers = [(n, m) for n, m in layers if not n.startswith("mid_block.")]
    order = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    return sorted(layers, key=lambda item: order[item[0].split(".")[0]])  # stable within a part


def attention_channels(unet: nn.Module, spec: AttentionSpec) -> int:
    """Number of TACA channels: kept heads summed over the hooked layers (550 / 1300 at full size)."""
    return sum(len(range(m.heads)[spec.head_slice(m.heads)]) for _, m in cross_attention_layers(unet, spec))


class AttentionStore:
    """Collects per-layer token maps during one UNet forward."""

    def __init__(self) -> None:
        self.active = False
        self.replaying = False
        self.columns: tuple[int, ...] = ()
        self.maps: list[torch.Tensor] = []

    def start(self, columns: tuple[int, ...]) -> None:
        self.active, self.columns, self.maps = True, tuple(columns), []

    def stop(self) -> None:
        self.active = False

    def checkpoint_contexts(self):
        """`context_fn` for `torch.utils.checkpoint` (non-reentrant) around UNet blocks.

        Called at forward time: when capture is on then, the backward-time recomputation repeats the
        capture's softmax (torch expects the same saved tensors) but keeps none of its maps.
        """
        return contextlib.nullcontext(), (self._replay() if self.active else contextlib.nullcontext())

    @contextlib.contextmanager
    def _replay(self):
        previous, self.replaying = self.replaying, True
        try:
            yield
        finally:
            self.replaying = previous

    def assemble(self, grid: tuple[int, int]) -> torch.Tensor:
        """Stack the captured maps as channels on the latent grid: (B, channels, h, w), >= 0."""
        if not self.maps:
            raise RuntimeError("no attention was captured: run the UNet with capture enabled first")
        h, w = grid
        out = []
        for probs in self.maps:  # (B, heads, N)
            b, heads, n = probs.shape
            factor = math.sqrt(h * w / n)
            lh, lw = round(h / factor), round(w / factor)
            if lh * lw != n:
                raise RuntimeError(f"attention map of {n} positions does not tile a {h}x{w} grid")
            m = probs.reshape(b, heads, lh, lw)
            if (lh, lw) != (h, w):
                m = F.interpolate(m, size=(h, w), mode="bicubic", align_corners=False)
            out.append(m.clamp_min(0))
        self.maps = []
        return torch.cat(out, dim=1)


class TextAttentionProcessor:
    """attn2 processor: SDPA output plus, when the store is active, token-column probabilities."""

    def __init__(self, store: AttentionStore, head_slice: slice):
        self.store = store
        self.head_slice = head_slice

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        b, n, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = k.shape[-1] // attn.heads
        q, k, v = (x.view(b, -1, attn.heads, head_dim).transpose(1, 2) for x in (q, k, v))
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], b)
            attention_mask = attention_mask.view(b, attn.heads, -1, attention_mask.shape[-1])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                             scale=attn.scale)
        if self.store.active:
            self.store.maps.append(self._token_probs(q, k, attn.scale))
        elif self.store.replaying:
            self._token_probs(q, k, attn.scale)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * head_dim).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _token_probs(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        # Softmax over every key (as the model attends), then keep only the chosen columns.
        q, k = q[:, self.head_slice].float(), k[:, self.head_slice].float()
        cols = list(self.store.columns)
        chunks = []
        for qc in q.split(4096, dim=2):  # bounds the (heads, queries, keys) temporary
            probs = torch.softmax(qc @ k.transpose(-1, -2) * scale, dim=-1)
            chunks.append(probs[..., cols].mean(-1))
        return torch.cat(chunks, dim=2)


def install_capture(unet: nn.Module, spec: AttentionSpec) -> AttentionStore:
    """Put a `TextAttentionProcessor` on the TACA layers of `unet`; returns their shared store."""
    store = AttentionStore()
    for _, module in cross_attention_layers(unet, spec):
        module.set_processor(TextAttentionProcessor(store, spec.head_slice(module.heads)))
    return store
