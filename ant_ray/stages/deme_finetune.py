"""DeMe finetuning: N range specialists of a base model trained side by side in ONE Ray Train run (worker group g
trains specialist g, or `finetune.specialists_per_worker` of them in turn), then saved as task vectors with their
range, p, lambda and the base's fingerprint.

Also the plain finetune baselines of DeMe's comparison (one model on all of [0, T)), launched as background Ray
tasks so several run at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import ray

from ant_ray.config import PipelineConfig
from ant_ray.evaluation_plan import EvaluationPlan
from ant_ray.merge import save_task_vector, state_dict_fingerprint
from ant_ray.stages.ray_train import fit
from ant_ray.stages.train_loops import diffusion_loop
from ant_ray.training import check_finite_weights


@dataclass
class SpecialistsResult:
    models: list[Path]  # each specialist's EMA model (diffusers folder)
    task_vectors: list[Path]  # safetensors, one per specialist
    ranges: list[tuple[int, int]]
    fid: float | None = None  # the last in-loop score of the merged model (with an evaluation plan)
    weights: list[float] | None = None  # the merge weights that score used


def finetune_seed(cfg: PipelineConfig) -> int:
    return cfg.finetune.seed if cfg.finetune.seed is not None else cfg.seed + 1


def finetune_specialists(cfg: PipelineConfig, *, base_model: Path, ranges: Sequence[tuple[int, int]], run_dir: Path,
                         name: str, trackings: Sequence[dict | None], evaluation: EvaluationPlan | None = None,
                         callbacks: Sequence[Any] = (), storage: Path | None = None,
                         max_failures: int = 0) -> SpecialistsResult:
    """Train the specialists (resuming the run ``name`` under ``storage`` if it was interrupted; skipped when every
    specialist's model is already saved) and write their task vectors into ``run_dir/task_vectors``."""
    from ant_ray.diffusion.models import load_model, model_is_complete  # diffusers: not needed to launch the run

    outputs = [run_dir / "finetune" / f"specialist_{i}" / "model" for i in range(len(ranges))]
    summary: dict[str, Any] = {}
    if not all(model_is_complete(out) for out in outputs):
        models = [{"range": list(time_range), "init_model": str(base_model), "teacher_model": str(base_model),
                   "output_model": str(out), "tracking": tracking, "seed": finetune_seed(cfg) + i,
                   "name": f"{name}-specialist-{i}"}
                  for i, (time_range, out, tracking) in enumerate(zip(ranges, outputs, trackings))]
        loop = {"pipeline": cfg.worker_dump(), "section": "finetune", "name": name, "models": models,
                "models_per_worker": cfg.finetune.specialists_per_worker,
                "evaluation": evaluation.dump() if evaluation is not None else None}
        result = fit(diffusion_loop, loop, name=name, storage=storage or cfg.output_path() / "ray_results",
                     resources=cfg.finetune.resources, models=len(models), callbacks=callbacks,
                     max_failures=max_failures)
        summary = result.return_value or {}

    base_state = load_model(base_model).state_dict()
    fingerprint = state_dict_fingerprint(base_state)
    task_vectors = []
    for i, (folder, (a, b)) in enumerate(zip(outputs, ranges)):
        state = load_model(folder).state_dict()
        check_finite_weights(state, f"specialist {i} ({folder})")
        path = run_dir / "task_vectors" / f"specialist_{i}.safetensors"
        save_task_vector(path, base_state, state, {"range": (a, b), "p": cfg.finetune.p,
                                                   "lambda": cfg.finetune.consistency_weight,
                                                   "base_fingerprint": fingerprint})
        task_vectors.append(path)
    return SpecialistsResult(models=outputs, task_vectors=task_vectors, ranges=[tuple(r) for r in ranges],
                             fid=summary.get("fid"), weights=summary.get("weights"))


@ray.remote(num_cpus=0)
def _fit_plain(cfg_dump: dict, name: str, storage: str, model: dict) -> str:
    """An orchestration task only: the trainer's workers hold the declared resources."""
    cfg = PipelineConfig.model_validate(cfg_dump)
    fit(diffusion_loop, {"pipeline": cfg_dump, "section": "finetune", "name": name, "models": [model],
                          "evaluation": None},
        name=name, storage=Path(storage), resources=cfg.finetune.resources)
    return model["output_model"]


def finetune_plain(cfg: PipelineConfig, *, base_model: Path, out: Path, name: str,
                   tracking: dict | None) -> ray.ObjectRef:
    """A plain finetune of the whole model on all of [0, T) with the finetune section's settings (no consistency
    loss): the baseline DeMe compares against. Returns a Ray reference to the output folder."""
    model = {"range": None, "init_model": str(base_model), "teacher_model": None, "output_model": str(out),
             "tracking": tracking, "seed": finetune_seed(cfg), "name": name}
    return _fit_plain.remote(cfg.worker_dump(), name, str(cfg.output_path() / "ray_results"), model)
