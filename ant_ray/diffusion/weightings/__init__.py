"""Loss weighting registry: `build_weighting("min-snr", gamma=5)`; one file per method."""

from ant_ray.plugin_options import check_weighting_options

from . import min_snr, p2, snr_plus_one, truncated_snr, uniform  # noqa: F401  (registers the methods)
from .base import LOSS_WEIGHTINGS, PREDICTION_TARGETS, LossWeighting, target_factor


def build_weighting(name: str, **options) -> LossWeighting:
    check_weighting_options(name, options)  # an unknown name or option: a ValueError listing the accepted ones
    return LOSS_WEIGHTINGS.get(name)(**options)


__all__ = ["LOSS_WEIGHTINGS", "PREDICTION_TARGETS", "LossWeighting", "build_weighting", "target_factor"]
