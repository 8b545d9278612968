"""The search end to end: ant -> deme -> merge (the stages the config's `search:` names, in that order, each
starting from the previous stage's winner), then the winner re-scored at the final fidelity and saved.

Everything lives in one search folder (`<output_dir>/searches/<name>-<date>-<id>/`): the config, `state.json`
(which stages are done, the MLflow run ids), one folder per stage, the Optuna journal and the winner. `resume`
continues a search whose driver died: finished stages are read back, the interrupted stage's Tune experiment is
restored (finished trials are not rerun, interrupted ones continue from their Ray Train checkpoints), and the same
MLflow runs are continued.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable

import yaml

from ant_ray.commands import command
from ant_ray.config import PipelineConfig, ResourcesConfig
from ant_ray.data import ImageDataset, save_image_grid
from ant_ray.diffusion import build_model, load_model, model_denoiser, save_model
from ant_ray.evaluation import FIDScorer, load_reference_dataset, metric_name
from ant_ray.diffusion.models import check_model_folder
from ant_ray.files import CorruptFileError, DiskFull, check_safetensors, is_disk_full, publish_text, read_json
from ant_ray.merge import TaskVectorMerger, load_task_vector, state_dict_fingerprint
from ant_ray.search.merge_stage import MergePlan, check_task_vectors, run_merge_stage
from ant_ray.search.outcome import SearchStageFailed, StageOutcome
from ant_ray.search.plots import copy_stage_figures, merge_landscape, study_figures
from ant_ray.search.result import SearchResult
from ant_ray.search.training_stage import run_training_stage
from ant_ray.search.trials import trial_param_names
from ant_ray.search.tune_runs import StageSetup, log_line
from ant_ray.stages.evaluate import RepeatedScore, score_with_seeds
from ant_ray.stages.ray_runtime import start_ray
from ant_ray.files import check_output_dir
from ant_ray.tracking import (TrackedRun, check_tracking_store, end_open_runs, flatten, save_runs_view,
                              setup_experiment, worker_env)
from ant_ray.training import worker_groups

STATE_FILE = "state.json"
LOCK_FILE = "driver.lock"  # held (flock) by the one driver of a search folder, for as long as it runs


class SearchFolderInUse(ValueError):
    """Another driver runs this search folder; the message names the folder, its host and PID, and what to do."""


# ------------------------------------------------------------------------------------------------ before anything


def check_search_inputs(cfg: PipelineConfig) -> ImageDataset:
    """Bad input fails here, in seconds, before Ray starts or anything is written. Returns the dataset."""
    cfg.check_searchable()
    search = cfg.search
    data = load_reference_dataset(cfg)
    build_model(cfg.model.base, resolution=cfg.data.resolution, channels=cfg.data.channels)
    sections = (["ant"] if search.ant else []) + (["pretrain", "finetune"] if search.deme else [])
    for section in sections:
        if getattr(cfg, section).batch_size > len(data):
            raise ValueError(f"{section}.batch_size ({getattr(cfg, section).batch_size}) exceeds the dataset size "
                             f"({len(data)})")
    if cfg.fid.extractor == "inception":
        from ant_ray.fid import ensure_inception_weights

        ensure_inception_weights()
    if search.merge is not None and search.merge.task_vectors is not None:
        base = Path(search.merge.base_model)
        missing = [p for p in search.merge.task_vectors if not Path(p).is_file()]
        if missing:
            raise ValueError(f"search.merge.task_vectors: {missing[0]} does not exist")
        check_task_vectors([Path(p) for p in search.merge.task_vectors],
                           state_dict_fingerprint(load_model(base).state_dict()))
    return data


def _check_resources(cfg: PipelineConfig) -> None:
    """One trial of each stage must fit the cluster (its driver plus its Ray Train workers)."""
    import ray

    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    search = cfg.search
    needs: list[tuple[str, str, ResourcesConfig | None]] = []
    if search.ant:
        needs.append(("ant", "ant", cfg.ant.resources))
    if search.deme:
        needs.append(("deme", "finetune", cfg.finetune.resources))
    for stage, section, workers in needs:
        settings = getattr(search, stage)
        n = max(1, workers.num_workers) * (worker_groups(cfg.finetune.num_specialists,
                                                         cfg.finetune.specialists_per_worker) if stage == "deme" else 1)
        cpu = settings.resources.cpu + workers.cpu * n
        gpu = settings.resources.gpu + workers.gpu * n
        if cpu > cpus or gpu > gpus:
            raise ValueError(f"search.{stage}: one trial needs {cpu:g} CPUs and {gpu:g} GPUs (its driver plus "
                             f"{n} workers of {section}.resources) but the cluster has {cpus:g} CPUs and {gpus:g} "
                             f"GPUs; lower {section}.resources or start Ray with more (ray.num_cpus)")
        at_once = min(settings.max_concurrent, settings.trial_count())  # a one-trial stage runs one trial
        if at_once > 1 and (cpu * at_once > cpus or gpu * at_once > gpus):
            log_line(f"note: search.{stage}.max_concurrent={at_once} trials need {cpu * at_once:g} CPUs / "
                     f"{gpu * at_once:g} GPUs; the cluster has {cpus:g} / {gpus:g}, so fewer will run at once")


# ------------------------------------------------------------------------------------------------ the search folder


def config_differences(before: PipelineConfig, now: PipelineConfig) -> list[str]:
    """'field: X there, Y here' for every field the two configs set differently: what must not change between a
    search and its resume (where Ray runs may)."""
    a, b = (flatten(c.model_dump(mode="json", exclude={"ray"})) for c in (before, now))
    return [f"{key}: {a.get(key)!r} there, {b.get(key)!r} here" for key in sorted(a.keys() | b.keys())
            if a.get(key) != b.get(key)]


def prepare_search_dir(cfg: PipelineConfig, resume: Path | None) -> tuple[Path, dict]:
    if resume is None:
        key = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
        search_dir = cfg.output_path() / "searches" / f"{cfg.name}-{key}"
        search_dir.mkdir(parents=True, exist_ok=False)
        publish_text(search_dir / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        state = {"done": [], "stage_runs": {}, "parent_run_id": None}
        publish_text(search_dir / STATE_FILE, json.dumps(state))
        return search_dir, state
    search_dir = Path(resume).expanduser().resolve()
    saved = search_dir / "config.yaml"
    if not (saved.is_file() and (search_dir / STATE_FILE).is_file()):
        raise ValueError(f"--resume {search_dir} is not a search folder (expected config.yaml and {STATE_FILE}, "
                         f"as in {cfg.output_path() / 'searches'}/<name>-<date>-<id>)")
    try:
        saved_cfg = PipelineConfig.model_validate(yaml.safe_load(saved.read_text()))
    except (yaml.YAMLError, ValueError) as error:
        raise CorruptFileError(saved, f"is not the search's configuration ({type(error).__name__}: {error})",
                               "put back the config.yaml the search wrote, or start a new search") from None
    differences = config_differences(saved_cfg, cfg)
    if differences:
        shown = "; ".join(differences[:3]) + (f"; and {len(differences) - 3} more" if len(differences) > 3 else "")
        raise ValueError(f"--resume {search_dir}: that search used another configuration ({shown}); resume with "
                         "--resume alone (it reads the search's own config.yaml) or with the same config and --set "
                         "overrides, or start a new search")
    return search_dir, read_json(search_dir / STATE_FILE, fix=(
        "it is the search's record of its finished stages and MLflow runs and cannot be rebuilt: start a new "
        "search from the same config"))


def hold_search_dir(search_dir: Path) -> int:
    """Take the search folder for this driver until it exits (or `release_search_dir`): an exclusive flock on
    its lock file, which the kernel drops when the process dies, even by kill -9. A second driver (a resume from
    another terminal, a resubmitted job) gets SearchFolderInUse naming the running one, before it touches
    anything. (flock is per host on some network filesystems: drivers on two hosts are not told apart there.)"""
    path = search_dir / LOCK_FILE
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(descriptor, 200, 0).decode(errors="replace").strip() or "unknown host and PID"
        os.close(descriptor)
        raise SearchFolderInUse(f"{search_dir} is in use by another search driver ({holder}); wait for it to end "
                                "or stop it, then resume") from None
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"host {socket.gethostname()}, PID {os.getpid()}, since "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    return descriptor


def release_search_dir(descriptor: int) -> None:
    os.close(descriptor)  # closing drops the flock; the file stays (removing it would race a waiting driver)


def _check_winner_files(outcome: StageOutcome, search_dir: Path) -> None:
    """The files a finished stage's winner left for the next stage and the final model are whole: a truncated or
    missing one fails in one line naming it, not later as 'no trial of the next stage finished'."""
    fix = (f"the {outcome.stage} stage's winner (trial {outcome.winner.get('trial_id', '?')}) cannot be rebuilt in "
           f"this folder: restore the file, or start a new search from {search_dir / 'config.yaml'}")
    folders = [outcome.winner[key] for key in ("model", "base_model") if outcome.winner.get(key)]
    for folder in folders:
        try:
            check_model_folder(folder)
        except CorruptFileError as error:
            raise CorruptFileError(error.path, error.problem, fix) from None
        except FileNotFoundError as error:
            raise CorruptFileError(folder, f"is not a whole model folder ({error})", fix) from None
    for path in outcome.winner.get("task_vectors") or []:
        if not Path(path).is_file():
            raise CorruptFileError(path, "is missing", fix)
        check_safetensors(path, fix=fix)


def _load_outcome(search_dir: Path, stage: str) -> StageOutcome:
    outcome = StageOutcome.load(search_dir / stage / "outcome.json")
    _check_winner_files(outcome, search_dir)
    return outcome


def fid_metrics(cfg: PipelineConfig) -> list[str]:
    """The FID metrics a search logs, the final score's first: one name per sample count (scores at different
    counts are not comparable), each logged by the runs scored at that count and by the stages that kept it."""
    search = cfg.search
    counts = [search.final.num_samples]
    for stage in search.stages():
        settings = getattr(search, stage)
        if stage == "merge":
            counts += sorted(settings.fidelities, reverse=True)
        else:
            counts.append(settings.num_samples or cfg.fid.num_samples)
    return list(dict.fromkeys(metric_name(cfg, n) for n in counts))


def _save_state(search_dir: Path, state: dict) -> None:
    publish_text(search_dir / STATE_FILE, json.dumps(state, indent=1))


# ------------------------------------------------------------------------------------------------ the search


def run_search(cfg: PipelineConfig, *, resume: Path | None = None,
               log: Callable[[str], None] = log_line) -> SearchResult:
    started = time.time()
    lock = None
    try:
        if resume is not None:
            # one driver per folder: the second one stops here, before it reads or writes anything
            lock = hold_search_dir(Path(resume).expanduser().resolve()) if (Path(resume) / "config.yaml").is_file() \
                else None
            search_dir, state = prepare_search_dir(cfg, resume)
            if state.get("finished"):
                log(f"search folder: {search_dir}")
                log("this search had finished: nothing to resume; its result as it was saved")
                return _finished_result(cfg, search_dir, state, log)
        dataset = check_search_inputs(cfg)
        check_output_dir(cfg.output_path())
        check_tracking_store(cfg.tracking_uri())  # an unreachable server fails here, in seconds, not after minutes
        if resume is None:
            search_dir, state = prepare_search_dir(cfg, None)
            lock = hold_search_dir(search_dir)
        return _run_search(cfg, search_dir, state, dataset, resume, started, log)
    except OSError as err:
        if not is_disk_full(err):
            raise
        # a full disk on the driver (its records, the winner, caches): one line, as a failed stage is shown
        raise SearchStageFailed(str(err) if isinstance(err, DiskFull) else (
            f"no space left on device ({err}); free space in {cfg.output_path()} and continue with --resume")) from err
    finally:
        if lock is not None:
            release_search_dir(lock)


def _run_search(cfg: PipelineConfig, search_dir: Path, state: dict, dataset: ImageDataset, resume: Path | None,
                started: float, log: Callable[[str], None]) -> SearchResult:
    log(f"search folder: {search_dir}")
    uri = cfg.tracking_uri()
    out = cfg.output_path()
    experiment_id = setup_experiment(uri, cfg.tracking.experiment, out / "mlartifacts")
    runs_page = save_runs_view(uri, experiment_id, [*fid_metrics(cfg), "loss"], trial_param_names(cfg))

    def adopt_or_start(key: str, name: str, parent: str | None, tags: dict) -> TrackedRun:
        run_id = state["stage_runs"].get(key) if key != "search" else state["parent_run_id"]
        if run_id:
            run = TrackedRun(uri, run_id)
            run.reopen()
            return run
        run = TrackedRun.start(uri, experiment_id, name, parent_run_id=parent,
                               tags={"ant_ray.search_dir": str(search_dir), **tags})
        if key == "search":
            state["parent_run_id"] = run.run_id
        else:
            state["stage_runs"][key] = run.run_id
        _save_state(search_dir, state)
        return run

    parent = adopt_or_start("search", f"search-{search_dir.name}", None, {"ant_ray.stage": "search"})
    if resume is None:
        parent.log_params({k: v for k, v in cfg.model_dump(mode="json").items() if k != "search"})
        parent.log_dataset(dataset, cfg.data.path if cfg.data.dataset != "digits" else None)
        parent.log_text(search_dir / "search.yaml", yaml.safe_dump(cfg.search.model_dump(mode="json"),
                                                                   sort_keys=False))
    else:
        parent.set_tags({"ant_ray.resumed": True})
    open_runs = [parent]
    # Tune saves its experiment state after every result, so a killed driver loses no finished trial.
    os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = "0"
    # The stages keep their own tables; Tune's CSV/JSON/TensorBoard loggers would only duplicate them (and Tune's
    # result grid then warns that it finds no CSV to read back, which is expected).
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    try:
        log(start_ray(cfg.ray.address, num_cpus=cfg.ray.num_cpus, env=worker_env()))
        _check_resources(cfg)
        log(f"FID: {cfg.fid.extractor} features, reference statistics cached in {out / 'cache' / 'fid'}")
        FIDScorer(cfg, out / "cache" / "fid")  # builds the extractor and reference statistics once, here

        outcomes: dict[str, StageOutcome] = {}
        for stage in cfg.search.stages():
            saved = search_dir / stage / "outcome.json"
            if stage in state["done"] and saved.is_file():
                outcomes[stage] = _load_outcome(search_dir, stage)
                log(f"{stage} stage: done before the interruption, kept")
                continue
            run = adopt_or_start(stage, f"{stage}-search", parent.run_id, {"ant_ray.stage": f"{stage}_search"})
            open_runs.append(run)
            if stage == "merge":
                run.log_params({"search.merge": cfg.search.merge.model_dump(mode="json"),
                                "merge_search": cfg.merge_search.model_dump(mode="json")})
            else:
                run.log_params(getattr(cfg.search, stage).model_dump(mode="json"))
            setup = StageSetup(cfg=cfg, search_dir=search_dir, tracking_uri=uri, experiment_id=experiment_id,
                               stage_run=run, study_name=search_dir.name,
                               resume=resume is not None, log=log)
            if stage == "merge":
                outcome = _merge(cfg, setup, outcomes.get("deme"))
            else:
                outcome = run_training_stage(stage, setup, ant_winner=outcomes["ant"].winner
                                             if "ant" in outcomes else None)
            _publish_stage(outcome, run, search_dir, cfg)
            outcome.save(saved)
            run.finish()
            open_runs.remove(run)
            state["done"].append(stage)
            _save_state(search_dir, state)
            outcomes[stage] = outcome
            log(f"{stage} stage done in {outcome.seconds / 60:.1f} min: best {outcome.metric} "
                f"{outcome.best_score:.3f}")

        winner_dir = _save_winner(cfg, outcomes, search_dir)
        final = cfg.search.final
        final_metric = metric_name(cfg, final.num_samples)
        log(f"re-scoring the winner: {final_metric} with sampling seeds {final.seeds}")
        resources = cfg.search.merge.resources if cfg.search.merge else cfg.merge_search.resources
        repeated = score_with_seeds(cfg, out / "cache" / "fid", winner_dir, num_samples=final.num_samples,
                                    seeds=final.seeds, metric=final_metric,
                                    resources=ResourcesConfig(cpu=resources.cpu, gpu=resources.gpu))
        result = SearchResult(search_dir=search_dir, tracking_uri=uri, parent_run_id=parent.run_id, stages=outcomes,
                              winner_model=winner_dir, final=repeated, final_images=final.num_samples * len(final.seeds),
                              stage_run_ids=dict(state["stage_runs"]), runs_page=runs_page)
        result.seconds = time.time() - started + state.get("seconds_before_resume", 0.0)
        _publish_search(result, parent, cfg)
        parent.finish()
        state["finished"] = {"final": {"metric": repeated.metric, "scores": repeated.scores},
                             "seconds": result.seconds, "runs_page": runs_page}
        _save_state(search_dir, state)
        return result
    except BaseException as err:
        status = "KILLED" if isinstance(err, (KeyboardInterrupt, SystemExit)) else "FAILED"
        # the trials and training runs that were running, whose processes went with the search, then its own
        end_open_runs(uri, experiment_id, parent.run_id, status, f"{type(err).__name__}: {err}")
        for run in reversed(open_runs):
            run.set_tags({"ant_ray.failure": f"{type(err).__name__}: {err}"[:500]})
            run.finish(status)
        state["seconds_before_resume"] = state.get("seconds_before_resume", 0.0) + time.time() - started
        try:
            _save_state(search_dir, state)
        except OSError:  # a full disk: the record as it was still holds every finished stage
            pass
        why = {KeyboardInterrupt: "interrupted", SystemExit: "terminated"}.get(type(err), type(err).__name__)
        log(f"search stopped ({why}); its folder is {search_dir}; continue it with: {command('ant-ray')} search "
            f"--resume {search_dir}")
        raise


def _merge(cfg: PipelineConfig, setup: StageSetup, deme: StageOutcome | None) -> StageOutcome:
    settings = cfg.search.merge
    if deme is not None:
        base, task_vectors = Path(deme.winner["base_model"]), [Path(p) for p in deme.winner["task_vectors"]]
    else:
        base, task_vectors = Path(settings.base_model), [Path(p) for p in settings.task_vectors]
    return run_merge_stage(setup, base_model=base, task_vectors=task_vectors, plan=MergePlan.from_settings(settings),
                           merge=cfg.merge_search)


def _finished_result(cfg: PipelineConfig, search_dir: Path, state: dict,
                     log: Callable[[str], None] = log_line) -> SearchResult:
    """A finished search's result from its folder, touching nothing else: no Ray, no scoring, no MLflow. Every
    record is checked; a damaged or missing winner model is rebuilt from the stages' results (the same weights
    the saved scores were measured on)."""
    final = state["finished"]["final"]
    stages = {stage: StageOutcome.load(search_dir / stage / "outcome.json") for stage in cfg.search.stages()}
    winner = search_dir / "winner" / "model"
    try:
        check_model_folder(winner)
    except (CorruptFileError, FileNotFoundError) as error:
        _check_winner_files(stages[cfg.search.stages()[-1]], search_dir)  # what the rebuild reads
        log(f"the winner model is damaged or missing ({error}); rebuilding it from the stages' results")
        _save_winner(cfg, stages, search_dir)
    result = SearchResult(search_dir=search_dir, tracking_uri=cfg.tracking_uri(), parent_run_id=state["parent_run_id"],
                          stages=stages,
                          winner_model=winner,
                          final=RepeatedScore(metric=final["metric"], scores=final["scores"]),
                          final_images=cfg.search.final.num_samples * len(cfg.search.final.seeds),
                          stage_run_ids=dict(state["stage_runs"]), runs_page=state["finished"]["runs_page"])
    result.seconds = state["finished"]["seconds"]
    return result


def _save_winner(cfg: PipelineConfig, outcomes: dict[str, StageOutcome], search_dir: Path) -> Path:
    """The final model in diffusers format: the merged model of the last merging stage, else the ant winner."""
    target = search_dir / "winner" / "model"
    last = outcomes[cfg.search.stages()[-1]]
    if last.stage == "ant":
        model = load_model(last.winner["model"])
    else:
        model = load_model(last.winner["base_model"])
        base_state = model.state_dict()
        task_vectors = [load_task_vector(p)[0] for p in last.winner["task_vectors"]]
        options = cfg.merge_search.merge_options() if last.stage == "merge" else {}
        model.load_state_dict(TaskVectorMerger.from_task_vectors(base_state, task_vectors, **options)
                              .merge(last.winner["weights"]))
    if target.exists():
        shutil.rmtree(target)
    return save_model(model, target)


# ------------------------------------------------------------------------------------------------ MLflow


def _publish_stage(outcome: StageOutcome, run: TrackedRun, search_dir: Path, cfg: PipelineConfig) -> None:
    """The stage's run: best score, fates, images, the trials table, Optuna's figures, the merge landscape."""
    # The best score also under the metric's own name: the runs table's column for that metric then has a value
    # on the stage's row, beside its trials'.
    run.log_metrics({outcome.metric: outcome.best_score, f"best_{outcome.metric}": outcome.best_score,
                     "trials_finished": outcome.finished,
                     "trials_stopped_early": outcome.stopped_early, "trials_diverged": outcome.diverged,
                     "trials_failed": outcome.failed, "images_generated": outcome.images_generated,
                     "seconds": outcome.seconds})
    run.log_params({f"best.{k}": v for k, v in outcome.best_params.items()})
    run.set_tags({"ant_ray.best_metric": outcome.metric})
    table = outcome.trials()
    run.log_artifact(outcome.trials_csv, "trials")
    run.log_table(table, "trials/trials.json")
    figures_dir = search_dir / outcome.stage / "figures"
    for figure in study_figures(search_dir / "optuna.journal", f"{search_dir.name}-{outcome.stage}", figures_dir,
                                outcome.metric if outcome.stage != "merge" else table["metric"].iloc[0]) \
            if (search_dir / "optuna.journal").is_file() and _has_study(search_dir, outcome.stage) else []:
        run.log_artifact(figure, "figures")
    if outcome.stage == "merge":
        columns = [c for c in table.columns if c.startswith("w") or ".w" in c]
        path = merge_landscape(table, columns, outcome.best_params, figures_dir / "merge_landscape.png")
        run.log_artifact(path, "figures")


def _has_study(search_dir: Path, stage: str) -> bool:
    import optuna

    from ant_ray.search.searchers import journal_storage

    names = {s.study_name for s in optuna.get_all_study_summaries(journal_storage(search_dir / "optuna.journal"))}
    return f"{search_dir.name}-{stage}" in names


def _publish_search(result: SearchResult, parent: TrackedRun, cfg: PipelineConfig) -> None:
    metrics = {f"{name}_best_{o.metric}": o.best_score for name, o in result.stages.items()}
    if result.final is not None:  # the search's score, also under the metric's own name (the runs table's column)
        metrics[result.final.metric] = result.final.mean
        metrics[f"final_{result.final.metric}_mean"] = result.final.mean
        if result.final.half_width is not None:
            metrics[f"final_{result.final.metric}_ci95"] = result.final.half_width
    metrics.update({"images_generated": result.images_generated, "seconds": result.seconds})
    parent.log_metrics(metrics)
    parent.set_tags({"ant_ray.winner_model": str(result.winner_model)})
    trials = result.trials
    trials_csv = result.search_dir / "trials.csv"
    trials.to_csv(trials_csv, index=False)
    parent.log_artifact(trials_csv)
    parent.log_table(trials, "trials.json")
    copy_stage_figures(parent, result.search_dir, result.stages)
    scorer = FIDScorer(cfg, cfg.output_path() / "cache" / "fid")
    grid = scorer.sample(model_denoiser(load_model(result.winner_model).to(scorer.device).eval()), 64, cfg.seed)
    parent.log_artifact(save_image_grid(grid, result.search_dir / "winner" / "samples.png"))
    parent.log_text(result.search_dir / "summary.txt", result.table())
