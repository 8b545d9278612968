"""Loss weighting registry: `build_weighting("min-snr", gamma=5)`; one file per method."""

from . import min_snr, p2, snr_plus_one, truncated_snr, uniform  # noqa: F401  (registers the methods)
from .base import LOSS_WEIGHTINGS, PREDICTION_TARGETS, LossWeighting, target_factor


def build_weighting(name: str, **options) -> LossWeighting:
    cls = LOSS_WEIGHTINGS.get(name)
    try:
        return cls(**options)
    except TypeError as err:
        raise ValueError(f"weighting {name!r} got unsupported options {sorted(options)}: {err}") from None


__all__ = ["LOSS_WEIGHTINGS", "PREDICTION_TARGETS", "LossWeighting", "build_weighting", "target_factor"]
