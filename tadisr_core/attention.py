"""Text-aware cross-attention capture (TACA) and the prompt's cached keys and values.

A processor on every `attn2` layer computes the layer output with SDPA (so the UNet result is
unchanged), shares the prompt's keys and values over the batch (`PromptKV`) and, on the chosen
layers while capturing, keeps the softmax probabilities of the selected token columns only.
`AttentionStore.assemble` resizes every kept head's map to the latent grid and stacks them as
channels in forward-execution order, the layout the mask stream's W_a projection reads.
"""

from __future__ import annotations

import contextlib

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
            lh, lw = level_grid(h, w, n)
            m = probs.reshape(b, heads, lh, lw)
            if (lh, lw) != (h, w):
                m = F.interpolate(m, size=(h, w), mode="bicubic", align_corners=False)
            out.append(m.clamp_min(0))
        self.maps = []
        return torch.cat(out, dim=1)


def level_grid(h: int, w: int, positions: int) -> tuple[int, int]:
    """The grid of the UNet level whose attention has `positions` positions, for an `h` x `w` latent.

    Each down block halves the grid rounding up (stride-2 convolutions with padding 1), so an odd side
    such as 15 goes 15 -> 8 -> 4; the level is the one whose area is `positions`.
    """
    lh, lw = h, w
    while lh * lw > positions and lh * lw > 1:
        lh, lw = -(-lh // 2), -(-lw // 2)
    if lh * lw != positions:
        raise RuntimeError(f"attention map of {positions} positions does not tile a {h}x{w} latent grid")
    return lh, lw


class PromptKV:
    """Keys and values of a shared (batch-1) cross-attention context, kept per layer, device and dtype.

    The prompt is fixed, so its keys and values are the same for every tile: while `enabled`, the
    first UNet pass stores them and later passes reuse them (the same tensors, so the same result).
    The owner clears the store whenever the prompt or the projection weights change (`validate`): it
    sees a weight change by the tensor's version counter, which every in-place torch op bumps, except
    kernels that write without autograd's bookkeeping, such as torch's fused optimisers
    (`AdamW(fused=True)`). Whoever updates the weights so must call `clear()` before the next cached
    pass (the trainer does, before each validation).
    """

    def __init__(self) -> None:
        self.enabled = False
        self.entries: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._fingerprint: object = None

    def validate(self, fingerprint: object) -> None:
        """Forget everything when `fingerprint` (of the prompt and weights) differs from the last one."""
        if fingerprint != self._fingerprint:
            self.entries, self._fingerprint = {}, fingerprint

    def clear(self) -> None:
        """Forget every key and value (needed after a weight update that `validate` cannot see)."""
        self.entries, self._fingerprint = {}, None

    def keys_values(self, name: str, attn, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) of `context` [1, N, D] through `attn`, as [1, heads, N, head_dim]."""
        key = (name, context.device, context.dtype)
        if self.enabled and key in self.entries:
            return self.entries[key]
        k, v = _heads(attn.to_k(context), attn.heads), _heads(attn.to_v(context), attn.heads)
        if self.enabled:
            self.entries[key] = (k, v)
        return k, v


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, heads * d] -> [B, heads, N, d]."""
    b, n, inner = x.shape
    return x.view(b, n, heads, inner // heads).transpose(1, 2)


class TextAttentionProcessor:
    """attn2 processor: SDPA output plus, on TACA layers while the store is active, token-column probabilities.

    A batch-1 context (the prompt) is shared by the whole batch: its keys and values are computed
    once per pass at batch 1, or taken from `kv` when that holds them, and broadcast over the batch.
    """

    def __init__(self, store: AttentionStore, head_slice: slice | None, kv: PromptKV | None = None,
                 name: str = ""):
        self.store = store
        self.head_slice = head_slice          # None: not a TACA layer, never captured
        self.kv = kv
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        b = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = _heads(attn.to_q(hidden_states), attn.heads)
        if encoder_hidden_states is not None and context.shape[0] == 1:
            kv = self.kv if self.kv is not None else PromptKV()
            k, v = kv.keys_values(self.name, attn, context)
            k, v = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)
        else:
            k, v = _heads(attn.to_k(context), attn.heads), _heads(attn.to_v(context), attn.heads)
        head_dim = k.shape[-1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], b)
            attention_mask = attention_mask.view(b, attn.heads, -1, attention_mask.shape[-1])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                             scale=attn.scale)
        if self.head_slice is not None:
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


def install_capture(unet: nn.Module, spec: AttentionSpec, kv: PromptKV | None = None) -> AttentionStore:
    """Put a `TextAttentionProcessor` on every attn2 layer of `unet` (capturing on the TACA layers of
    `spec`, sharing the prompt keys and values through `kv`); returns their shared store."""
    store = AttentionStore()
    taca = {name for name, _ in cross_attention_layers(unet, spec)}
    for name, module in unet.named_modules():
        if name.endswith(".attn2"):
            heads = spec.head_slice(module.heads) if name in taca else None
            module.set_processor(TextAttentionProcessor(store, heads, kv, name))
    return store


def prompt_projections(unet: nn.Module) -> list[nn.Module]:
    """The modules that turn the prompt into cross-attention keys and values (their weights key `PromptKV`)."""
    mods = [unet.encoder_hid_proj] if getattr(unet, "encoder_hid_proj", None) is not None else []
    for name, module in unet.named_modules():
        if name.endswith(".attn2"):
            mods += [module.to_k, module.to_v]
    return mods
