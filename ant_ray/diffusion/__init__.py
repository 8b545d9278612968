"""Diffusion core: noise schedules, loss weightings, the training loss, samplers and model presets."""

from .loss import Denoiser, diffusion_loss, per_sample_loss, prediction_target, weighted_loss
from .models import (PRESETS, build_model, check_model_folder, count_parameters, load_model, model_is_complete,
                     save_model)
from .samplers import SAMPLERS, model_denoiser, routed_denoiser, sample_images, timestep_grid
from .schedules import SCHEDULES, NoiseSchedule
from .weightings import LOSS_WEIGHTINGS, PREDICTION_TARGETS, build_weighting

__all__ = [
    "Denoiser", "diffusion_loss", "weighted_loss", "per_sample_loss", "prediction_target", "PRESETS", "build_model",
    "check_model_folder", "count_parameters", "load_model", "model_is_complete", "save_model", "SAMPLERS",
    "model_denoiser", "routed_denoiser", "sample_images", "timestep_grid", "SCHEDULES", "NoiseSchedule",
    "LOSS_WEIGHTINGS", "PREDICTION_TARGETS", "build_weighting",
]
