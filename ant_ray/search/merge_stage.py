"""The merge stage: DeMe's merge weights (Eq. 8) by successive halving over the FID sample count.

Rung 0 scores weight vectors at the lowest fidelity, the anchors (task arithmetic, each specialist alone, the
uniform mean) first on every searcher: then `num_candidates` in all with Optuna (TPE / CMA-ES / random, seeded),
or DeMe's coarse grid and a fine grid around its best (the whole grid; the config's check keeps it within
`num_candidates`). Each later rung re-scores the best ceil(scored / eta) of the rung below at the next fidelity,
continuing every candidate's sample stream (so reaching 5K samples costs 5K images, not 1K + 2.5K + 5K). A
candidate is only ever ranked against scores at the same sample count (`fidelity.Ladder`), and the searcher only
sees rung-0 scores under rung 0's own metric name.

Each rung is one Tune run, restored on resume; a finished rung is kept in `rung_<r>.json`.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from ray import tune

from ant_ray.config import MergeSearchConfig, MergeStageSearch, SearcherConfig
from ant_ray.config.search import grid_axis, merge_grid_size
from ant_ray.evaluation import metric_name
from ant_ray.files import publish_text
from ant_ray.merge import anchor_weights, load_task_vector
from ant_ray.search.callbacks import TrialStatusPrinter
from ant_ray.search.fidelity import Ladder, rung_sizes
from ant_ray.search.outcome import SearchStageFailed, StageOutcome
from ant_ray.search.searchers import build_optuna_search
from ant_ray.search.space import grid_param_space, trial_values
from ant_ray.search.trials import MergeContext, merge_trial, weights_from_params
from ant_ray.search.tune_runs import StageSetup, run_tune


@dataclass
class MergePlan:
    """How to search: the fidelities (samples per FID, increasing), candidates at rung 0, eta, the searcher.
    ``num_candidates`` is rung 0's size for the Optuna searchers; the grid scores its whole grid (a search's config
    checks that it fits num_candidates when it loads; see MergeStageSearch.check_grid_budget)."""
    fidelities: list[int]
    num_candidates: int
    reduction_factor: float
    searcher: SearcherConfig
    max_concurrent: int
    cpu: float
    gpu: float
    trial_max_failures: int = 1
    # Tune runs every candidate in the same few processes, which keep the scorer, model and merger loaded
    # (trials.py caches them per process): a fresh process per trial re-imports torch, diffusers and mlflow first.
    reuse_actors: bool = True

    @classmethod
    def from_settings(cls, settings: MergeStageSearch) -> "MergePlan":
        """The plan of a validated `search.merge` section (the search and the benchmarks build it alike)."""
        return cls(fidelities=list(settings.fidelities), num_candidates=settings.num_candidates,
                   reduction_factor=settings.reduction_factor, searcher=settings.searcher,
                   max_concurrent=settings.max_concurrent, cpu=settings.resources.cpu, gpu=settings.resources.gpu,
                   trial_max_failures=settings.trial_max_failures)


def parameter_names(n: int, groups: list[str] | None) -> list[str]:
    if groups is None:
        return [f"w{i}" for i in range(n)]
    return [f"{g}.w{i}" for g in groups for i in range(n)]


def anchor_points(n: int, groups: list[str] | None, low: float, high: float) -> list[dict[str, float]]:
    """The anchors as parameter dicts (with layer groups, every group gets the same anchor weights)."""
    names = parameter_names(n, groups)
    return [dict(zip(names, weights * (len(groups) if groups else 1))) for weights in anchor_weights(n, low, high)]


def _point_key(point: dict[str, float], names: list[str]) -> tuple[float, ...]:
    return tuple(round(point[p], 10) for p in names)  # grid values are rounded to 10 places (grid_axis)


def grid_coarse_points(n: int, groups: list[str] | None, merge: MergeSearchConfig) -> list[dict[str, float]]:
    """Rung 0's first grid run: the anchors, then every point of the coarse grid that is not one of them (DeMe
    Sec. 8's grid alone may miss the uniform mean and, with a step that does not divide 1, every other anchor)."""
    names = parameter_names(n, groups)
    points = anchor_points(n, groups, merge.weight_low, merge.weight_high)
    seen = {_point_key(p, names) for p in points}
    axis = grid_axis(merge.weight_low, merge.weight_high, merge.grid_step)
    for values in itertools.product(axis, repeat=len(names)):
        point = dict(zip(names, values))
        if _point_key(point, names) not in seen:
            points.append(point)
    return points


def _fine_axis(centre: float, merge: MergeSearchConfig) -> list[float]:
    reach = int(merge.grid_step / merge.grid_fine_step + 1e-9)  # whole fine steps within one coarse step
    values = (round(centre + i * merge.grid_fine_step, 10) for i in range(-reach, reach + 1))
    low, high = merge.weight_low, merge.weight_high
    return [min(max(v, low), high) for v in values if low - 1e-9 <= v <= high + 1e-9]


def grid_fine_points(best: dict[str, float], scored: list[dict[str, float]],
                     merge: MergeSearchConfig) -> list[dict[str, float]]:
    """The fine grid (step grid_fine_step) within one coarse step of ``best`` on every axis, centred on it (an
    anchor may lie off the coarse grid) and cut at the box, without the points already scored."""
    names = list(best)
    axes = [_fine_axis(best[p], merge) for p in names]
    seen = {_point_key(p, names) for p in scored}
    return [point for values in itertools.product(*axes)
            if _point_key(point := dict(zip(names, values)), names) not in seen]


def planned_rung_sizes(plan: MergePlan, n: int, groups: list[str] | None, merge: MergeSearchConfig) -> list[int]:
    """Candidates per rung before anything is scored: num_candidates (Optuna) or the grid's bound at rung 0, then
    ceil(rung below / eta). The sizes a run uses come from what rung 0 really scored (`rung_sizes` of that)."""
    first = plan.num_candidates
    if plan.searcher.name == "grid":
        first = merge_grid_size(n, len(groups) if groups else 1, merge).total
    return rung_sizes(first, len(plan.fidelities), plan.reduction_factor)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def check_task_vectors(paths: list[Path], base_fingerprint: str) -> None:
    """Task vectors must come from the base they are merged into (the fingerprint in their metadata)."""
    for path in paths:
        _, meta = load_task_vector(path)
        if meta.get("base_fingerprint") != base_fingerprint:
            raise ValueError(f"{path} was computed against another base model (fingerprint "
                             f"{meta.get('base_fingerprint', 'missing')[:12]}..., expected {base_fingerprint[:12]}...); "
                             "merge task vectors of one base only")


def run_merge_stage(setup: StageSetup, *, base_model: Path, task_vectors: list[Path], plan: MergePlan,
                    merge: MergeSearchConfig) -> StageOutcome:
    started = time.time()
    cfg = setup.cfg
    stage_dir = setup.search_dir / "merge"
    stage_dir.mkdir(parents=True, exist_ok=True)
    groups = list(merge.layer_groups) if merge.layer_groups else None
    names = parameter_names(len(task_vectors), groups)
    context = MergeContext(
        cfg_dump=cfg.worker_dump(), base_model=str(base_model),
        task_vectors=tuple(str(p) for p in task_vectors), stage_dir=str(stage_dir), tracking_uri=setup.tracking_uri,
        experiment_id=setup.experiment_id, stage_run_id=setup.stage_run.run_id,
        cache_dir=str(cfg.output_path() / "cache" / "fid"), stream_batch=cfg.fid.batch_size,
        param_names=tuple(names),
        groups=tuple(groups) if groups else None, merge_options=merge.merge_options())
    ladder = Ladder(plan.fidelities)
    params_of: dict[str, dict[str, float]] = {}
    rows: list[dict[str, Any]] = []
    images = 0
    planned = planned_rung_sizes(plan, len(task_vectors), groups, merge)
    grid = plan.searcher.name == "grid"
    setup.log(f"merge stage: {len(task_vectors)} task vectors, candidates per rung {'at most ' if grid else ''}"
              f"{planned} at {plan.fidelities} samples ({plan.searcher.name} searcher, anchors first"
              f"{'; the fine grid follows the coarse optimum' if grid else ''})")
    sizes = planned

    for rung, fidelity in enumerate(plan.fidelities):
        saved = stage_dir / f"rung_{rung}.json"
        metric = metric_name(cfg, fidelity)
        if saved.is_file():  # finished before an interruption
            done = json.loads(saved.read_text())
        else:
            if rung == 0:
                results = _first_rung(setup, context, plan, merge, names, fidelity, metric, stage_dir, groups)
            else:
                promoted = ladder.promote(rung - 1, sizes[rung])
                results = _run_rung(setup, context, plan, stage_dir, f"rung{rung}", rung, fidelity, metric,
                                    grid_param_space([params_of[c] for c in promoted]))
            done = {"fidelity": fidelity, "metric": metric, "trials": results}
            publish_text(saved, json.dumps(done))
        for trial in done["trials"]:
            key = trial["candidate"]
            params_of[key] = trial["params"]
            ladder.record(rung, key, fidelity, trial["fid"])
            images += trial["images"]
            rows.append({"candidate": key, "rung": rung, "samples": fidelity, "images": trial["images"],
                         **trial["params"], "fid": trial["fid"], "metric": metric})
        setup.log(f"merge rung {rung}: {_count(len(done['trials']), 'candidate')} at {fidelity} samples, best {metric} "
                  f"{min(t['fid'] for t in done['trials']):.3f}")
        if rung == 0:
            # every later rung continues ceil(scored / eta) of the rung below: what rung 0 really scored (the grid's
            # true size, or fewer candidates when some failed), not what was planned
            sizes = rung_sizes(len(done["trials"]), len(plan.fidelities), plan.reduction_factor)
            if sizes != planned:
                setup.log(f"merge stage: candidates per rung {sizes} at {plan.fidelities} samples")

    winner, fidelity, score = ladder.best()
    table = pd.DataFrame(rows)
    csv = stage_dir / "trials.csv"
    table.to_csv(csv, index=False)
    weights = weights_from_params(params_of[winner], tuple(names), tuple(groups) if groups else None)
    return StageOutcome(stage="merge", metric=metric_name(cfg, fidelity), best_params=params_of[winner],
                        best_score=score, winner={"weights": weights, "candidate": winner,
                                                  "base_model": str(base_model),
                                                  "task_vectors": [str(p) for p in task_vectors]},
                        run_id=setup.stage_run.run_id, finished=len(rows), images_generated=images,
                        seconds=time.time() - started, trials_csv=str(csv),
                        extra={"rung_sizes": [len(r.scores) for r in ladder.rungs], "fidelities": plan.fidelities})


def _first_rung(setup, context, plan, merge, names, fidelity, metric, stage_dir, groups) -> list[dict]:
    n = len(context.task_vectors)
    if plan.searcher.name == "grid":
        # DeMe Sec. 8: a coarse grid (the anchors first), then a finer grid within one coarse step of the best so far.
        coarse = _run_rung(setup, context, plan, stage_dir, "rung0-coarse", 0, fidelity, metric,
                           grid_param_space(grid_coarse_points(n, groups, merge)))
        best = min(coarse, key=lambda t: t["fid"])["params"]
        fine = grid_fine_points({p: best[p] for p in names}, [t["params"] for t in coarse], merge)
        return coarse + (_run_rung(setup, context, plan, stage_dir, "rung0-fine", 0, fidelity, metric,
                                   grid_param_space(fine)) if fine else [])
    space = {p: optuna.distributions.FloatDistribution(merge.weight_low, merge.weight_high) for p in names}
    seed = plan.searcher.seed if plan.searcher.seed is not None else setup.cfg.seed
    searcher = build_optuna_search(plan.searcher, space=space, metric=metric, seed=seed,
                                   points_to_evaluate=anchor_points(n, groups, merge.weight_low, merge.weight_high),
                                   storage_path=setup.search_dir / "optuna.journal",
                                   study_name=f"{setup.study_name}-merge", final_step=fidelity, step_key="samples")
    return _run_rung(setup, context, plan, stage_dir, "rung0", 0, fidelity, metric, None, searcher=searcher,
                     num_samples=plan.num_candidates)


def _run_rung(setup: StageSetup, context: MergeContext, plan: MergePlan, stage_dir: Path, name: str, rung: int,
              fidelity: int, metric: str, param_space: dict | None, *, searcher=None,
              num_samples: int = 1) -> list[dict]:
    trainable = tune.with_resources(
        tune.with_parameters(merge_trial, context=context, fidelity=fidelity, rung=rung, metric=metric),
        {"cpu": plan.cpu, "gpu": plan.gpu})
    results = run_tune(
        trainable, name=name, storage=stage_dir / "tune", resume=setup.resume, param_space=param_space,
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=num_samples,
                                    max_concurrent_trials=plan.max_concurrent, reuse_actors=plan.reuse_actors),
        run_config=tune.RunConfig(name=name, storage_path=str(stage_dir / "tune"), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=plan.trial_max_failures),
                                  callbacks=[TrialStatusPrinter(f"merge {name}", metric, fidelity, setup.log,
                                                                step_key="samples")]),
        label=f"merge {name}", log=setup.log)
    trials = []
    for result in results:
        if result.error is not None or not result.metrics or metric not in result.metrics:
            continue
        params = {p: float(v) for p, v in trial_values(result.config).items() if p in context.param_names}
        trials.append({"candidate": result.metrics["candidate"], "params": params, "fid": result.metrics[metric],
                       "images": int(result.metrics["images"]), "trial_id": result.metrics.get("trial_id")})
    if not trials:
        raise SearchStageFailed(f"every merge candidate of {name} failed; see {stage_dir / 'tune' / name}")
    return trials
