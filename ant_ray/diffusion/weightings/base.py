"""Timestep loss weightings, written once in x0 terms and converted to the model's prediction target.

DeMe (Sec. 7.1) writes every baseline as E[w(t) ||x0 - x0_hat||^2]. Since ||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2
and ||v - v_hat||^2 = (SNR + 1) ||x0 - x0_hat||^2, the weight on the loss of target y is w(t) / c_y(t) with
c_eps = SNR, c_v = SNR + 1, c_x0 = 1. So one x0-weight per method is correct for every target.
"""

from __future__ import annotations

import torch

from ant_ray.registry import Registry

LOSS_WEIGHTINGS: Registry = Registry("loss weighting")

# SNR reaches 0 only for zero-terminal-SNR schedules; flooring it keeps eps-target weights finite there.
SNR_FLOOR = 1e-8
PREDICTION_TARGETS = ("epsilon", "v", "x0")


def target_factor(snr: torch.Tensor, target: str) -> torch.Tensor:
    """c_y(t): how much larger the loss of target y is than the x0 loss at the same error."""
    if target == "epsilon":
        return snr.clamp_min(SNR_FLOOR)
    if target == "v":
        return snr + 1.0
    if target == "x0":
        return torch.ones_like(snr)
    raise ValueError(f"diffusion.prediction must be one of {PREDICTION_TARGETS}, got {target!r}")


class LossWeighting:
    """Subclasses give the x0-space weight; `__call__` returns the weight on the chosen target's MSE."""

    def x0_weight(self, snr: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, snr: torch.Tensor, target: str) -> torch.Tensor:
        if target == "epsilon":
            # Floor SNR in the x0-weight too, not only in the divisor: w(SNR)/SNR then keeps its limit at SNR -> 0
            # (min-SNR -> 1, P2 -> 1/k^gamma) instead of collapsing to 0/floor = 0.
            snr = snr.clamp_min(SNR_FLOOR)
        return self.x0_weight(snr) / target_factor(snr, target)
