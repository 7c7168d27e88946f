"""One-step denoising constants and exact x0 recovery."""

import pytest
import torch

from tadisr_core.schedule import OneStep, alphas_cumprod


def test_alpha_bar_matches_the_release_and_kolors():
    assert OneStep("release", 200).alpha_bar == pytest.approx(0.7536917, abs=1e-6)
    assert OneStep("kolors", 200).alpha_bar == pytest.approx(0.7528866, abs=1e-6)
    assert len(alphas_cumprod("kolors")) == 1100


def test_matches_diffusers_ddpm_scheduler():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    assert OneStep().alpha_bar == pytest.approx(float(sched.alphas_cumprod[200]), abs=1e-6)


def test_exact_x0_recovery_with_the_true_noise():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(2, 4, 8, 8, generator=g,
                                                                                       dtype=torch.float64)
    step = OneStep()
    assert torch.allclose(step.x0(step.add_noise(x0, eps), eps), x0, atol=1e-12)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown schedule"):
        OneStep("cosine").alpha_bar
