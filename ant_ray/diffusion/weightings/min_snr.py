import torch

from ant_ray.plugin_options import check_weighting_options

from .base import LOSS_WEIGHTINGS, LossWeighting


@LOSS_WEIGHTINGS.register("min-snr")
class MinSNR(LossWeighting):
    """Min-SNR-gamma (Hang et al. 2023): x0-weight min(SNR, gamma); gamma=5 is the paper's default."""

    def __init__(self, gamma: float = 5.0):
        self.gamma = check_weighting_options("min-snr", {"gamma": gamma})["gamma"]

    def x0_weight(self, snr: torch.Tensor) -> torch.Tensor:
        return snr.clamp(max=self.gamma)
