"""The per-sample diffusion training loss: weighted MSE of the model's prediction target."""

from __future__ import annotations

from typing import Callable

import torch

from .schedules import NoiseSchedule
from .weightings import LossWeighting, target_factor

# A denoiser maps (x_t, t) to the model's prediction (epsilon, v or x0, per config).
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def prediction_target(target: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                      schedule: NoiseSchedule) -> torch.Tensor:
    if target == "epsilon":
        return noise
    if target == "x0":
        return x0
    if target == "v":
        a, s = schedule.coefficients(t, x0)
        return a * noise - s * x0
    target_factor(torch.zeros(1), target)  # raises the validation error
    raise AssertionError


def per_sample_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every dimension but the batch one, in float32 even under autocast."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def weighted_loss(prediction: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                  schedule: NoiseSchedule, *, target: str, weighting: LossWeighting) -> torch.Tensor:
    """Weighted per-sample loss [B] of a prediction already made for x_t = add_noise(x0, noise, t)."""
    weights = weighting(schedule.snr().to(x0.device)[t.to(x0.device)], target).float()
    return weights * per_sample_loss(prediction, prediction_target(target, x0, noise, t, schedule))


def diffusion_loss(denoiser: Denoiser, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                   schedule: NoiseSchedule, *, target: str, weighting: LossWeighting) -> torch.Tensor:
    """Weighted per-sample loss [B]; MTL methods group it by timestep cluster, plain training takes the mean."""
    prediction = denoiser(schedule.add_noise(x0, noise, t), t)
    return weighted_loss(prediction, x0, t, noise, schedule, target=target, weighting=weighting)
