"""The model's prediction target (epsilon, v or x0) turned back into (x0, eps) at x_t = a x0 + s eps."""

from __future__ import annotations

import torch


def predict_x0_eps(prediction: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor, s: torch.Tensor,
                   target: str) -> tuple[torch.Tensor, torch.Tensor]:
    if target == "epsilon":
        eps = prediction
        x0 = (x_t - s * eps) / a
    elif target == "x0":
        x0 = prediction
        eps = (x_t - a * x0) / s
    elif target == "v":
        x0 = a * x_t - s * prediction
        eps = s * x_t + a * prediction
    else:
        raise ValueError(f"diffusion.prediction must be epsilon, v or x0, got {target!r}")
    return x0, eps
