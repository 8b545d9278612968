import torch

from .base import LOSS_WEIGHTINGS, LossWeighting


@LOSS_WEIGHTINGS.register("min-snr")
class MinSNR(LossWeighting):
    """Min-SNR-gamma (Hang et al. 2023): x0-weight min(SNR, gamma); gamma=5 is the paper's default."""

    def __init__(self, gamma: float = 5.0):
        if not gamma > 0:  # also rejects NaN
            raise ValueError(f"weighting.gamma must be > 0 for min-snr, got {gamma}")
        self.gamma = gamma

    def x0_weight(self, snr: torch.Tensor) -> torch.Tensor:
        return snr.clamp(max=self.gamma)
