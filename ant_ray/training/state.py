"""Exact-resume training state on disk without pickles: tensors in safetensors, structure in JSON.

A checkpoint folder holds `model.safetensors`, `ema.safetensors`, `optimizer.safetensors` + `state.json`
(step, optimizer param groups, grad-scaler scale, anything else JSON-able the loop wants back). Randomness in our
loops is derived from (seed, step, rank), so the step alone restores the data order and noise exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


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
    """Write atomically: into a sibling temp folder first, then rename, so a crash never leaves half a checkpoint."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(_contiguous(model.state_dict()), tmp / "model.safetensors")
    save_file(_contiguous(ema.state_dict()), tmp / "ema.safetensors")
    opt_tensors, opt_meta = optimizer_to_tensors(optimizer)
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    if extra_tensors:
        save_file(_contiguous(extra_tensors), tmp / "extra.safetensors")
    (tmp / "state.json").write_text(json.dumps({"step": step, "optimizer": opt_meta, "extra": extra or {}}))
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        os.replace(folder, old)
        os.replace(tmp, folder)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        os.replace(tmp, folder)
    return folder


def load_training_state(folder: str | Path, *, model: torch.nn.Module, ema: torch.nn.Module,
                        optimizer: torch.optim.Optimizer, device: torch.device | str = "cpu") -> dict:
    """Restore in place; returns the JSON state (`step`, `extra`) and `extra_tensors` if any were saved."""
    folder = Path(folder)
    meta = json.loads((folder / "state.json").read_text())
    model.load_state_dict(load_file(folder / "model.safetensors", device=str(device)))
    ema.load_state_dict(load_file(folder / "ema.safetensors", device=str(device)))
    optimizer_from_tensors(optimizer, load_file(folder / "optimizer.safetensors", device=str(device)),
                           meta["optimizer"])
    extra_path = folder / "extra.safetensors"
    meta["extra_tensors"] = load_file(extra_path, device=str(device)) if extra_path.exists() else {}
    return meta
