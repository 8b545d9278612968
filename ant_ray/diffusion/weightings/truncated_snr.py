import torch

from .base import LOSS_WEIGHTINGS, LossWeighting


@LOSS_WEIGHTINGS.register("truncated-snr")
class TruncatedSNR(LossWeighting):
    """Truncated SNR (Salimans & Ho 2022): x0-weight max(SNR, 1), so the weight never falls to 0."""

    def x0_weight(self, snr: torch.Tensor) -> torch.Tensor:
        return snr.clamp(min=1.0)
