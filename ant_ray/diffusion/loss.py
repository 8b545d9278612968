"""The per-sample diffusion training loss: weighted MSE of the model's prediction target, plus IDDPM's
variational-bound term for a learned-sigma model (its output has 2C channels: [prediction; variance])."""

from __future__ import annotations

from typing import Callable

import torch

from .schedules import NoiseSchedule
from .variational_bound import vb_terms, vb_weight as default_vb_weight
from .weightings import LossWeighting, target_factor

# A denoiser maps (x_t, t) to the model's prediction (epsilon, v or x0, per config); a conditional one takes
# (x_t, t, cond) and treats cond=None as unconditional (guidance.ConditionalDenoiser, samplers.model_denoiser).
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
                  schedule: NoiseSchedule, *, target: str, weighting: LossWeighting,
                  vb_weight: float | None = None) -> torch.Tensor:
    """Weighted per-sample loss [B] of a prediction already made for x_t = add_noise(x0, noise, t).

    A learned-sigma prediction (2C channels for C-channel data) adds the variational-bound term, times
    `vb_weight` (default T / 1000, IDDPM's lambda = 0.001; see variational_bound.py), to the weighted MSE of its
    first C channels: the loss weighting acts on L_simple only, the bound trains the variance only."""
    channels = x0.shape[1]
    mean_output, variance_output = prediction[:, :channels], prediction[:, channels:]
    if variance_output.shape[1] not in (0, channels):
        raise ValueError(f"a prediction of {prediction.shape[1]} channels fits neither {channels}-channel data nor "
                         f"learned sigma ({2 * channels} channels)")
    weights = weighting(schedule.snr().to(x0.device)[t.to(x0.device)], target).float()
    loss = weights * per_sample_loss(mean_output, prediction_target(target, x0, noise, t, schedule))
    if variance_output.shape[1] == 0:
        return loss
    bound = vb_terms(mean_output, variance_output, x0, schedule.add_noise(x0, noise, t), t, schedule,
                              target=target)
    return loss + (default_vb_weight(schedule) if vb_weight is None else vb_weight) * bound


def diffusion_loss(denoiser: Denoiser, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                   schedule: NoiseSchedule, *, target: str, weighting: LossWeighting,
                   cond: torch.Tensor | None = None, vb_weight: float | None = None) -> torch.Tensor:
    """Weighted per-sample loss [B]; MTL methods group it by timestep cluster, plain training takes the mean.
    `cond` (e.g. labels after `drop_labels`) goes to a conditional denoiser; without it the call is (x_t, t)."""
    x_t = schedule.add_noise(x0, noise, t)
    prediction = denoiser(x_t, t) if cond is None else denoiser(x_t, t, cond)
    return weighted_loss(prediction, x0, t, noise, schedule, target=target, weighting=weighting, vb_weight=vb_weight)
