"""Model families, one file each (LibMTL ``weighting/`` style): ``get_family("dit").build("dit-tiny", ...)``.

A loop asks the family of its model (``family_of(model)``) and never names a model class; a saved folder names its
family through config.json's ``_class_name`` (``family_of_folder``)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ant_ray.diffusion.presets import preset_family
from ant_ray.files import read_json

from . import dit, unet  # noqa: F401  (registers the families)
from .base import MODEL_FAMILIES, ModelFamily, balanced_labels, drop_labels, unwrap


def get_family(name: str) -> ModelFamily:
    return MODEL_FAMILIES.get(name)()


def family_of(model: nn.Module) -> ModelFamily:
    """The family of a built or loaded model (or of its DDP / compiled wrapper), from its diffusers class."""
    model = unwrap(model)
    return _by_class_name(type(model).__name__, f"model {type(model).__name__}")


def family_of_folder(folder: str | Path) -> ModelFamily:
    """The family of a saved diffusers folder, from config.json's _class_name."""
    config = read_json(Path(folder) / "config.json", fix="delete the folder and re-run the step that writes it")
    return _by_class_name(config.get("_class_name", ""), f"model folder {folder}")


def family_of_preset(base: str) -> ModelFamily | None:
    name = preset_family(base)
    return None if name is None else get_family(name)


def _by_class_name(class_name: str, what: str) -> ModelFamily:
    for name in MODEL_FAMILIES.names():
        if MODEL_FAMILIES.get(name).model_class_name == class_name:
            return get_family(name)
    known = ", ".join(MODEL_FAMILIES.get(name).model_class_name for name in MODEL_FAMILIES.names())
    raise ValueError(f"{what} is a {class_name or 'class-less'} model; the model families know {known}")


__all__ = ["MODEL_FAMILIES", "ModelFamily", "balanced_labels", "drop_labels", "family_of", "family_of_folder",
           "family_of_preset", "get_family", "unwrap"]
