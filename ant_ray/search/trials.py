"""The trials of a search: plain functions that Ray Tune runs, one per sampled configuration.

- `ant_trial`: trains a model from scratch with ANT clustered MTL, as one Ray Train run that reports FID at fixed
  steps (ASHA can stop it early).
- `deme_trial`: finetunes N range specialists of the stage's base model in one Ray Train run and reports the FID
  of their merged model at fixed steps.
- `merge_trial`: merges task vectors with one weight vector and scores it at one fidelity, continuing the
  candidate's sample stream from the previous fidelity.

Each trial works in its own folder and MLflow run, both found again after a resume: a trial that had finished
before its search was interrupted re-reports its saved result instead of training again.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray import tune

from ant_ray.ant.clustering import interval_clustering
from ant_ray.config import PipelineConfig, with_values
from ant_ray.diffusion import NoiseSchedule, model_denoiser
from ant_ray.evaluation_plan import EvaluationPlan
from ant_ray.files import publish_text
from ant_ray.fid import StreamingFeatureStats
from ant_ray.merge import TaskVectorMerger, load_task_vector
from ant_ray.search.callbacks import RUN_ID_FILE, TRAIN_RUN_IDS_FILE, ScoreReportCallback, trial_folder
from ant_ray.search.space import trial_values
from ant_ray.stages.ant_train import fit_ant, resolve_clusters
from ant_ray.stages.deme_finetune import finetune_specialists
from ant_ray.stages.ray_train import TrainingRunFailed
from ant_ray.tracking import TrackedRun

if TYPE_CHECKING:
    from ant_ray.evaluation import FIDScorer

RESULT_FILE = "result.json"  # a finished trial's final report, re-reported on resume


@dataclass(frozen=True)
class TrainingStageContext:
    """What every trial of a training stage (ant or deme) shares."""
    stage: str
    cfg_dump: dict
    search_dir: str
    stage_dir: str
    tracking_uri: str
    experiment_id: str
    stage_run_id: str
    metric: str
    num_samples: int
    eval_every: int | None
    cache_dir: str
    affinity: Any = None  # ant, gradient clustering: the [B, B] bucket affinity measured once for the stage
    base_model: str | None = None  # deme: the model the specialists start from
    ranges: str = "equal"  # deme: equal | timestep | snr | ant
    ant_intervals: list | None = None  # deme with ranges "ant": the ant winner's intervals
    merge: str = "task_arithmetic"
    merge_candidates: int = 0
    train_max_failures: int = 0  # restarts of the trial's Ray Train run from its last checkpoint


def _open_trial_run(folder: Path, tracking_uri: str, experiment_id: str, parent_run_id: str, name: str,
                    tags: dict[str, Any], params: dict[str, Any]) -> TrackedRun:
    """The trial's MLflow run: the one recorded in its folder (a resumed trial continues it), else a new one."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / RUN_ID_FILE
    if marker.is_file():
        run = TrackedRun(tracking_uri, marker.read_text().strip())
        run.reopen()
        return run
    run = TrackedRun.start(tracking_uri, experiment_id, name, parent_run_id=parent_run_id, tags=tags)
    run.log_params(params)
    publish_text(marker, run.run_id)
    return run


def _train_runs(folder: Path, run: TrackedRun, experiment_id: str, names: list[str],
                tags: dict[str, Any]) -> list[TrackedRun]:
    """One MLflow run per Ray Train model under the trial's run (reused on resume)."""
    marker = folder / TRAIN_RUN_IDS_FILE
    if marker.is_file():
        runs = [TrackedRun(run.tracking_uri, rid) for rid in json.loads(marker.read_text())]
        for r in runs:
            r.reopen()
        return runs
    runs = [TrackedRun.start(run.tracking_uri, experiment_id, n, parent_run_id=run.run_id, tags=tags) for n in names]
    publish_text(marker, json.dumps([r.run_id for r in runs]))
    return runs


def _finish(result: dict[str, Any], folder: Path, runs: list[TrackedRun], status: str = "FINISHED") -> None:
    """Save the trial's final result (with its model paths) in its folder, close its runs and report the numbers
    to Tune (Tune keeps numbers only; the stage reads the rest from the folder)."""
    publish_text(folder / RESULT_FILE, json.dumps(result))
    for r in runs:
        r.finish(status)
    tune.report(_numbers(result))


def _numbers(result: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def read_trial_result(folder: Path) -> dict[str, Any] | None:
    marker = folder / RESULT_FILE
    return json.loads(marker.read_text()) if marker.is_file() else None


def trial_param_names(cfg: PipelineConfig) -> list[str]:
    """The params trials log for the values they were given, stage by stage: the searched fields (ant.k,
    ant.method, finetune.p, ...) and the merge weights (w0, w1, ... or <group>.w0, ..., as many as the merge stage
    can receive). The runs table shows them as columns (tracking.save_runs_view)."""
    from ant_ray.search.merge_stage import parameter_names  # merge_stage imports this module

    search, names = cfg.search, []
    for stage in search.stages():
        if stage == "merge":
            n = search.max_task_vectors(cfg.ant.k, cfg.finetune.num_specialists)
            names += parameter_names(n, list(cfg.merge_search.layer_groups or []) or None)
        else:
            names += list(getattr(search, stage).space)
    return names


def _diverged(err: TrainingRunFailed, metric: str, folder: Path, runs: list[TrackedRun]) -> None:
    """A diverged trial is a bad configuration, not a crash: report +inf so the searcher learns it, mark its runs
    FAILED with the reason, and let the search go on."""
    for r in runs:
        r.set_tags({"ant_ray.fate": "diverged", "ant_ray.failure": err.reason})
    _finish({metric: math.inf, "step": 0, "diverged": 1}, folder, runs, status="FAILED")


def _already_finished(folder: Path) -> bool:
    result = read_trial_result(folder)
    if result is None:
        return False
    tune.report(_numbers(result))
    return True


def _tags(stage: str, cfg: PipelineConfig, metric: str, num_samples: int) -> dict[str, Any]:
    tags = {"ant_ray.stage": f"{stage}_trial", "ant_ray.fid_extractor": cfg.fid.extractor,
            "ant_ray.fidelity": num_samples, "ant_ray.metric": metric}
    if stage == "ant":
        tags.update({"ant_ray.k": cfg.ant.k, "ant_ray.method": cfg.ant.method, "ant_ray.clustering": cfg.ant.clustering})
    if stage == "deme":
        tags.update({"ant_ray.p": cfg.finetune.p, "ant_ray.num_specialists": cfg.finetune.num_specialists,
                     "ant_ray.lambda": cfg.finetune.consistency_weight})
    return tags


def _start_trial(config: dict[str, Any], context: TrainingStageContext):
    """The trial's sampled values, id, folder and configuration; None when a restored trial had already finished."""
    values = trial_values(config)
    trial_id = tune.get_context().get_trial_id()
    folder = trial_folder(Path(context.stage_dir), trial_id)
    if _already_finished(folder):
        return None
    return values, trial_id, folder, with_values(PipelineConfig.model_validate(context.cfg_dump), values)


def ant_trial(config: dict[str, Any], *, context: TrainingStageContext) -> None:
    started = _start_trial(config, context)
    if started is None:
        return
    values, trial_id, folder, cfg = started
    import numpy as np

    affinity = np.asarray(context.affinity) if context.affinity is not None else None
    intervals = resolve_clusters(cfg, affinity=affinity)
    tags = _tags("ant", cfg, context.metric, context.num_samples)
    run = _open_trial_run(folder, context.tracking_uri, context.experiment_id, context.stage_run_id,
                          f"ant-trial-{trial_id}", tags, {**values, "ant.intervals": json.dumps(intervals)})
    (train_run,) = _train_runs(folder, run, context.experiment_id, [f"ant-train-{trial_id}"],
                               {**tags, "ant_ray.stage": "ant_train"})
    plan = EvaluationPlan(num_samples=context.num_samples, cache_dir=context.cache_dir, every=context.eval_every)
    try:
        result = fit_ant(cfg, name=f"ant-{trial_id}", storage=Path(context.search_dir) / "train",
                         loop={"intervals": [list(iv) for iv in intervals], "init_model": cfg.ant.init_model,
                               "output_dir": str(folder), "tracking": train_run.handle(), "seed": cfg.seed,
                               "evaluation": plan.dump()},
                         callbacks=[ScoreReportCallback(context.metric)], max_failures=context.train_max_failures)
    except TrainingRunFailed as err:
        if not err.diverged:
            raise
        _diverged(err, context.metric, folder, [run, train_run])
        return
    summary = result.return_value or {}
    final = {context.metric: summary["fid"], "step": cfg.ant.steps, "model": str(folder / "ema"),
             "intervals": [list(iv) for iv in intervals]}
    run.set_tags({"ant_ray.model_dir": str(folder / "ema")})
    _finish(final, folder, [run, train_run])


def specialist_ranges_for(context: TrainingStageContext, cfg: PipelineConfig) -> list[tuple[int, int]]:
    T, n = cfg.diffusion.T, cfg.finetune.num_specialists
    if context.ranges == "ant":
        return [tuple(r) for r in context.ant_intervals]
    if context.ranges == "equal":
        return [(i * T // n, (i + 1) * T // n) for i in range(n)]
    snr = NoiseSchedule.create(cfg.diffusion.schedule, T).snr().numpy()
    return [tuple(r) for r in interval_clustering(n, context.ranges, T=T, snr=snr)]


def deme_trial(config: dict[str, Any], *, context: TrainingStageContext) -> None:
    started = _start_trial(config, context)
    if started is None:
        return
    values, trial_id, folder, cfg = started
    ranges = specialist_ranges_for(context, cfg)
    if context.ranges == "ant":
        cfg = with_values(cfg, {"finetune.num_specialists": len(ranges)})
    tags = _tags("deme", cfg, context.metric, context.num_samples)
    run = _open_trial_run(folder, context.tracking_uri, context.experiment_id, context.stage_run_id,
                          f"deme-trial-{trial_id}", tags, {**values, "finetune.ranges": json.dumps(ranges)})
    train_runs = _train_runs(folder, run, context.experiment_id,
                             [f"specialist-{i}-[{a},{b})-{trial_id}" for i, (a, b) in enumerate(ranges)],
                             {**tags, "ant_ray.stage": "finetune"})
    ms = cfg.merge_search
    plan = EvaluationPlan(num_samples=context.num_samples, cache_dir=context.cache_dir, every=context.eval_every,
                          base_model=context.base_model, merge=context.merge, candidates=context.merge_candidates,
                          weight_low=ms.weight_low, weight_high=ms.weight_high, seed=cfg.seed)
    try:
        result = finetune_specialists(cfg, base_model=Path(context.base_model), ranges=ranges, run_dir=folder,
                                      name=f"deme-{trial_id}", trackings=[r.handle() for r in train_runs],
                                      evaluation=plan, callbacks=[ScoreReportCallback(context.metric)],
                                      storage=Path(context.search_dir) / "train",
                                      max_failures=context.train_max_failures)
    except TrainingRunFailed as err:
        if not err.diverged:
            raise
        _diverged(err, context.metric, folder, [run, *train_runs])
        return
    final = {context.metric: result.fid, "step": cfg.finetune.steps, "weights": result.weights,
             "task_vectors": [str(p) for p in result.task_vectors], "ranges": [list(r) for r in ranges],
             "base_model": context.base_model}
    for tracked, path in zip(train_runs, result.task_vectors):
        tracked.log_artifact(path, "task_vector")
    _finish(final, folder, [run, *train_runs])


# ------------------------------------------------------------------------------------------------ merge trials


@dataclass(frozen=True)
class MergeContext:
    """What every merge trial shares: the task vectors, the base they were computed against, and where candidate
    streams and MLflow runs live."""
    cfg_dump: dict
    base_model: str
    task_vectors: tuple[str, ...]
    stage_dir: str
    tracking_uri: str
    experiment_id: str
    stage_run_id: str
    cache_dir: str
    stream_batch: int  # fid.batch_size, every stage's: a stream stops at one fidelity and continues to the next
    param_names: tuple[str, ...]
    groups: tuple[str, ...] | None
    merge_options: dict = field(default_factory=dict)


_PROCESS_CACHE: dict[Any, Any] = {}  # per process (Tune reuses trial actors): the scorer, the model and the merger


def _merge_tools(context: MergeContext) -> tuple["FIDScorer", Any, TaskVectorMerger]:
    # Imported here: a training trial's process never scores, and importing the scorer (diffusers) costs seconds.
    from ant_ray.diffusion.models import load_model
    from ant_ray.evaluation import FIDScorer

    key = (context.stage_dir, context.base_model, context.task_vectors)
    if _PROCESS_CACHE.get("key") != key:
        cfg = PipelineConfig.model_validate(context.cfg_dump)
        scorer = FIDScorer(cfg, Path(context.cache_dir))
        model = load_model(context.base_model).to(scorer.device).eval()
        base_state = {k: v.detach().to(scorer.device) for k, v in model.state_dict().items()}
        task_vectors = [{k: v.to(scorer.device) for k, v in load_task_vector(p)[0].items()}
                        for p in context.task_vectors]
        merger = TaskVectorMerger.from_task_vectors(base_state, task_vectors, **context.merge_options)
        _PROCESS_CACHE.clear()
        _PROCESS_CACHE.update(key=key, tools=(scorer, model, merger))
    return _PROCESS_CACHE["tools"]


def weights_from_params(params: dict[str, float], names: tuple[str, ...], groups: tuple[str, ...] | None) -> Any:
    n = len(names) // (len(groups) if groups else 1)
    if groups is None:
        return [float(params[f"w{i}"]) for i in range(n)]
    return {g: [float(params[f"{g}.w{i}"]) for i in range(n)] for g in groups}


def candidate_key(params: dict[str, float], names: tuple[str, ...]) -> str:
    """A stable name for a weight vector (its MLflow run and its sample stream are found by it)."""
    import hashlib

    text = ",".join(f"{params[n]:.10g}" for n in names)
    return "c" + hashlib.sha256(text.encode()).hexdigest()[:12]


def merge_trial(config: dict[str, Any], *, context: MergeContext, fidelity: int, rung: int, metric: str) -> None:
    params = trial_values(config)
    params = {n: float(params[n]) for n in context.param_names}
    key = candidate_key(params, context.param_names)
    folder = Path(context.stage_dir) / "candidates" / key
    scorer, model, merger = _merge_tools(context)
    run = _open_trial_run(folder, context.tracking_uri, context.experiment_id, context.stage_run_id,
                          f"merge-candidate-{key}", {"ant_ray.stage": "merge_trial",
                                                     "ant_ray.fid_extractor": scorer.cfg.fid.extractor,
                                                     "ant_ray.candidate": key}, params)
    run.set_tags({"ant_ray.fidelity": fidelity, "ant_ray.rung": rung})
    try:
        weights = weights_from_params(params, context.param_names, context.groups)
        model.load_state_dict(merger.merge(weights))
        stream_file = folder / "stream.npz"
        running = StreamingFeatureStats.load(stream_file) if stream_file.is_file() else None
        if running is not None and running.n > fidelity:
            running = None  # a stream longer than this rung (a resumed rung): start again rather than guess
        before = running.n if running is not None else 0
        running = scorer.stream(model_denoiser(model), fidelity, running=running, batch_size=context.stream_batch)
        running.save(stream_file)
        fid = scorer.fid(running)
    except BaseException:
        run.finish("FAILED")
        raise
    run.log_metrics({metric: fid}, step=fidelity)
    run.finish()
    tune.report({metric: fid, "samples": fidelity, "images": fidelity - before, "candidate": key, "rung": rung})
