"""The ant and deme stages of a search: one Ray Tune run whose trials each train (ant_trial / deme_trial), with an
Optuna searcher (or a grid) and an optional ASHA scheduler over training steps.

A stage keeps everything in its folder: `tune/` is Tune's experiment (restored on resume), `trials/<id>/` each
trial's models and checkpoints, `trials.csv` and `outcome.json` the result once the stage is done.
"""

from __future__ import annotations

import dataclasses
import fcntl
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import ray
from ray import tune

from ant_ray.config import PipelineConfig, TrainingStageSearch
from ant_ray.deme.projection import add_channel_projections
from ant_ray.diffusion import PRESETS, load_model, model_is_complete, save_model
from ant_ray.evaluation import metric_name
from ant_ray.evaluation_plan import EvaluationPlan
from ant_ray.search.callbacks import TrialStatusPrinter, TrialTracker, trial_folder
from ant_ray.search.outcome import SearchStageFailed, StageOutcome, count_fates, fate, finite
from ant_ray.search.searchers import build_optuna_search, build_scheduler
from ant_ray.search.space import grid_param_space, grid_points, optuna_space, trial_values
from ant_ray.search import trials as trial_functions  # its ant_trial, wrapped below
from ant_ray.search.trials import TrainingStageContext, deme_trial, read_trial_result
from ant_ray.search.tune_runs import StageSetup, log_line, run_tune
from ant_ray.stages.ant_train import stage_affinity
from ant_ray.stages.pretrain import pretrained_model
from ant_ray.tracking import TrackedRun

SECTION = {"ant": "ant", "deme": "finetune"}


def cached_stage_affinity(stage_dir: Path, measure: Callable[[], np.ndarray], log: Callable[[str], None]) -> np.ndarray:
    """The ant stage's [B, B] bucket affinity for gradient clustering (it depends on neither k nor the method),
    measured by its first user and kept in the stage folder: trials picking gradient together wait on a lock for
    one measurement, later trials and a resumed search read it. ``measure`` runs stage_affinity."""
    folder = stage_dir / "affinity"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "measure.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        try:
            return np.load(folder / "bucket_affinity.npy")
        except (OSError, ValueError, EOFError):  # not measured yet, or a write cut short by a crash
            pass
        log("measuring task affinity once for the stage")
        return measure()


def _stage_affinity_task(cfg_dump: dict, stage_dir: str, tracking_uri: str, stage_run_id: str) -> np.ndarray:
    cfg = PipelineConfig.model_validate(cfg_dump)
    return stage_affinity(cfg, Path(stage_dir), "stage", TrackedRun(tracking_uri, stage_run_id))[0]


def _measure_from_trial(context: TrainingStageContext) -> np.ndarray:
    """stage_affinity from inside a Tune trial, in a task of its own outside the trial's placement group: that
    group's one bundle (the trial's small driver) cannot hold the measurement's tasks, which hold ant.resources."""
    task = ray.remote(num_cpus=0)(_stage_affinity_task).options(scheduling_strategy="DEFAULT")
    return ray.get(task.remote(context.cfg_dump, context.stage_dir, context.tracking_uri, context.stage_run_id))


def ant_trial(config: dict[str, Any], *, context: TrainingStageContext) -> None:
    """trials.ant_trial, given the stage's affinity when this trial clusters by gradient and the stage has not
    measured it up front (a space where only some trials pick gradient). Named ant_trial because Tune checks the
    trainable's name when it restores a stage."""
    clustering = PipelineConfig.model_validate(context.cfg_dump).ant.clustering
    if context.affinity is None and trial_values(config).get("ant.clustering", clustering) == "gradient":
        affinity = cached_stage_affinity(Path(context.stage_dir), lambda: _measure_from_trial(context), log_line)
        context = dataclasses.replace(context, affinity=affinity.tolist())
    trial_functions.ant_trial(config, context=context)


TRIAL_FUNCTIONS = {"ant": ant_trial, "deme": deme_trial}


def _config_point(cfg: PipelineConfig, settings: TrainingStageSearch) -> dict[str, Any] | None:
    """The config's own values, as the first point to evaluate, when they lie inside the space."""
    point = {}
    for key, dist in settings.space.items():
        node: Any = cfg
        for part in key.split("."):
            node = getattr(node, part)
        value = node.model_dump(mode="json") if hasattr(node, "model_dump") else node
        inside = (value in dist.choices if dist.type == "categorical"
                  else isinstance(value, (int, float)) and dist.low <= value <= dist.high
                  and (dist.type != "int" or (value - dist.low) % dist.step == 0))
        if not inside:
            return None
        point[key] = value
    return point or None


def _deme_base(setup: StageSetup, stage_dir: Path, ant_winner: dict | None) -> str:
    """The model the specialists finetune: the ant winner, else model.base if it is a folder, else the cached
    pretrain; with DeMe's channel projections added (identity, so the base's outputs do not change)."""
    cfg = setup.cfg
    if ant_winner is not None:
        base = Path(ant_winner["model"])
    elif cfg.model.base not in PRESETS:  # a model folder (checked before the search started)
        base = Path(cfg.model.base)
    else:
        pre_run = TrackedRun.start(setup.tracking_uri, setup.experiment_id, "pretrain",
                                   parent_run_id=setup.stage_run.run_id, tags={"ant_ray.stage": "pretrain"})
        setup.log("pretraining the base model (cached for later searches)")
        base, reused = pretrained_model(cfg, run_dir=stage_dir, tracking=pre_run.handle())
        pre_run.set_tags({"ant_ray.reused_cache": reused, "ant_ray.model_dir": str(base)})
        pre_run.finish()
    if cfg.finetune.channel_projection:
        projected_dir = stage_dir / "base_with_projections"
        if not model_is_complete(projected_dir):
            save_model(add_channel_projections(load_model(base), places=cfg.finetune.projection_places), projected_dir)
        base = projected_dir
    return str(base)


def run_training_stage(stage: str, setup: StageSetup, *, ant_winner: dict | None = None) -> StageOutcome:
    """Search one training stage and return its winner (the best final score; trials stopped early never win)."""
    started = time.time()
    cfg, settings = setup.cfg, getattr(setup.cfg.search, stage)
    stage_dir = setup.search_dir / stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    section = getattr(cfg, SECTION[stage])
    num_samples = settings.num_samples or cfg.fid.num_samples
    metric = metric_name(cfg, num_samples)
    cfg_dump = cfg.worker_dump()

    context_args: dict[str, Any] = {}
    if stage == "ant" and cfg.ant.clustering == "gradient" and "ant.clustering" not in settings.space:
        # every trial clusters by gradient: measure before the first; where the space has ant.clustering, the
        # first trial that picks gradient measures it (ant_trial), and a search that never picks it never does
        affinity = cached_stage_affinity(
            stage_dir, lambda: stage_affinity(cfg, stage_dir, "stage", setup.stage_run)[0], setup.log)
        context_args["affinity"] = affinity.tolist()
    if stage == "deme":
        deme = settings
        context_args.update(base_model=_deme_base(setup, stage_dir, ant_winner), ranges=deme.ranges,
                            ant_intervals=ant_winner["intervals"] if ant_winner else None, merge=deme.merge,
                            merge_candidates=deme.merge_candidates)
    context = TrainingStageContext(
        stage=stage, cfg_dump=cfg_dump, search_dir=str(setup.search_dir), stage_dir=str(stage_dir),
        tracking_uri=setup.tracking_uri, experiment_id=setup.experiment_id, stage_run_id=setup.stage_run.run_id,
        metric=metric, num_samples=num_samples, eval_every=settings.eval_every, cache_dir=str(
            cfg.output_path() / "cache" / "fid"), train_max_failures=settings.train_max_failures, **context_args)

    trainable = tune.with_resources(tune.with_parameters(TRIAL_FUNCTIONS[stage], context=context),
                                    {"cpu": settings.resources.cpu, "gpu": settings.resources.gpu})
    steps = section.steps
    seed = settings.searcher.seed if settings.searcher.seed is not None else cfg.seed
    if settings.searcher.name == "grid" or not settings.space:  # an empty space is one trial of the config itself
        search_alg, param_space, trials = None, grid_param_space(grid_points(settings.space)), 1
    else:
        point = _config_point(cfg, settings)
        search_alg = build_optuna_search(settings.searcher, space=optuna_space(settings.space), metric=metric,
                                         seed=seed, points_to_evaluate=[point] if point else None,
                                         storage_path=setup.search_dir / "optuna.journal",
                                         study_name=f"{setup.study_name}-{stage}", final_step=steps)
        param_space, trials = None, settings.trial_count()
    scheduler = build_scheduler(settings.scheduler.name, metric=metric, max_t=steps,
                                grace_period=settings.scheduler.grace_period or settings.eval_every or steps,
                                reduction_factor=settings.scheduler.reduction_factor)
    count = settings.trial_count()
    setup.log(f"{stage} stage: {count} trial{'' if count == 1 else 's'}, {settings.max_concurrent} at a time, "
              f"{settings.searcher.name} searcher, {settings.scheduler.name} scheduler, scored by {metric}")
    # No actor reuse here: Tune cannot reset the actor of a function trainable that ASHA stopped mid-training and
    # fails the next trial instead, and a trial is a whole Ray Train run anyway (the merge stage reuses them).
    results = run_tune(
        trainable, name="tune", storage=stage_dir, resume=setup.resume, param_space=param_space,
        tune_config=tune.TuneConfig(search_alg=search_alg, scheduler=scheduler, num_samples=trials,
                                    max_concurrent_trials=settings.max_concurrent, reuse_actors=False),
        run_config=tune.RunConfig(name="tune", storage_path=str(stage_dir), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=settings.trial_max_failures),
                                  callbacks=[TrialTracker(setup.tracking_uri, stage_dir, metric, steps),
                                             TrialStatusPrinter(stage, metric, steps, setup.log)]),
        label=f"{stage} stage", log=setup.log)
    per_eval = num_samples
    if stage == "deme" and settings.merge == "search":
        n = len(ant_winner["intervals"]) if settings.ranges == "ant" else cfg.finetune.num_specialists
        per_eval *= len(EvaluationPlan(num_samples, "", merge="search", candidates=settings.merge_candidates,
                                       weight_low=cfg.merge_search.weight_low,
                                       weight_high=cfg.merge_search.weight_high).weight_candidates(n))
    return _collect(stage, setup, results, metric, steps, stage_dir, started, per_eval, settings.eval_every)


def _collect(stage: str, setup: StageSetup, results: tune.ResultGrid, metric: str, steps: int, stage_dir: Path,
             started: float, images_per_eval: int, eval_every: int | None) -> StageOutcome:
    """The stage's table (one row per trial: fate, last score, step reached, values) and its winner, whose model
    paths come from its folder's result.json."""
    rows, best, evaluations = [], None, 0
    for result in results:
        last = result.metrics or {}
        trial_id = last.get("trial_id") or Path(result.path).name
        values = trial_values(result.config or {})
        trial_fate = fate(last, result.error is not None, steps)
        score, reached = last.get(metric), int(last.get("step") or 0)
        evaluations += (reached // eval_every if eval_every else 1) if reached else 0
        rows.append({"stage": stage, "trial_id": trial_id, "fate": trial_fate, "metric": metric, "score": score,
                     "step": reached, **values})  # the search's trials schema (result.TRIAL_COLUMNS)
        if trial_fate == "finished" and finite(score) and (best is None or score < best[1]):
            best = (values, score, trial_id)
    table = pd.DataFrame(rows)
    csv = stage_dir / "trials.csv"
    table.to_csv(csv, index=False)
    counts = count_fates(list(table["fate"])) if rows else count_fates([])
    if best is None:
        raise SearchStageFailed(f"no trial of the {stage} stage finished with a score ({counts}); see "
                                f"{csv} and the trial runs in MLflow")
    values, score, trial_id = best
    winner = read_trial_result(trial_folder(stage_dir, trial_id))
    winner = {k: v for k, v in winner.items() if k != metric} | {"trial_id": trial_id}
    return StageOutcome(stage=stage, metric=metric, best_params=values, best_score=float(score), winner=winner,
                        run_id=setup.stage_run.run_id, images_generated=evaluations * images_per_eval,
                        seconds=time.time() - started, trials_csv=str(csv), **counts)
