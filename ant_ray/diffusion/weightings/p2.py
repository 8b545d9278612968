import torch

from .base import LOSS_WEIGHTINGS, LossWeighting


@LOSS_WEIGHTINGS.register("p2")
class P2(LossWeighting):
    """P2 (Choi et al. 2022): eps-loss weight 1 / (k + SNR)^gamma, i.e. x0-weight SNR / (k + SNR)^gamma.
    k=1, gamma=1 are the authors' recommendation (DeMe Sec. 7.1)."""

    def __init__(self, k: float = 1.0, gamma: float = 1.0):
        if not k > 0:  # also rejects NaN
            raise ValueError(f"weighting.k must be > 0 for p2, got {k}")
        if not gamma >= 0:
            raise ValueError(f"weighting.gamma must be >= 0 for p2, got {gamma}")
        self.k, self.gamma = k, gamma

    def x0_weight(self, snr: torch.Tensor) -> torch.Tensor:
        return snr / (self.k + snr) ** self.gamma
