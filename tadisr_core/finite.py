"""Finite-or-refused checks for weights, conditioning, input pixels and model outputs, and the one check
of an input image (`check_input_image`: shape, dtype, finite values, the 0..1 convention).

NaN, Inf or absurd magnitudes anywhere in the weights make every output pixel NaN, which an 8-bit
writer turns into a black image without a word. These checks turn that into one error naming the
file (or tile) and the first bad key.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import torch

from .descriptor import DESCRIPTOR

MAX_WEIGHT = 1e4      # |w| of any stored weight; trained SD/Kolors weights stay far below this


class NonFiniteError(ValueError):
    """A tensor holds NaN, Inf or out-of-range values; the message names where."""


FP8_CHUNK = 1 << 22   # elements of an fp8 tensor upcast at a time (16 MiB of float32)


def _range(t: torch.Tensor) -> tuple[float, float]:
    """(min, max) of `t`, NaN when it holds one. fp8 tensors (torch has no aminmax for them) are read
    in float32 chunks of `FP8_CHUNK` elements, which bounds the memory the check takes."""
    t = t.detach()
    if not t.numel():
        return 0.0, 0.0
    if t.element_size() > 1:
        lo, hi = torch.aminmax(t)
        return float(lo), float(hi)
    lo, hi = torch.tensor(math.inf), torch.tensor(-math.inf)
    for part in t.reshape(-1).split(FP8_CHUNK):
        a, b = torch.aminmax(part.float())
        lo, hi = torch.minimum(lo, a), torch.maximum(hi, b)  # NaN wins, as in aminmax
    return float(lo), float(hi)


def tensor_problem(t: torch.Tensor, limit: float | None = MAX_WEIGHT, *, floating: bool = True) -> str | None:
    """What is wrong with one tensor (None when fine): integer dtype, NaN, Inf, or |value| > `limit`."""
    if floating and not t.is_floating_point():
        return f"has integer dtype {str(t.dtype).replace('torch.', '')} where floating-point weights belong"
    if not t.is_floating_point() or t.numel() == 0 or t.device.type == "meta":
        return None
    lo, hi = _range(t)
    if math.isnan(lo) or math.isnan(hi):
        return "contains NaN"
    if math.isinf(lo) or math.isinf(hi):
        return "contains Inf"
    if limit is not None and max(-lo, hi) > limit:
        return f"holds |value| {max(-lo, hi):.3g}, above the sane limit {limit:g}"
    return None


def first_problem(named: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                  limit: float | None = MAX_WEIGHT, *, floating: bool = True) -> tuple[str, str] | None:
    """(key, problem) of the first bad tensor in iteration order, or None."""
    items = named.items() if isinstance(named, Mapping) else named
    for key, t in items:
        problem = tensor_problem(t, limit, floating=floating)
        if problem:
            return key, problem
    return None


DAMAGED = "the weights or the input are damaged (check the checkpoint with `tadisr inspect`)"


def check_finite(t: torch.Tensor | Sequence[torch.Tensor], what: str, cause: str = DAMAGED) -> None:
    """Raise NonFiniteError naming `what` and the likely `cause` if `t` (or any of several tensors)
    holds NaN or Inf.

    Cheap on the happy path: one float32 sum per tensor; the count is taken only on failure.
    """
    for x in (t,) if isinstance(t, torch.Tensor) else t:
        if x.is_floating_point() and x.numel() and not bool(torch.isfinite(x.sum(dtype=torch.float32))):
            bad = int((~torch.isfinite(x)).sum())
            if bad:
                raise NonFiniteError(f"{what}: {bad} non-finite value(s) (NaN/Inf); {cause}")


BAD_INPUT = "the image holds NaN or Inf pixels: fix or replace it"
RANGE_SLACK = 0.5  # values this far outside 0..1 are another convention, not a filter's overshoot (clamped)


def check_input_image(image: torch.Tensor, what: str = "input image") -> None:
    """ValueError (NonFiniteError for NaN/Inf) naming `what` when `image` is not a float [B, C, H, W]
    image in 0..1 (C = 1, 3 or 4), TypeError when it is no tensor at all; values up to `RANGE_SLACK`
    outside 0..1 pass (clamped by the user)."""
    channels = DESCRIPTOR.input_channels
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"the {what}: expected a torch tensor [B, C, H, W] in 0..1, got {type(image).__name__} "
                        f"(a file: images.load_image(path); a PIL image or HWC uint8 array a: "
                        f"torch.from_numpy(numpy.asarray(a)).permute(2, 0, 1)[None].float() / 255)")
    if image.ndim != 4 or image.shape[1] not in channels:
        raise ValueError(f"expected an image [B, C, H, W] with C in {', '.join(map(str, channels))} (gray, RGB, "
                         f"RGBA), got {tuple(image.shape)}")
    if not image.is_floating_point():
        raise ValueError(f"the {what}: expected a float image in 0..1, got {str(image.dtype).removeprefix('torch.')} "
                         f"(divide a 0..255 image by 255)")
    if 0 in image.shape[-2:]:
        raise ValueError(f"the {what} is empty ({image.shape[-1]} x {image.shape[-2]} pixels)")
    check_unit_range(image, what, BAD_INPUT, f"the {what}'s", "the model reads")


def check_unit_range(image: torch.Tensor, what: str, cause: str, whose: str, reader: str) -> None:
    """The values of an image meant for 0..1: NonFiniteError (`check_finite`, naming `what` and `cause`) for
    NaN/Inf, ValueError ("{whose} values span lo..hi, but {reader} 0..1: ...") when they lie more than
    `RANGE_SLACK` outside 0..1 (another convention: clamped, a 0..255 image would be near white)."""
    check_finite(image, what, cause)
    if image.numel():
        lo, hi = (float(v) for v in torch.aminmax(image))
        if lo < -RANGE_SLACK or hi > 1 + RANGE_SLACK:
            raise ValueError(f"{whose} values span {lo:.3g}..{hi:.3g}, but {reader} 0..1: map a -1..1 image with "
                             "(x + 1) / 2 and a 0..255 one with x / 255")
