"""Exact-resume training state on disk without pickles: tensors in safetensors, structure in JSON.

A checkpoint folder holds `model.safetensors`, `ema.safetensors`, `optimizer.safetensors` + `state.json`
(step, optimizer param groups, grad-scaler scale, anything else JSON-able the loop wants back). Randomness in our
loops is derived from (seed, step, rank), so the step alone restores the data order and noise exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ant_ray.files import CorruptFileError, publishing_folder, read_json, read_safetensors
from ant_ray.training.divergence import check_finite_weights

_TENSOR_FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors")
_REQUIRED_FILES = _TENSOR_FILES + ("state.json",)


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in state["state"].items():
        for name, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return _contiguous(tensors), {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        per_param.setdefault(int(idx), {})[name] = value
    for idx, values in meta.get("scalars", {}).items():
        per_param.setdefault(int(idx), {}).update(values)
    optimizer.load_state_dict({"state": per_param, "param_groups": meta["param_groups"]})


def save_training_state(folder: str | Path, *, model: torch.nn.Module, ema: torch.nn.Module,
                        optimizer: torch.optim.Optimizer, step: int, extra: dict | None = None,
                        extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write into a sibling temporary folder, then publish it whole (`ant_ray.files.publishing_folder`): a crash
    never leaves half a checkpoint at `folder`, and a previous checkpoint there stays until the new one replaces
    it. Non-finite weights raise TrainingDiverged and nothing is written."""
    folder = Path(folder)
    # A diverged state is never a checkpoint: a resume from it would only diverge again (or train on from NaN).
    check_finite_weights(model.state_dict(), f"the checkpoint's model for {folder}")
    check_finite_weights(ema.state_dict(), f"the checkpoint's EMA model for {folder}")
    with publishing_folder(folder) as temporary:
        save_file(_contiguous(model.state_dict()), temporary / "model.safetensors")
        save_file(_contiguous(ema.state_dict()), temporary / "ema.safetensors")
        opt_tensors, opt_meta = optimizer_to_tensors(optimizer)
        save_file(opt_tensors, temporary / "optimizer.safetensors")
        if extra_tensors:
            save_file(_contiguous(extra_tensors), temporary / "extra.safetensors")
        (temporary / "state.json").write_text(json.dumps({"step": step, "optimizer": opt_meta, "extra": extra or {}}))
    return folder


def load_training_state(folder: str | Path, *, model: torch.nn.Module, ema: torch.nn.Module,
                        optimizer: torch.optim.Optimizer, device: torch.device | str = "cpu") -> dict:
    """Restore in place; returns the JSON state (`step`, `extra`) and `extra_tensors` if any were saved.

    Every file is checked before anything is restored: a missing, truncated or garbage one is a one-line
    CorruptFileError naming it, and the model and optimizer are then left as they were."""
    folder = Path(folder)
    fix = "delete this checkpoint folder (or the run's whole folder) and re-run"
    for name in _REQUIRED_FILES:
        if not (folder / name).is_file():
            raise CorruptFileError(folder / name, "is missing: the folder is not a training checkpoint", fix)
    meta = read_json(folder / "state.json", fix=fix)
    if not isinstance(meta.get("step"), int) or not isinstance(meta.get("optimizer"), dict):
        raise CorruptFileError(folder / "state.json", "lacks 'step' (an integer) or 'optimizer'", fix)
    extra_path = folder / "extra.safetensors"
    tensors = {name: read_safetensors(folder / name, device=str(device), fix=fix)
               for name in _TENSOR_FILES + (("extra.safetensors",) if extra_path.exists() else ())}
    model.load_state_dict(tensors["model.safetensors"])
    ema.load_state_dict(tensors["ema.safetensors"])
    optimizer_from_tensors(optimizer, tensors["optimizer.safetensors"], meta["optimizer"])
    meta["extra_tensors"] = tensors.get("extra.safetensors", {})
    return meta
