"""Diffusion core: model families, noise schedules, loss weightings, the training loss (with IDDPM's variational
bound for learned sigma), classifier-free guidance, samplers and model presets.

Names load on first use (PEP 562), so that validating a config, which needs only the weightings, does not import
diffusers."""

import importlib

_WHERE = {
    ".families": ["MODEL_FAMILIES", "ModelFamily", "balanced_labels", "drop_labels", "family_of", "family_of_folder",
                  "family_of_preset", "get_family"],
    ".guidance": ["combine_guidance", "conditioned_denoiser"],
    ".loss": ["Denoiser", "diffusion_loss", "per_sample_loss", "prediction_target", "weighted_loss"],
    ".parameterization": ["predict_x0_eps"],
    ".presets": ["DIT_PRESETS", "FAMILY_PRESETS", "PRESETS"],
    ".models": ["build_model", "check_model_folder", "count_parameters", "load_model", "model_is_complete",
                "save_model"],
    ".samplers": ["SAMPLERS", "model_denoiser", "routed_denoiser", "sample_images", "timestep_grid"],
    ".schedules": ["SCHEDULES", "NoiseSchedule"],
    ".variational_bound": ["vb_terms", "vb_weight"],
    ".weightings": ["LOSS_WEIGHTINGS", "PREDICTION_TARGETS", "build_weighting"],
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}
__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name], __name__), name)
