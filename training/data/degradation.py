"""Real-ESRGAN second-order degradation in torch + kornia: per-sample random parameters, any device.

``degrade(hr)`` turns a batch of HR images ``[B,3,H,W]`` in 0..1 into LR images ``[B,3,H/s,W/s]``:
blur -> random resize -> noise -> JPEG, then blur -> random resize -> noise, then a final resize +
(sinc) and JPEG in random order, quantised to 8 bits. Four presets (``PRESETS``):

- ``REALESRGAN``: the standard Real-ESRGAN x4plus ranges;
- ``REALESRGAN_MILD``: the same pipeline at about half strength, for small crops;
- ``FTSR_RELEASE``: what the official TADiSR FTSR synthesis script actually runs (tiny blur, no
  stage-1 JPEG, no stage-2 blur, no final sinc, and half of the time noise on the HR itself);
- ``BICUBIC``: an antialiased bicubic downscale only.

All randomness comes from one ``torch.Generator``: per sample, a seed for a ``random.Random`` draws
the scalar parameters, and the generator itself draws the noise fields (on its own device).
"""
from __future__ import annotations

import dataclasses

import math
import random
from dataclasses import dataclass

# kornia (the `train` extra) is imported where it is used, so that the commands can say it is missing
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

KERNEL_KINDS = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
KERNEL_PROBS = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
KERNEL_SIZES = tuple(range(7, 22, 2))
PAD_KERNEL_TO = 21
RESIZE_MODES = ("area", "bilinear", "bicubic")


@dataclass(frozen=True)
class KernelSettings:
    """Random blur kernel: Gaussian-family kernel of a random kind, or (with ``sinc_prob``) a sinc."""

    sigma: tuple[float, float]
    beta_gaussian: tuple[float, float]
    beta_plateau: tuple[float, float]
    sinc_prob: float = 0.1
    kinds: tuple[str, ...] = KERNEL_KINDS
    probs: tuple[float, ...] = KERNEL_PROBS
    sizes: tuple[int, ...] = KERNEL_SIZES


@dataclass(frozen=True)
class ResizeSettings:
    """Random resize: up / down / keep with ``probs``; factors U(1, scale[1]) or U(scale[0], 1)."""

    probs: tuple[float, float, float]
    scale: tuple[float, float]
    modes: tuple[str, ...] = RESIZE_MODES


@dataclass(frozen=True)
class NoiseSettings:
    """Gaussian noise (sigma in 8-bit levels) with ``gaussian_prob``, else Poisson; gray with
    ``gray_prob``."""

    gaussian_prob: float
    sigma: tuple[float, float]
    poisson_scale: tuple[float, float]
    gray_prob: float


@dataclass(frozen=True)
class DegradationPreset:
    """One second-order degradation recipe. JPEG ranges are qualities; ``None`` skips the step."""

    name: str
    kernel1: KernelSettings
    resize1: ResizeSettings
    noise1: NoiseSettings
    jpeg1: tuple[float, float] | None
    kernel2: KernelSettings | None
    blur2_prob: float
    resize2: ResizeSettings
    noise2: NoiseSettings
    jpeg2: tuple[float, float]
    final_modes: tuple[str, ...] = RESIZE_MODES
    final_sinc_prob: float = 0.0
    # FTSR release: stage 1 is resize -> blur -> noise (Real-ESRGAN: blur -> resize -> noise) ...
    resize_before_blur: bool = False
    # ... and with this probability noise -> blur on the HR itself, dropping the first resize.
    noise_on_hr_prob: float = 0.0
    # Real-ESRGAN sharpens the ground truth (unsharp mask) and degrades and trains on the sharpened copy.
    usm_gt: bool = False
    # "kornia": its fast differentiable JPEG; "libjpeg": Pillow's libjpeg, the standard codec (Real-ESRGAN
    # trains with basicsr's DiffJPEG, a torch re-implementation of it; kornia's output is 0.7-1.0 dB milder
    # than libjpeg's at the same quality).
    jpeg_codec: str = "kornia"
    # True: no blur, noise or JPEG, only an antialiased bicubic downscale (the identity at scale 1);
    # the stage settings above are then unused.
    clean: bool = False


REALESRGAN = DegradationPreset(
    name="realesrgan",
    kernel1=KernelSettings(sigma=(0.2, 3.0), beta_gaussian=(0.5, 4.0), beta_plateau=(1.0, 2.0)),
    resize1=ResizeSettings(probs=(0.2, 0.7, 0.1), scale=(0.15, 1.5)),
    noise1=NoiseSettings(gaussian_prob=0.5, sigma=(1.0, 30.0), poisson_scale=(0.05, 3.0), gray_prob=0.4),
    jpeg1=(30.0, 95.0),
    kernel2=KernelSettings(sigma=(0.2, 1.5), beta_gaussian=(0.5, 4.0), beta_plateau=(1.0, 2.0)),
    blur2_prob=0.8,
    resize2=ResizeSettings(probs=(0.3, 0.4, 0.3), scale=(0.3, 1.2)),
    noise2=NoiseSettings(gaussian_prob=0.5, sigma=(1.0, 25.0), poisson_scale=(0.05, 2.5), gray_prob=0.4),
    jpeg2=(30.0, 95.0),
    final_sinc_prob=0.8,
)

FTSR_RELEASE = DegradationPreset(
    name="ftsr",
    kernel1=KernelSettings(sigma=(0.1, 0.5), beta_gaussian=(0.5, 1.1), beta_plateau=(1.0, 1.1)),
    resize1=ResizeSettings(probs=(0.2, 0.7, 0.1), scale=(0.2, 1.5)),
    noise1=NoiseSettings(gaussian_prob=0.5, sigma=(15.0, 50.0), poisson_scale=(0.25, 1.25), gray_prob=0.2),
    jpeg1=None,
    kernel2=None,
    blur2_prob=0.0,
    resize2=ResizeSettings(probs=(0.3, 0.4, 0.3), scale=(0.8, 1.2), modes=("bilinear", "bicubic")),
    noise2=NoiseSettings(gaussian_prob=0.5, sigma=(1.0, 25.0), poisson_scale=(0.25, 1.25), gray_prob=0.4),
    jpeg2=(60.0, 100.0),
    final_sinc_prob=0.0,
    resize_before_blur=True,
    noise_on_hr_prob=0.5,
)

# Real-ESRGAN's second-order pipeline at about half strength: the demo model's data. At 32 px LR
# crops, full strength (first resize down to 0.15x, sigma up to 3) leaves no trace of most text.
REALESRGAN_MILD = dataclasses.replace(
    REALESRGAN,
    name="realesrgan-mild",
    kernel1=KernelSettings(sigma=(0.2, 1.5), beta_gaussian=(0.5, 4.0), beta_plateau=(1.0, 2.0)),
    resize1=ResizeSettings(probs=(0.2, 0.7, 0.1), scale=(0.5, 1.5)),
    noise1=NoiseSettings(gaussian_prob=0.5, sigma=(1.0, 15.0), poisson_scale=(0.05, 1.5), gray_prob=0.4),
    jpeg1=(50.0, 95.0),
    kernel2=KernelSettings(sigma=(0.2, 1.0), beta_gaussian=(0.5, 4.0), beta_plateau=(1.0, 2.0)),
    resize2=ResizeSettings(probs=(0.3, 0.4, 0.3), scale=(0.6, 1.2)),
    noise2=NoiseSettings(gaussian_prob=0.5, sigma=(1.0, 12.0), poisson_scale=(0.05, 1.2), gray_prob=0.4),
    jpeg2=(50.0, 95.0),
    final_sinc_prob=0.5,
)

# The classic SR degradation (antialiased bicubic only). At scale 1 the "LR" is the HR itself, which
# makes the model an autoencoder: the demo model's first phase learns this before the real task.
BICUBIC = dataclasses.replace(REALESRGAN, name="bicubic", clean=True)

PRESETS = {p.name: p for p in (REALESRGAN, REALESRGAN_MILD, FTSR_RELEASE, BICUBIC)}


def get_preset(preset: str | DegradationPreset) -> DegradationPreset:
    """A preset by name ('realesrgan', 'ftsr') or the preset itself."""
    if isinstance(preset, DegradationPreset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown degradation preset {preset!r}; use one of {sorted(PRESETS)}")
    return PRESETS[preset]


# ----------------------------------------------------------------------------------------- kernels


def _normalised(k: Tensor) -> Tensor:
    return (k / k.sum()).float()


def _grid(size: int) -> tuple[Tensor, Tensor]:
    if size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be a positive odd number, got {size}")
    ax = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    return torch.meshgrid(ax, ax, indexing="ij")


def _mahalanobis(size: int, sigma_x: float, sigma_y: float, angle: float) -> Tensor:
    """x^T Sigma^-1 x on a size x size grid, Sigma = R diag(sx^2, sy^2) R^T (R rotates by ``angle``)."""
    yy, xx = _grid(size)
    c, s = math.cos(angle), math.sin(angle)
    u = c * xx + s * yy  # coordinates in the kernel's principal axes
    v = -s * xx + c * yy
    return (u / sigma_x) ** 2 + (v / sigma_y) ** 2


def anisotropic_gaussian_kernel(size: int, sigma_x: float, sigma_y: float, angle: float) -> Tensor:
    """Gaussian with axis sigmas ``sigma_x``, ``sigma_y`` rotated by ``angle`` (radians), summing to 1."""
    return _normalised(torch.exp(-0.5 * _mahalanobis(size, sigma_x, sigma_y, angle)))


def generalized_gaussian_kernel(size: int, sigma_x: float, sigma_y: float, angle: float,
                                beta: float) -> Tensor:
    """Generalized Gaussian ``exp(-0.5 m^beta)`` (m the Mahalanobis form), summing to 1."""
    return _normalised(torch.exp(-0.5 * _mahalanobis(size, sigma_x, sigma_y, angle) ** beta))


def plateau_kernel(size: int, sigma_x: float, sigma_y: float, angle: float, beta: float) -> Tensor:
    """Plateau-shaped kernel ``1 / (1 + m^beta)``, summing to 1."""
    return _normalised(1.0 / (1.0 + _mahalanobis(size, sigma_x, sigma_y, angle) ** beta))


def sinc_kernel(size: int, cutoff: float) -> Tensor:
    """2-D circular low-pass (sinc) kernel with cutoff frequency ``cutoff`` (radians), summing to 1."""
    yy, xx = _grid(size)
    r = torch.sqrt(xx**2 + yy**2)
    safe_r = torch.where(r == 0, torch.ones_like(r), r)
    k = cutoff * torch.special.bessel_j1(cutoff * safe_r) / (2 * math.pi * safe_r)
    k = torch.where(r == 0, torch.full_like(r, cutoff**2 / (4 * math.pi)), k)
    return _normalised(k)


def pulse_kernel(size: int = PAD_KERNEL_TO) -> Tensor:
    """Identity kernel (1 in the centre)."""
    k = torch.zeros(size, size)
    k[size // 2, size // 2] = 1.0
    return k


def pad_kernel(kernel: Tensor, size: int = PAD_KERNEL_TO) -> Tensor:
    """Zero-pad a square odd kernel to ``size`` x ``size`` (centred)."""
    p = (size - kernel.shape[-1]) // 2
    if p < 0:
        raise ValueError(f"kernel of size {kernel.shape[-1]} is larger than {size}")
    return F.pad(kernel, (p, p, p, p))


def _draw_beta(rng: random.Random, lo_hi: tuple[float, float]) -> float:
    # Half the time below 1 (heavier tails / flatter top), half above, as Real-ESRGAN does.
    lo, hi = lo_hi
    return rng.uniform(lo, 1.0) if rng.random() < 0.5 else rng.uniform(1.0, hi)


def _sinc_cutoff(rng: random.Random, size: int) -> float:
    return rng.uniform(math.pi / 3, math.pi) if size < 13 else rng.uniform(math.pi / 5, math.pi)


def random_kernel(settings: KernelSettings, rng: random.Random, pad_to: int = PAD_KERNEL_TO) -> Tensor:
    """Draw one blur kernel as Real-ESRGAN does: a random odd size, a sinc with ``sinc_prob``, else a
    Gaussian-family kernel of a random kind. Zero-padded to ``pad_to``; sums to 1."""
    size = rng.choice(settings.sizes)
    if rng.random() < settings.sinc_prob:
        return pad_kernel(sinc_kernel(size, _sinc_cutoff(rng, size)), pad_to)
    kind = rng.choices(settings.kinds, weights=settings.probs)[0]
    sx = rng.uniform(*settings.sigma)
    if kind in ("iso", "generalized_iso", "plateau_iso"):
        sy, angle = sx, 0.0
    else:
        sy, angle = rng.uniform(*settings.sigma), rng.uniform(-math.pi, math.pi)
    if kind.startswith("generalized"):
        k = generalized_gaussian_kernel(size, sx, sy, angle, _draw_beta(rng, settings.beta_gaussian))
    elif kind.startswith("plateau"):
        k = plateau_kernel(size, sx, sy, angle, _draw_beta(rng, settings.beta_plateau))
    elif kind in ("iso", "aniso"):
        k = anisotropic_gaussian_kernel(size, sx, sy, angle)
    else:
        raise ValueError(f"unknown kernel kind {kind!r}; use one of {KERNEL_KINDS}")
    return pad_kernel(k, pad_to)


def random_final_sinc(rng: random.Random, prob: float, pad_to: int = PAD_KERNEL_TO) -> Tensor:
    """Real-ESRGAN's final sinc filter with probability ``prob`` (cutoff U(pi/3, pi)), else a pulse."""
    if rng.random() >= prob:
        return pulse_kernel(pad_to)
    size = rng.choice(KERNEL_SIZES)
    return pad_kernel(sinc_kernel(size, rng.uniform(math.pi / 3, math.pi)), pad_to)


# ------------------------------------------------------------------------------- batched operations


def _trim_zero_border(kernels: Tensor) -> Tensor:
    """Drop the all-zero outer rings that ``pad_kernel`` added: same result, much cheaper filtering."""
    k = kernels.shape[-1]
    c = k // 2
    nz = (kernels != 0).any(0).nonzero()
    r = int((nz - c).abs().max()) if len(nz) else 0
    return kernels[:, c - r: c + r + 1, c - r: c + r + 1]


def blur(x: Tensor, kernels: Tensor) -> Tensor:
    """Filter each image of ``x`` ``[B,C,H,W]`` with its own kernel ``[B,k,k]`` (or one ``[k,k]``)."""
    import kornia

    if kernels.ndim == 2:
        kernels = kernels.expand(x.shape[0], -1, -1)
    kernels = _trim_zero_border(kernels)
    if kernels.shape[-1] == 1:
        return x * kernels.to(x.device, x.dtype).view(-1, 1, 1, 1)
    kernels = kernels.to(x.device, x.dtype)
    # Reflect padding needs the image to be larger than the padding; tiny images fall back to replicate.
    border = "reflect" if min(x.shape[-2:]) > kernels.shape[-1] // 2 else "replicate"
    return kornia.filters.filter2d(x, kernels, border_type=border)


def resize(x: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    """Plain (non-antialiased) resize, as Real-ESRGAN does; ``mode`` is area, bilinear or bicubic."""
    size = (max(1, int(size[0])), max(1, int(size[1])))
    if mode == "area":
        return F.interpolate(x, size=size, mode="area")
    if mode in ("bilinear", "bicubic"):
        return F.interpolate(x, size=size, mode=mode, align_corners=False)
    raise ValueError(f"unknown resize mode {mode!r}; use one of {RESIZE_MODES}")


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def add_gaussian_noise(x: Tensor, sigma: Tensor, gray: Tensor,
                       generator: torch.Generator | None = None) -> Tensor:
    """Add Gaussian noise, std ``sigma[b]`` (0..1 units) per image; ``gray[b]`` uses one field for all
    channels. Clamped to 0..1."""
    noise = _randn_like(x, generator)
    gray4 = gray.to(x.device).view(-1, 1, 1, 1)
    noise = torch.where(gray4, noise[:, :1].expand_as(noise), noise)
    return (x + noise * sigma.to(x).view(-1, 1, 1, 1)).clamp(0, 1)


def _poisson_noise(img: Tensor, generator: torch.Generator | None) -> Tensor:
    q = (img.clamp(0, 1) * 255).round() / 255
    device = generator.device if generator is not None else q.device
    counts = torch.poisson(q.to(device) * 256, generator=generator).to(q.device)
    return counts / 256 - q


def add_poisson_noise(x: Tensor, scale: Tensor, gray: Tensor,
                      generator: torch.Generator | None = None) -> Tensor:
    """Add Poisson (shot) noise of the 8-bit image scaled by ``scale[b]``; ``gray[b]`` computes it on the
    luma and adds it to all channels. Clamped to 0..1."""
    import kornia

    gray = gray.to(x.device)
    noise = torch.zeros_like(x)
    if (~gray).any():
        noise[~gray] = _poisson_noise(x[~gray], generator)
    if gray.any():
        luma = kornia.color.rgb_to_grayscale(x[gray])
        noise[gray] = _poisson_noise(luma, generator).expand(-1, x.shape[1], -1, -1)
    return (x + noise * scale.to(x).view(-1, 1, 1, 1)).clamp(0, 1)


def libjpeg(x: Tensor, quality: Tensor) -> Tensor:
    """JPEG-compress each image with its own ``quality[b]`` through Pillow's libjpeg (4:2:0, as OpenCV)."""
    import io

    from PIL import Image

    out = torch.empty_like(x)
    q = quality.reshape(-1).expand(x.shape[0]) if quality.numel() == 1 else quality.reshape(-1)
    for i in range(x.shape[0]):
        arr = (x[i].clamp(0, 1).permute(1, 2, 0) * 255).round().byte().cpu().numpy()
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=int(round(float(q[i]))), subsampling=2)
        decoded = torch.from_numpy(np.array(Image.open(buf).convert("RGB"))).to(x.device)
        out[i] = decoded.permute(2, 0, 1).to(x.dtype) / 255
    return out


def usm_sharpen(x: Tensor, radius: int = 50, weight: float = 0.5, threshold: float = 10.0) -> Tensor:
    """Real-ESRGAN's unsharp mask of ``[B,3,H,W]`` (0..1): sharpened where the detail exceeds
    ``threshold``/255, blended in through a blurred version of that mask."""
    import kornia

    size = radius + 1 if radius % 2 == 0 else radius
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8  # OpenCV's default for sigma 0
    def soft(t: Tensor) -> Tensor:
        return kornia.filters.gaussian_blur2d(t, (size, size), (sigma, sigma), border_type="reflect")
    residual = x - soft(x)
    mask = (residual.abs() * 255 > threshold).to(x.dtype)
    sharp = (x + weight * residual).clamp(0, 1)
    m = soft(mask)
    return m * sharp + (1 - m) * x


def jpeg(x: Tensor, quality: Tensor) -> Tensor:
    """JPEG-compress each image with its own ``quality[b]`` (kornia's differentiable codec)."""
    import kornia

    q = quality.to(x.device, torch.float32).reshape(-1)
    return kornia.enhance.jpeg_codec_differentiable(x.clamp(0, 1), q).clamp(0, 1)


def quantise(x: Tensor) -> Tensor:
    """Clamp to 0..1 and round to 8-bit levels."""
    return (x.clamp(0, 1) * 255).round() / 255


# --------------------------------------------------------------------------------------- pipeline


def _random_factor(rng: random.Random, s: ResizeSettings) -> float:
    kind = rng.choices(("up", "down", "keep"), weights=s.probs)[0]
    if kind == "up":
        return rng.uniform(1.0, s.scale[1])
    if kind == "down":
        return rng.uniform(s.scale[0], 1.0)
    return 1.0


def _random_resize(x: Tensor, s: ResizeSettings, rng: random.Random) -> Tensor:
    f = _random_factor(rng, s)
    h, w = x.shape[-2:]
    return resize(x, (int(h * f), int(w * f)), rng.choice(s.modes))


def _random_noise(x: Tensor, s: NoiseSettings, rng: random.Random, gen: torch.Generator | None) -> Tensor:
    gray = torch.tensor([rng.random() < s.gray_prob])
    if rng.random() < s.gaussian_prob:
        return add_gaussian_noise(x, torch.tensor([rng.uniform(*s.sigma) / 255]), gray, gen)
    return add_poisson_noise(x, torch.tensor([rng.uniform(*s.poisson_scale)]), gray, gen)


def _random_jpeg(x: Tensor, quality: tuple[float, float], rng: random.Random, codec: str = "kornia") -> Tensor:
    q = torch.tensor([rng.uniform(*quality)])
    return libjpeg(x, q) if codec == "libjpeg" else jpeg(x, q)


def _stage1(x: Tensor, p: DegradationPreset, rng: random.Random, gen: torch.Generator | None) -> Tensor:
    k1 = random_kernel(p.kernel1, rng)
    if rng.random() < p.noise_on_hr_prob:
        out = blur(_random_noise(x, p.noise1, rng, gen), k1)
    elif p.resize_before_blur:
        out = _random_noise(blur(_random_resize(x, p.resize1, rng), k1), p.noise1, rng, gen)
    else:
        out = _random_noise(_random_resize(blur(x, k1), p.resize1, rng), p.noise1, rng, gen)
    if p.jpeg1 is not None:
        out = _random_jpeg(out, p.jpeg1, rng, p.jpeg_codec)
    return out


def _stage2(x: Tensor, lr_size: tuple[int, int], p: DegradationPreset, rng: random.Random,
            gen: torch.Generator | None) -> Tensor:
    out = x
    if p.kernel2 is not None and rng.random() < p.blur2_prob:
        out = blur(out, random_kernel(p.kernel2, rng))
    f = _random_factor(rng, p.resize2)
    out = resize(out, (int(lr_size[0] * f), int(lr_size[1] * f)), rng.choice(p.resize2.modes))
    return _random_noise(out, p.noise2, rng, gen)


def _final(x: Tensor, lr_size: tuple[int, int], p: DegradationPreset, rng: random.Random) -> Tensor:
    sinc = random_final_sinc(rng, p.final_sinc_prob)
    mode = rng.choice(p.final_modes)
    if rng.random() < 0.5:
        out = blur(resize(x, lr_size, mode), sinc)
        return _random_jpeg(out, p.jpeg2, rng, p.jpeg_codec)
    out = _random_jpeg(x, p.jpeg2, rng, p.jpeg_codec)
    return blur(resize(out, lr_size, mode), sinc)


def _sample_rng(generator: torch.Generator | None) -> random.Random:
    device = generator.device if generator is not None else "cpu"
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=device).item()
    return random.Random(seed)


def degrade_one(hr: Tensor, scale: int, preset: DegradationPreset, rng: random.Random,
                generator: torch.Generator | None = None) -> Tensor:
    """Degrade one image ``[1,3,H,W]`` with parameters from ``rng`` and noise from ``generator``."""
    lr_size = (hr.shape[-2] // scale, hr.shape[-1] // scale)
    if preset.clean:
        return quantise(hr if scale == 1 else F.interpolate(hr, size=lr_size, mode="bicubic", antialias=True))
    out = _stage1(hr, preset, rng, generator)
    out = _stage2(out, lr_size, preset, rng, generator)
    return quantise(_final(out, lr_size, preset, rng))


def ground_truth(hr: Tensor, preset: str | DegradationPreset) -> Tensor:
    """The training target for ``hr``: itself, or its unsharp-masked copy when the preset says ``usm_gt``."""
    return usm_sharpen(hr) if get_preset(preset).usm_gt else hr


def degrade(hr: Tensor, scale: int = 4, preset: str | DegradationPreset = FTSR_RELEASE,
            generator: torch.Generator | None = None) -> Tensor:
    """Second-order degradation of HR images ``[B,3,H,W]`` (0..1) into LR ``[B,3,H/scale,W/scale]``.

    Every sample draws its own parameters. Samples run one after another, since the random resizes give
    them different intermediate sizes (the building blocks ``blur``/``add_*_noise``/``jpeg`` are batched).
    The output is quantised to 1/255. ``generator`` (CPU or on ``hr.device``) makes it reproducible;
    ``None`` uses torch's global RNG. With ``preset.usm_gt`` the caller degrades (and trains on) the
    sharpened ground truth: see ``ground_truth``.
    """
    if hr.ndim != 4 or hr.shape[1] != 3:
        raise ValueError(f"expected HR images [B,3,H,W], got shape {tuple(hr.shape)}")
    h, w = hr.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(f"HR size {h}x{w} is not divisible by the scale {scale}; crop it first")
    p = get_preset(preset)
    x = hr.float()
    out = [degrade_one(x[i:i + 1], scale, p, _sample_rng(generator), generator) for i in range(x.shape[0])]
    return torch.cat(out).to(hr.dtype if hr.is_floating_point() else torch.float32)
