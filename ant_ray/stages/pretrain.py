"""Pretraining, cached: the base model every DeMe stage starts from when `model.base` is a preset name.

The cache entry is keyed by what changes the result (data, diffusion, model, the pretrain recipe, the seed) and is
published atomically under a lock, so runs that share an output directory share the cache safely: the second one
waits for the first to finish building an entry and then reuses it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ant_ray.config import PipelineConfig
from ant_ray.diffusion import load_model, model_is_complete
from ant_ray.files import publishing_folder
from ant_ray.stages.ray_train import fit
from ant_ray.stages.train_loops import diffusion_loop
from ant_ray.training import check_finite_weights

# Fields that change what pretraining produces; resources and logging cadence do not.
_PRETRAIN_IDENTITY = ("data", "diffusion", "model")
_TRAIN_IGNORED = {"resources", "log_every", "checkpoint_every"}


def pretrain_key(cfg: PipelineConfig) -> str:
    identity = {k: getattr(cfg, k).model_dump(mode="json") for k in _PRETRAIN_IDENTITY}
    identity["pretrain"] = cfg.pretrain.model_dump(mode="json", exclude=_TRAIN_IGNORED)
    identity["seed"] = cfg.seed
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def cached_pretrained_path(cfg: PipelineConfig) -> Path:
    return cfg.output_path() / "cache" / "pretrained" / pretrain_key(cfg)


@contextmanager
def cache_lock(entry: Path) -> Iterator[None]:
    """An exclusive lock on one cache entry (a file in cache/locks/), held while the entry is built."""
    locks = entry.parent.parent / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{entry.parent.name}-{entry.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def publish_folder(source: Path, target: Path) -> Path:
    """Copy ``source`` to ``target`` whole (a private temporary folder, then one rename): no reader ever sees a
    half-copied model."""
    with publishing_folder(target) as temporary:
        shutil.copytree(source, temporary, dirs_exist_ok=True)
    return target


def pretrained_model(cfg: PipelineConfig, *, run_dir: Path, tracking: dict | None) -> tuple[Path, bool]:
    """The pretrained base model folder, trained now or reused from the cache. Returns (folder, reused)."""
    cached = cached_pretrained_path(cfg)
    if model_is_complete(cached):
        return cached, True
    with cache_lock(cached):
        if model_is_complete(cached):  # another run built it while this one waited
            return cached, True
        out = run_dir / "pretrain" / "model"
        model = {"range": None, "init_model": None, "teacher_model": None, "output_model": str(out),
                 "tracking": tracking, "seed": cfg.seed, "name": "pretrain"}
        fit(diffusion_loop, {"pipeline": cfg.worker_dump(), "section": "pretrain",
                              "name": f"pretrain-{pretrain_key(cfg)}", "models": [model], "evaluation": None},
            name=f"pretrain-{pretrain_key(cfg)}", storage=cfg.output_path() / "ray_results",
            resources=cfg.pretrain.resources)
        check_finite_weights(load_model(out).state_dict(), f"the pretrained model {out}")
        return publish_folder(out, cached), False
