"""The main job: pretrain -> N DeMe specialists in parallel -> merge-weight search -> summary table.

Each stage is an MLflow child run of one pipeline run; every artifact lives under one run directory whose path is
recorded in MLflow (`ant_ray.run_dir`), so nothing depends on the current working directory.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ant_ray.commands import command
from ant_ray.config import PipelineConfig
from ant_ray.deme.projection import add_channel_projections, channel_projection_places
from ant_ray.deme.ranges import specialist_ranges
from ant_ray.diffusion import build_model, load_model, model_denoiser, save_model
from ant_ray.data import ImageDataset, save_image_grid
from ant_ray.evaluation import FIDScorer, load_reference_dataset, metric_name
from ant_ray.config import SearcherConfig
from ant_ray.merge import TaskVectorMerger, load_task_vector, state_dict_fingerprint
from ant_ray.search.merge_stage import MergePlan, check_task_vectors, run_merge_stage
from ant_ray.search.tune_runs import StageSetup
from ant_ray.stages.deme_finetune import finetune_specialists
from ant_ray.stages.evaluate import score_in_parallel
from ant_ray.stages.pretrain import pretrained_model
from ant_ray.stages.ray_runtime import start_ray
from ant_ray.files import check_output_dir, publish_text
from ant_ray.tracking import (TrackedRun, check_tracking_store, save_runs_view, setup_experiment, ui_command,
                              worker_env)


@dataclass
class PipelineResult:
    metric: str
    run_dir: Path
    tracking_uri: str
    pipeline_run_id: str
    scores: dict[str, float] = field(default_factory=dict)
    ranges: list[tuple[int, int]] = field(default_factory=list)
    best_weights: list[float] | dict[str, list[float]] = field(default_factory=list)
    merge_trials: int = 0
    merge_images_to_best: int = 0
    merge_images_generated: int = 0
    seconds: float = 0.0
    runs_page: str | None = None  # the MLflow UI's page for the runs (tracking.save_runs_view)

    def table(self) -> str:
        rows = [("model", self.metric)] + [(k, f"{v:.3f}") for k, v in self.scores.items()]
        width = max(len(r[0]) for r in rows) + 2
        lines = [f"{a:<{width}}{b}" for a, b in rows]
        lines.insert(1, "-" * (width + len(self.metric)))
        lines += ["", f"best merge weights: {_format_weights(self.best_weights)} ({self.merge_trials} trials, "
                      f"{self.merge_images_to_best} of {self.merge_images_generated} generated images to the best)",
                  f"specialist ranges: {self.ranges}",
                  f"run directory: {self.run_dir}",
                  f"finished in {self.seconds / 60:.1f} min",
                  f"MLflow UI: {ui_command(self.tracking_uri, self.runs_page)}"]
        return "\n".join(lines)


def _format_weights(weights) -> str:
    if isinstance(weights, dict):
        return "; ".join(f"{g}: {_format_weights(w)}" for g, w in weights.items())
    return ", ".join(f"{w:.3f}" for w in weights)


def _metric_key(label: str) -> str:
    """'specialist 0 [0, 500]' -> 'specialist_0': MLflow metric names allow few characters."""
    return re.sub(r"[^A-Za-z0-9]+", "_", label.split(" [")[0].split(" (")[0]).strip("_")


def _log(message: str) -> None:
    print(f"[ant_ray {time.strftime('%H:%M:%S')}] {message}", flush=True)


def check_inputs(cfg: PipelineConfig) -> ImageDataset:
    """Fail on bad input before any expensive work: the dataset loads, the base model builds, FID can be set up.
    Returns the dataset."""
    data = load_reference_dataset(cfg)
    build_model(cfg.model.base, resolution=cfg.data.resolution, channels=cfg.data.channels)
    if cfg.pretrain.batch_size > len(data) or cfg.finetune.batch_size > len(data):
        raise ValueError(f"pretrain.batch_size / finetune.batch_size must not exceed the dataset size ({len(data)})")
    if cfg.fid.extractor == "inception":
        from ant_ray.fid import ensure_inception_weights

        ensure_inception_weights()
    return data


def _prepare_run_dir(cfg: PipelineConfig, resume: Path | None) -> tuple[Path, str]:
    """A new run directory with the config saved in it, or the one to resume after checking its config matches."""
    config_text = yaml.safe_dump(cfg.model_dump(mode="json", exclude={"ray"}), sort_keys=True)
    if resume is None:
        run_key = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
        run_dir = cfg.output_path() / "runs" / f"{cfg.name}-{run_key}"
        run_dir.mkdir(parents=True, exist_ok=False)
        publish_text(run_dir / "config.yaml", config_text)
        return run_dir, run_key
    run_dir = Path(resume).expanduser().resolve()
    saved = run_dir / "config.yaml"
    if not saved.is_file() or not run_dir.name.startswith(f"{cfg.name}-"):
        raise ValueError(f"--resume {run_dir} is not a run directory of {cfg.name!r} (expected "
                         f"{cfg.output_path() / 'runs'}/{cfg.name}-<date>-<id> with a config.yaml)")
    if saved.read_text() != config_text:
        raise ValueError(f"--resume {run_dir}: that run used another configuration (see its config.yaml); resume "
                         "with the same config and --set overrides, or start a new run")
    return run_dir, run_dir.name.removeprefix(f"{cfg.name}-")


def run_pipeline(cfg: PipelineConfig, *, parent_run_id: str | None = None,
                 resume: Path | None = None) -> PipelineResult:
    """Run the pipeline; `resume` continues an interrupted run directory: finished specialists are kept,
    interrupted ones continue from their last checkpoint, and the merge search runs again."""
    started = time.time()
    dataset = check_inputs(cfg)
    check_output_dir(cfg.output_path())
    check_tracking_store(cfg.tracking_uri())
    out = cfg.output_path()
    cache_dir = out / "cache" / "fid"
    run_dir, run_key = _prepare_run_dir(cfg, resume)

    uri = cfg.tracking_uri()
    experiment_id = setup_experiment(uri, cfg.tracking.experiment, out / "mlartifacts")
    pipeline = TrackedRun.start(uri, experiment_id, f"{cfg.name}-{run_key}", parent_run_id=parent_run_id,
                                tags={"ant_ray.stage": "pipeline", "ant_ray.run_dir": str(run_dir),
                                      "ant_ray.resumed": resume is not None})
    pipeline.log_params(cfg.model_dump(mode="json"))
    pipeline.log_dataset(dataset, cfg.data.path if cfg.data.dataset != "digits" else None)
    result = PipelineResult(metric=metric_name(cfg), run_dir=run_dir, tracking_uri=uri,
                            pipeline_run_id=pipeline.run_id, ranges=specialist_ranges(cfg),
                            runs_page=save_runs_view(uri, experiment_id, [metric_name(cfg), "loss"]))

    open_runs: list[TrackedRun] = [pipeline]

    def child(name: str, stage: str) -> TrackedRun:
        run = TrackedRun.start(uri, experiment_id, name, parent_run_id=pipeline.run_id,
                               tags={"ant_ray.stage": stage, "ant_ray.run_dir": str(run_dir)})
        open_runs.append(run)
        return run

    def finish(run: TrackedRun) -> None:
        run.finish()
        open_runs.remove(run)

    try:
        _log(start_ray(cfg.ray.address, num_cpus=cfg.ray.num_cpus, env=worker_env()))
        _log(f"FID setup: {result.metric} ({cfg.fid.extractor} features, reference statistics cached in {cache_dir})")
        scorer = FIDScorer(cfg, cache_dir)  # trains/caches the domain extractor and reference stats, on the driver

        # 1. pretrain (or reuse the cached model)
        pre_run = child("pretrain", "pretrain")
        pre_run.log_params(cfg.pretrain.model_dump(mode="json"))
        base, reused = pretrained_model(cfg, run_dir=run_dir, tracking=pre_run.handle())
        pre_run.set_tags({"ant_ray.reused_cache": reused, "ant_ray.model_dir": str(base)})
        finish(pre_run)  # its work is done; its FID is logged into it once scored, with the specialists'
        _log(f"pretrained model: {base} ({'reused from cache' if reused else 'trained'})")
        pretrained = base
        if cfg.finetune.channel_projection:
            # The base gets the same identity projections, so task vectors include them (W_i - I) and the
            # merged model keeps them; identity projections leave the base's outputs unchanged.
            projected = add_channel_projections(load_model(base), places=cfg.finetune.projection_places)
            base = save_model(projected, run_dir / "base_with_projections")
            _log(f"channel-wise projections at {channel_projection_places(projected)}")

        # 2. finetune the N range specialists concurrently
        ranges = specialist_ranges(cfg)
        spec_runs = [child(f"specialist-{i}-[{a},{b})", "finetune") for i, (a, b) in enumerate(ranges)]
        for run, (a, b) in zip(spec_runs, ranges):
            run.log_params({"range": f"{a},{b}", "p": cfg.finetune.p,
                            "lambda": cfg.finetune.consistency_weight, **cfg.finetune.model_dump(mode="json")})
        _log(f"finetuning {len(ranges)} specialists on ranges {ranges} in parallel (one Ray Train run)")
        finetuned = finetune_specialists(cfg, base_model=base, ranges=ranges, run_dir=run_dir,
                                         name=f"specialists-{run_key}", trackings=[r.handle() for r in spec_runs])
        specialists, tv_paths = finetuned.models, finetuned.task_vectors
        for run, path in zip(spec_runs, tv_paths):
            run.log_artifact(path, "task_vector")  # saved with its range, p, lambda and the base's fingerprint
            finish(run)

        # 4. scores of the pretrained model, each specialist and the routed ensemble, in parallel on Ray
        _log(f"scoring pretrained, specialists and ensemble ({result.metric})")
        jobs = {"pretrained": ([str(pretrained)], None)}
        jobs.update({f"specialist {i} {list(r)}": ([str(f)], None) for i, (f, r) in enumerate(zip(specialists, ranges))})
        jobs["DeMe ensemble (before merge)"] = ([str(f) for f in specialists], [list(r) for r in ranges])
        scores = score_in_parallel(cfg, cache_dir, jobs)
        pre_run.log_metrics({result.metric: scores["pretrained"]})  # into finished runs: MLflow allows it
        for i, run in enumerate(spec_runs):
            run.log_metrics({result.metric: scores[f"specialist {i} {list(ranges[i])}"]})

        # 5. merge-weight search with Ray Tune + Optuna (the search's merge stage at one fidelity); each candidate is
        #    a child run of the search run
        search_run = child("merge-search", "merge_search")
        search_run.log_params(cfg.merge_search.model_dump(mode="json"))
        base_state = load_model(base).state_dict()
        check_task_vectors(tv_paths, state_dict_fingerprint(base_state))
        ms = cfg.merge_search
        _log(f"searching merge weights ({ms.method}): " + (f"{ms.num_trials} candidates, Optuna TPE, anchors first"
             if ms.searcher == "optuna" else "coarse grid + fine grid"))
        setup = StageSetup(cfg=cfg, search_dir=run_dir, tracking_uri=uri, experiment_id=experiment_id,
                           stage_run=search_run, study_name=f"{cfg.name}-{run_key}", resume=resume is not None,
                           log=_log)
        plan = MergePlan(fidelities=[cfg.fid.num_samples], num_candidates=ms.num_trials, reduction_factor=3.0,
                         searcher=SearcherConfig(name="tpe" if ms.searcher == "optuna" else "grid", seed=cfg.seed),
                         max_concurrent=ms.max_concurrent, cpu=ms.resources.cpu, gpu=ms.resources.gpu)
        outcome = run_merge_stage(setup, base_model=base, task_vectors=tv_paths, plan=plan, merge=ms)
        weights = outcome.winner["weights"]
        trials = outcome.trials()
        best_index = int(trials["fid"].idxmin())
        search_run.log_metrics({result.metric: outcome.best_score, f"best_{result.metric}": outcome.best_score,
                                "trials": len(trials),
                                "images_generated": outcome.images_generated,
                                "images_to_best": (best_index + 1) * cfg.fid.num_samples})
        search_run.log_params({"best_weights": weights})
        task_vectors = [load_task_vector(p)[0] for p in tv_paths]

        # 6. the merged model: written once, for the best weights only
        merged = load_model(base)
        merged.load_state_dict(TaskVectorMerger.from_task_vectors(base_state, task_vectors,
                                                                  **cfg.merge_search.merge_options()).merge(weights))
        merged_dir = save_model(merged, run_dir / "merged" / "model")
        search_run.set_tags({"ant_ray.model_dir": str(merged_dir)})
        grid = scorer.sample(model_denoiser(merged.to(scorer.device).eval()), 64, cfg.seed)
        search_run.log_artifact(save_image_grid(grid, run_dir / "merged" / "samples.png"))
        finish(search_run)
        scores["DeMe merged (best weights)"] = outcome.best_score

        result.scores, result.best_weights, result.merge_trials = scores, weights, len(trials)
        result.merge_images_to_best = (best_index + 1) * cfg.fid.num_samples
        result.merge_images_generated = outcome.images_generated
        result.seconds = time.time() - started
        pipeline.log_metrics({f"{_metric_key(k)}_{result.metric}": v for k, v in scores.items()})
        pipeline.log_metrics({result.metric: outcome.best_score})  # the pipeline's model is the merged one
        pipeline.log_metrics({"seconds": result.seconds})
        pipeline.log_text(run_dir / "summary.txt", result.table())
        finish(pipeline)
        return result
    except BaseException as err:
        # Mark what was running as failed, with the reason; finished runs, checkpoints and cached models stay.
        status = "KILLED" if isinstance(err, (KeyboardInterrupt, SystemExit)) else "FAILED"
        for run in reversed(open_runs):
            run.set_tags({"ant_ray.failure": f"{type(err).__name__}: {err}"[:500]})
            run.finish(status)
        _log(f"run stopped ({type(err).__name__}); continue it with: {command('ant-ray')} run CONFIG --resume {run_dir}")
        raise
