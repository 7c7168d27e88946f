"""One-step denoising constants: the x0 estimate at a fixed timestep.

The release calls a DDPM scheduler's `step` with sd-turbo's schedule, which with diffusers <= 0.31
returns the x0 estimate and with >= 0.32 raises. We use the closed form directly:
    z_H = (z_L - sqrt(1 - abar_t) * eps) / sqrt(abar_t)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# name -> (beta_start, beta_end, train steps); both are "scaled_linear".
SCHEDULES: dict[str, tuple[float, float, int]] = {
    "release": (0.00085, 0.012, 1000),  # sd-turbo's DDPM schedule, what the release used
    "kolors": (0.00085, 0.014, 1100),   # Kolors' own scheduler config
}


def alphas_cumprod(schedule: str) -> torch.Tensor:
    """Cumulative product of (1 - beta) for a named scaled-linear schedule, float64."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {sorted(SCHEDULES)}")
    start, end, steps = SCHEDULES[schedule]
    betas = torch.linspace(start ** 0.5, end ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


@dataclass(frozen=True)
class OneStep:
    """Coefficients of the one-step x0 estimate at `timestep` of `schedule`."""

    schedule: str = "release"
    timestep: int = 200

    @property
    def alpha_bar(self) -> float:
        return float(alphas_cumprod(self.schedule)[self.timestep])

    def x0(self, z_t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0 estimate from the noisy latent and the predicted noise."""
        abar = self.alpha_bar
        return (z_t - math.sqrt(1.0 - abar) * eps) / math.sqrt(abar)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward diffusion q(z_t | x0) at this timestep, the inverse of `x0` (the pipeline adds no noise: it
        denoises the LR latent as it is)."""
        abar = self.alpha_bar
        return math.sqrt(abar) * x0 + math.sqrt(1.0 - abar) * noise
