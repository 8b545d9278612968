import torch

from ant_ray.plugin_options import check_weighting_options

from .base import LOSS_WEIGHTINGS, LossWeighting


@LOSS_WEIGHTINGS.register("p2")
class P2(LossWeighting):
    """P2 (Choi et al. 2022): eps-loss weight 1 / (k + SNR)^gamma, i.e. x0-weight SNR / (k + SNR)^gamma.
    k=1, gamma=1 are the authors' recommendation (DeMe Sec. 7.1)."""

    def __init__(self, k: float = 1.0, gamma: float = 1.0):
        options = check_weighting_options("p2", {"k": k, "gamma": gamma})
        self.k, self.gamma = options["k"], options["gamma"]

    def x0_weight(self, snr: torch.Tensor) -> torch.Tensor:
        return snr / (self.k + snr) ** self.gamma
