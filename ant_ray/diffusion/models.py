"""Models built from presets (`presets.py`), and saved and loaded in diffusers' folder format (safetensors only).
The work is the model family's (`families/`): a preset names its family, a folder's config.json its class.

A model folder is published whole (`ant_ray.files.publishing_folder`): a folder at the final path is a finished
model. `model_is_complete` also checks the files themselves, so a folder half-written by an older version (which
wrote config.json before the weights) or cut short by a copy counts as unfinished.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ant_ray.diffusion.families import family_of, family_of_folder, family_of_preset
from ant_ray.diffusion.presets import FAMILY_PRESETS
from ant_ray.files import CorruptFileError, check_safetensors, read_json

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_MODEL_FIX = "delete the folder and re-run the step that writes it"


def _preset_names() -> str:
    return ", ".join(name for presets in FAMILY_PRESETS.values() for name in presets)


def build_model(base: str, *, resolution: int, channels: int, seed: int = 0, **options) -> nn.Module:
    """A preset name builds a fresh model of its family (seeded; `options` such as num_classes or learn_sigma go
    to the family, see plugin_options.MODEL_FAMILY_OPTIONS); anything else is a local diffusers model folder."""
    family = family_of_preset(base)
    if family is not None:
        return family.build(base, resolution=resolution, channels=channels, seed=seed, **options)
    if options:
        raise ValueError(f"model options {sorted(options)} apply to presets only; {base!r} is a model folder")
    return load_model(base, resolution=resolution, channels=channels)


def check_model_folder(folder: str | Path) -> None:
    """Raise unless `folder` holds a whole model: FileNotFoundError if a file is missing, CorruptFileError (one
    line naming the file) if config.json is not a JSON object or a weights file is truncated or garbage."""
    from ant_ray.deme.projection import PROJECTIONS_CONFIG_NAME, PROJECTIONS_WEIGHTS_NAME

    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"model.base {str(folder)!r} is neither a preset ({_preset_names()}) nor a diffusers model folder "
            f"(expected {CONFIG_NAME} and {WEIGHTS_NAME} inside)")
    if not (folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{folder} has no {WEIGHTS_NAME}; only safetensors weights are loaded (convert a "
                                ".bin checkpoint with save_pretrained(safe_serialization=True))")
    read_json(folder / CONFIG_NAME, fix=_MODEL_FIX)
    check_safetensors(folder / WEIGHTS_NAME, fix=_MODEL_FIX)
    projection_files = [folder / PROJECTIONS_CONFIG_NAME, folder / PROJECTIONS_WEIGHTS_NAME]
    present = [path for path in projection_files if path.is_file()]
    if present and len(present) != len(projection_files):
        missing = next(path for path in projection_files if not path.is_file())
        raise CorruptFileError(missing, f"is missing beside {present[0].name}", _MODEL_FIX)
    if present:
        read_json(folder / PROJECTIONS_CONFIG_NAME, fix=_MODEL_FIX)
        check_safetensors(folder / PROJECTIONS_WEIGHTS_NAME, fix=_MODEL_FIX)


def model_is_complete(folder: str | Path) -> bool:
    """Whether `folder` holds a whole saved model (use this, not the presence of config.json, to decide whether
    an output is finished). Reads only the headers: about a millisecond."""
    try:
        check_model_folder(folder)
    except (OSError, ValueError):
        return False
    return True


def load_model(folder: str | Path, *, resolution: int | None = None, channels: int | None = None) -> nn.Module:
    """Load a model folder of any family (with its channel projections if it has them); a missing or damaged
    file is a one-line FileNotFoundError / CorruptFileError naming it."""
    folder = Path(folder)
    check_model_folder(folder)
    family = family_of_folder(folder)
    model = family.load(folder)
    in_channels, height, _ = family.data_shape(model)
    if channels is not None and in_channels != channels:
        raise ValueError(f"model {folder} takes {in_channels} channels but data.channels is {channels}")
    if resolution is not None and height != resolution:
        raise ValueError(f"model {folder} was built for {height}px but data.resolution is {resolution}")
    return model


def save_model(model: nn.Module, folder: str | Path) -> Path:
    """Save in diffusers' format (plus channel projections, if the model has them), published whole: `folder`
    is replaced as a unit and never holds a partial model."""
    return family_of(model).save(model, folder)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
