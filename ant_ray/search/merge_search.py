"""Merge-weight search (DeMe Eq. 8): Ray Tune trials, each merging the task vectors in memory and scoring FID.

Two searchers over the same trial function:
- `optuna`: seeded TPE (OptunaSearch), starting from plain task arithmetic (every weight 1);
- `grid`: DeMe's baseline (Sec. 8), a coarse grid over [low, high] then a finer grid within one coarse step of the
  coarse optimum.
A trial is a plain function and an MLflow child run of the search's run. The base weights and the task vectors go
into Ray's object store once (`tune.with_parameters`); no checkpoint is written per candidate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from ant_ray.config import PipelineConfig
from ant_ray.diffusion import load_model, model_denoiser
from ant_ray.evaluation import FIDScorer, metric_name
from ant_ray.merge import TaskVectorMerger
from ant_ray.tracking import TrackedRun


@dataclass
class MergeSearchOutcome:
    weights: Any  # [N floats], or {group: [N floats]} with layer groups
    fid: float
    trials: int
    images_generated: int  # by the whole search
    images_to_best: int  # generated until the best trial finished (trials in launch order)


def parameter_names(n: int, groups: list[str] | None) -> list[str]:
    if groups is None:
        return [f"w{i}" for i in range(n)]
    return [f"{g}.w{i}" for g in groups for i in range(n)]


def weights_from_params(params: dict[str, float], n: int, groups: list[str] | None) -> Any:
    if groups is None:
        return [float(params[f"w{i}"]) for i in range(n)]
    return {g: [float(params[f"{g}.w{i}"]) for i in range(n)] for g in groups}


def merge_trial(config: dict[str, Any], *, cfg_dump: dict, base_model: str, base_state: dict,
                task_vectors: list[dict], cache_dir: str, experiment_id: str, parent: dict) -> None:
    cfg = PipelineConfig.model_validate(cfg_dump)
    groups = list(cfg.merge_search.layer_groups) if cfg.merge_search.layer_groups else None
    names = parameter_names(len(task_vectors), groups)
    weights = weights_from_params(config, len(task_vectors), groups)
    run = TrackedRun.start(parent["tracking_uri"], experiment_id, f"merge-trial-{tune.get_context().get_trial_id()}",
                           parent_run_id=parent["run_id"], tags={"ant_ray.stage": "merge_trial"})
    run.log_params({**{n: config[n] for n in names}, "method": cfg.merge_search.method})
    try:
        scorer = FIDScorer(cfg, Path(cache_dir))
        model = load_model(base_model).to(scorer.device).eval()
        merger = TaskVectorMerger.from_task_vectors(base_state, task_vectors, **cfg.merge_search.merge_options())
        model.load_state_dict(merger.merge(weights))
        fid = scorer.score(model_denoiser(model))
    except Exception:
        run.finish("FAILED")
        raise
    run.log_metrics({scorer.metric: fid})
    run.finish()
    tune.report({scorer.metric: fid, "images": cfg.fid.num_samples})


def _grid_axis(low: float, high: float, step: float) -> list[float]:
    count = int(np.floor((high - low) / step + 1e-9)) + 1
    return [round(low + i * step, 10) for i in range(count)]


def _run_tuner(cfg: PipelineConfig, trainable, *, name: str, search_alg=None, param_space=None,
               num_samples: int = 1) -> tune.ResultGrid:
    ms = cfg.merge_search
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": ms.resources.cpu, "gpu": ms.resources.gpu}),
        param_space=param_space,
        tune_config=tune.TuneConfig(search_alg=search_alg, num_samples=num_samples,
                                    max_concurrent_trials=ms.max_concurrent),
        run_config=tune.RunConfig(name=name, storage_path=str(cfg.output_path() / "ray_results"), verbose=1),
    )
    results = tuner.fit()
    if results.num_errors:
        raise RuntimeError(f"{results.num_errors} merge trials failed: {[str(e) for e in results.errors]}")
    return results


def _trial_scores(results: tune.ResultGrid, metric: str) -> list[tuple[dict, float]]:
    """(params, fid) per trial in launch order (Tune lists trials in the order they were created)."""
    return [(dict(r.config), float(r.metrics[metric])) for r in results]


def search_merge_weights(cfg: PipelineConfig, *, base_model: Path, task_vectors: list[dict], cache_dir: Path,
                         experiment_id: str, parent: dict, name: str) -> MergeSearchOutcome:
    ms = cfg.merge_search
    n = len(task_vectors)
    groups = list(ms.layer_groups) if ms.layer_groups else None
    names = parameter_names(n, groups)
    metric = metric_name(cfg)
    base_state = {k: v.detach().cpu() for k, v in load_model(base_model).state_dict().items()}
    trainable = tune.with_parameters(merge_trial, cfg_dump=cfg.model_dump(mode="json"), base_model=str(base_model),
                                     base_state=base_state, task_vectors=task_vectors, cache_dir=str(cache_dir),
                                     experiment_id=experiment_id, parent=parent)
    if ms.searcher == "optuna":
        space = {p: optuna.distributions.FloatDistribution(ms.weight_low, ms.weight_high) for p in names}
        start = {p: min(max(1.0, ms.weight_low), ms.weight_high) for p in names}
        searcher = OptunaSearch(space=space, metric=metric, mode="min", points_to_evaluate=[start],
                                sampler=optuna.samplers.TPESampler(seed=cfg.seed), study_name=name)
        scored = _trial_scores(_run_tuner(cfg, trainable, name=name, search_alg=searcher,
                                          num_samples=ms.num_trials), metric)
    else:
        axis = _grid_axis(ms.weight_low, ms.weight_high, ms.grid_step)
        scored = _trial_scores(_run_tuner(cfg, trainable, name=f"{name}-coarse",
                                          param_space={p: tune.grid_search(axis) for p in names}), metric)
        coarse_best, _ = min(scored, key=lambda item: item[1])
        # Finer grid: within one coarse step of the coarse optimum on every axis, clipped to the range.
        fine = {p: tune.grid_search(_grid_axis(max(ms.weight_low, coarse_best[p] - ms.grid_step),
                                               min(ms.weight_high, coarse_best[p] + ms.grid_step), ms.grid_fine_step))
                for p in names}
        scored += _trial_scores(_run_tuner(cfg, trainable, name=f"{name}-fine", param_space=fine), metric)
    best_index = min(range(len(scored)), key=lambda i: scored[i][1])
    best_params, best_fid = scored[best_index]
    return MergeSearchOutcome(weights=weights_from_params(best_params, n, groups), fid=best_fid, trials=len(scored),
                              images_generated=len(scored) * cfg.fid.num_samples,
                              images_to_best=(best_index + 1) * cfg.fid.num_samples)


def grid_size(cfg: PipelineConfig, n: int) -> int:
    """Trials of the coarse grid alone: (points per axis) ** (number of weights)."""
    ms = cfg.merge_search
    k = len(parameter_names(n, list(ms.layer_groups) if ms.layer_groups else None))
    return len(_grid_axis(ms.weight_low, ms.weight_high, ms.grid_step)) ** k

