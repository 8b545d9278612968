"""Merge-weight search (DeMe Eq. 8): Ray Tune trials, each merging the task vectors in memory and scoring FID.

A trial is a plain function. Optuna (TPE, seeded) proposes the weights; each trial is an MLflow child run of the
search's run. The base weights and task vectors go into Ray's object store once (`tune.with_parameters`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import torch
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from ant_ray.config import PipelineConfig
from ant_ray.diffusion import load_model, model_denoiser
from ant_ray.evaluation import FIDScorer, metric_name
from ant_ray.merge import TaskVectorMerger
from ant_ray.tracking import TrackedRun


def weight_names(n: int) -> list[str]:
    return [f"w{i}" for i in range(n)]


def merge_trial(config: dict[str, Any], *, cfg_dump: dict, base_model: str, base_state: dict,
                task_vectors: list[dict], cache_dir: str, experiment_id: str, parent: dict) -> None:
    cfg = PipelineConfig.model_validate(cfg_dump)
    weights = [float(config[name]) for name in weight_names(len(task_vectors))]
    scorer = FIDScorer(cfg, Path(cache_dir))
    model = load_model(base_model).to(scorer.device).eval()
    merger = TaskVectorMerger.from_task_vectors(base_state, task_vectors, method=cfg.merge_search.method)
    model.load_state_dict(merger.merge(weights))
    run = TrackedRun.start(parent["tracking_uri"], experiment_id, f"merge-trial-{tune.get_context().get_trial_id()}",
                           parent_run_id=parent["run_id"], tags={"ant_ray.stage": "merge_trial"})
    run.log_params({**{n: w for n, w in zip(weight_names(len(weights)), weights)},
                    "method": cfg.merge_search.method})
    try:
        fid = scorer.score(model_denoiser(model))
    except Exception:
        run.finish("FAILED")
        raise
    run.log_metrics({scorer.metric: fid})
    run.finish()
    tune.report({scorer.metric: fid, "weights": weights})


def search_merge_weights(cfg: PipelineConfig, *, base_model: Path, task_vectors: list[dict], cache_dir: Path,
                         experiment_id: str, parent: dict, name: str) -> tuple[list[float], float, int]:
    """Returns (best weights, best FID, number of trials run)."""
    ms = cfg.merge_search
    n = len(task_vectors)
    metric = metric_name(cfg)
    space = {w: optuna.distributions.FloatDistribution(ms.weight_low, ms.weight_high) for w in weight_names(n)}
    # Start from plain task arithmetic (every weight 1, clipped into the range): DeMe's natural first guess.
    start = {w: min(max(1.0, ms.weight_low), ms.weight_high) for w in weight_names(n)}
    searcher = OptunaSearch(space=space, metric=metric, mode="min", points_to_evaluate=[start],
                            sampler=optuna.samplers.TPESampler(seed=cfg.seed), study_name=name)
    base_state = {k: v.detach().cpu() for k, v in load_model(base_model).state_dict().items()}
    trainable = tune.with_parameters(merge_trial, cfg_dump=cfg.model_dump(mode="json"), base_model=str(base_model),
                                     base_state=base_state, task_vectors=task_vectors, cache_dir=str(cache_dir),
                                     experiment_id=experiment_id, parent=parent)
    resources = {"cpu": ms.resources.cpu, "gpu": ms.resources.gpu}
    tuner = tune.Tuner(
        tune.with_resources(trainable, resources),
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=ms.num_trials,
                                    max_concurrent_trials=ms.max_concurrent),
        run_config=tune.RunConfig(name=name, storage_path=str(cfg.output_path() / "ray_results"),
                                  verbose=1),
    )
    results = tuner.fit()
    if results.num_errors:
        raise RuntimeError(f"{results.num_errors} merge trials failed: {[str(e) for e in results.errors]}")
    best = results.get_best_result(metric=metric, mode="min")
    return [float(w) for w in best.metrics["weights"]], float(best.metrics[metric]), len(results)


def load_state_dict_cpu(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in load_model(folder).state_dict().items()}
