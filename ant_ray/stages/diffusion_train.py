"""Ray Train runs of the diffusion loop: pretraining (cached) and N DeMe specialists concurrently.

Each run is a `TorchTrainer` (Train V2) with declared resources and a unique name under `storage`; re-running with
the same name and storage resumes from its last checkpoint, so an interrupted pipeline picks up where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import ray
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ant_ray.config import PipelineConfig, ResourcesConfig
from ant_ray.deme.ranges import specialist_ranges
from ant_ray.deme.finetune import train_diffusion

# Fields that change what pretraining produces; resources and logging cadence do not.
_PRETRAIN_IDENTITY = ("data", "diffusion", "model")
_TRAIN_IGNORED = {"resources", "log_every", "checkpoint_every"}


def scaling_config(resources: ResourcesConfig) -> ScalingConfig:
    per_worker = {"CPU": resources.cpu}
    if resources.gpu:
        per_worker["GPU"] = resources.gpu
    return ScalingConfig(num_workers=resources.num_workers, use_gpu=resources.gpu > 0,
                         resources_per_worker=per_worker)


def fit_diffusion(cfg: PipelineConfig, *, name: str, storage: Path, section: str, loop: dict[str, Any],
                  max_failures: int = 0) -> None:
    """Run the diffusion loop on Ray Train and raise if it failed."""
    resources = getattr(cfg, section).resources
    trainer = TorchTrainer(
        train_diffusion,
        train_loop_config={"pipeline": cfg.model_dump(mode="json"), "section": section, "name": name, **loop},
        scaling_config=scaling_config(resources),
        run_config=RunConfig(name=name, storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"training run {name!r} failed: {result.error}") from result.error


def pretrain_key(cfg: PipelineConfig) -> str:
    identity = {k: getattr(cfg, k).model_dump(mode="json") for k in _PRETRAIN_IDENTITY}
    identity["pretrain"] = cfg.pretrain.model_dump(mode="json", exclude=_TRAIN_IGNORED)
    identity["seed"] = cfg.seed
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def pretrained_model(cfg: PipelineConfig, *, run_dir: Path, tracking: dict | None) -> tuple[Path, bool]:
    """The pretrained base model folder, trained now or reused from the cache. Returns (folder, reused)."""
    cached = cfg.output_path() / "cache" / "pretrained" / pretrain_key(cfg)
    if (cached / "config.json").is_file():
        return cached, True
    out = run_dir / "pretrain" / "model"
    fit_diffusion(cfg, name=f"pretrain-{pretrain_key(cfg)}", storage=cfg.output_path() / "ray_results",
                  section="pretrain", loop={"range": None, "init_model": None, "teacher_model": None,
                                            "output_model": str(out), "tracking": tracking, "seed": cfg.seed})
    # Publish to the cache atomically: a half-copied folder must never look like a finished model.
    tmp = cached.with_name(cached.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(out, tmp)
    tmp.rename(cached)
    return cached, False


def finetune_seed(cfg: PipelineConfig) -> int:
    return cfg.finetune.seed if cfg.finetune.seed is not None else cfg.seed + 1


@ray.remote(num_cpus=0)
def fit_remote(cfg_dump: dict, name: str, storage: str, loop: dict, section: str = "finetune") -> str:
    """`fit_diffusion` as a Ray task, so several training runs go concurrently. An orchestration task only: the
    trainer's workers hold the declared resources."""
    fit_diffusion(PipelineConfig.model_validate(cfg_dump), name=name, storage=Path(storage), section=section,
                  loop=loop)
    return loop["output_model"]


def finetune_plain(cfg: PipelineConfig, *, base_model: Path, out: Path, name: str,
                   tracking: dict | None) -> ray.ObjectRef:
    """A plain finetune of the whole model on all of [0, T) with the finetune section's settings (no consistency
    loss): the baseline DeMe compares against. Returns a Ray reference to the output folder."""
    loop = {"range": None, "init_model": str(base_model), "teacher_model": None, "output_model": str(out),
            "tracking": tracking, "seed": finetune_seed(cfg)}
    return fit_remote.remote(cfg.model_dump(mode="json"), name, str(cfg.output_path() / "ray_results"), loop)


def finetune_specialists(cfg: PipelineConfig, *, base_model: Path, run_dir: Path, run_key: str,
                         trackings: list[dict | None]) -> list[Path]:
    """Launch all N specialist finetunes at once (each its own Ray Train run) and wait for them. In a resumed run
    a finished specialist (its model folder exists) is kept, and an interrupted one continues from its last
    checkpoint (same Ray Train run name and storage)."""
    pending = []
    for i, time_range in enumerate(specialist_ranges(cfg)):
        out = run_dir / "finetune" / f"specialist_{i}" / "model"
        if (out / "config.json").is_file():
            pending.append(str(out))
            continue
        loop = {"range": list(time_range), "init_model": str(base_model), "teacher_model": str(base_model),
                "output_model": str(out), "tracking": trackings[i], "seed": finetune_seed(cfg) + i}
        pending.append(fit_remote.remote(cfg.model_dump(mode="json"), f"specialist-{run_key}-{i}",
                                          str(cfg.output_path() / "ray_results"), loop))
    return [Path(p if isinstance(p, str) else ray.get(p)) for p in pending]
