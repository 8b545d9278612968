import torch

from .base import LOSS_WEIGHTINGS, LossWeighting


@LOSS_WEIGHTINGS.register("snr+1")
class SNRPlusOne(LossWeighting):
    """SNR+1 (Salimans & Ho 2022): x0-weight SNR + 1, i.e. the plain v-prediction loss."""

    def x0_weight(self, snr: torch.Tensor) -> torch.Tensor:
        return snr + 1.0
