import torch

from .base import LOSS_WEIGHTINGS, LossWeighting, target_factor


@LOSS_WEIGHTINGS.register("uniform")
class Uniform(LossWeighting):
    """The 'simple' loss: weight 1 on whatever the model predicts (for epsilon this is DDPM's L_simple,
    i.e. x0-weight SNR(t))."""

    def __call__(self, snr: torch.Tensor, target: str) -> torch.Tensor:
        target_factor(snr, target)  # validates the target name
        return torch.ones_like(snr)
