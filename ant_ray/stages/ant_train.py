"""ANT clustered-MTL training from the driver: resolve the clusters, train on Ray Train, score, track in MLflow.

1. Clusters: interval clustering of [0, T) into ``ant.k`` intervals by timestep, SNR or gradient affinity. Gradient
   clustering first measures the bucket affinity of the starting model (after ``ant.affinity.warmup_steps`` plain
   training steps if asked) in a Ray task holding the training resources, and logs it as a heatmap and a .npy file.
2. Training: a ``TorchTrainer`` (Train V2) runs ``train_ant`` on ``ant.resources.num_workers`` workers (gloo on
   CPU, NCCL on GPU); rank 0 logs per-step metrics into this stage's MLflow run.
3. Score: FID of the EMA model (the configured sampler, extractor and sample count) in a Ray task.

Everything of the run lives in one run directory recorded in MLflow (``ant_ray.run_dir``).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import ray
import torch

from ant_ray.ant.affinity import affinity_heatmap, average_affinity, expand_bucket_affinity
from ant_ray.ant.affinity_stage import bucket_affinity, draw_affinity_batch
from ant_ray.ant.clustering import interval_clustering
from ant_ray.config import PipelineConfig
# Only what a search trial needs to launch an ANT run is imported here; the models, data and scorer load in the
# functions that use them (see train_loops.py).
from ant_ray.diffusion import NoiseSchedule, build_weighting, model_denoiser
from ant_ray.stages.ray_runtime import start_ray
from ant_ray.stages.ray_train import fit
from ant_ray.stages.train_loops import ant_loop, diffusion_loop
from ant_ray.files import check_output_dir, publish_text
from ant_ray.tracking import TrackedRun, check_tracking_store, setup_experiment, worker_env, ui_command


@dataclass
class ANTResult:
    name: str
    method: str
    clustering: str
    intervals: list[tuple[int, int]]
    run_dir: Path
    ema_model: Path
    model: Path
    tracking_uri: str
    run_id: str
    metric: str
    fid: float | None = None
    images_per_s: float | None = None
    cluster_losses: dict[str, float] = field(default_factory=dict)
    affinity_file: Path | None = None
    seconds: float = 0.0

    def table(self) -> str:
        lines = [f"ANT run {self.name}: method {self.method}, {self.clustering} clustering into "
                 f"{len(self.intervals)} intervals {self.intervals}"]
        if self.fid is not None:
            lines.append(f"{self.metric} (EMA model): {self.fid:.3f}")
        lines += [f"{name}: {value:.4f}" for name, value in sorted(self.cluster_losses.items())]
        if self.images_per_s:
            lines.append(f"throughput: {self.images_per_s:.0f} images/s")
        if self.affinity_file is not None:
            lines.append(f"task affinity: {self.affinity_file}")
        lines += [f"EMA model: {self.ema_model}", f"run directory: {self.run_dir}",
                  f"finished in {self.seconds / 60:.1f} min", f"MLflow UI: {ui_command(self.tracking_uri)}"]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ clusters


def resolve_clusters(cfg: PipelineConfig, *, affinity: np.ndarray | None = None) -> list[tuple[int, int]]:
    """The k intervals of ``cfg.ant``; gradient clustering needs the [B, B] bucket ``affinity``."""
    ant, T = cfg.ant, cfg.diffusion.T
    bounds = {"min_size": ant.min_size, "max_size": ant.max_size}
    if ant.clustering == "timestep":
        return interval_clustering(ant.k, "timestep", T=T, **bounds)
    if ant.clustering == "snr":
        snr = NoiseSchedule.create(cfg.diffusion.schedule, T).snr().numpy()
        return interval_clustering(ant.k, "snr", snr=snr, **bounds)
    if affinity is None:
        raise ValueError("ant.clustering='gradient' needs the bucket affinity: pass affinity=measure_affinity(...)")
    return interval_clustering(ant.k, "gradient", affinity=expand_bucket_affinity(affinity, T), **bounds)


def measure_affinity(cfg: PipelineConfig, model_source: str | None, device: torch.device | None = None) -> np.ndarray:
    """[B, B] bucket affinity (``cfg.ant.affinity``) of a model: a diffusers folder, or None for ``model.base``
    built exactly as ``train_ant`` builds it (same seed)."""
    from ant_ray.diffusion.models import build_model, load_model
    from ant_ray.evaluation import load_reference_dataset, pick_device

    device = device or pick_device(cfg)
    data = load_reference_dataset(cfg)
    if model_source:
        model = load_model(model_source, resolution=cfg.data.resolution, channels=cfg.data.channels)
    else:
        model = build_model(cfg.model.base, resolution=cfg.data.resolution, channels=cfg.data.channels,
                            seed=cfg.seed)
    model.to(device).eval()  # eval: no dropout noise in the gradients being compared
    settings = cfg.ant.affinity
    batch = draw_affinity_batch(data.images.to(device), cfg.diffusion.T, buckets=settings.buckets,
                                samples_per_bucket=settings.samples_per_bucket, seed=cfg.seed)
    return bucket_affinity(model_denoiser(model), model.parameters(), batch,
                           NoiseSchedule.create(cfg.diffusion.schedule, cfg.diffusion.T),
                           target=cfg.diffusion.prediction,
                           weighting=build_weighting(cfg.ant.weighting.name, **cfg.ant.weighting.options),
                           sketch_dim=settings.sketch_dim, seed=cfg.seed, chunk_size=cfg.ant.batch_size)


@ray.remote
def _measure_affinity_remote(cfg_dump: dict, model_source: str | None) -> np.ndarray:
    return measure_affinity(PipelineConfig.model_validate(cfg_dump), model_source)


def _task_options(cfg: PipelineConfig) -> dict[str, float]:
    """A driver-side task (affinity, FID) holds what one training worker holds, so it runs where training can."""
    return {"num_cpus": cfg.ant.resources.cpu, "num_gpus": cfg.ant.resources.gpu}


def _affinity_models(cfg: PipelineConfig, run_dir: Path, run_key: str) -> list[str | None]:
    """The models whose affinity is measured and averaged (ANT Sec. 3.2 averages over training): ant.init_model
    (or model.base) after warmup_steps x j of plain training (the pretraining loop), j = 1..checkpoints; each
    stage continues the previous one (same Ray Train run, resumed from its checkpoint). With warmup_steps = 0,
    the starting model itself. ANT training still starts from the unwarmed model."""
    start = cfg.ant.init_model
    settings = cfg.ant.affinity
    if settings.warmup_steps == 0:
        return [start]
    models: list[str | None] = []
    for j in range(1, settings.checkpoints + 1):
        steps = settings.warmup_steps * j
        out = run_dir / "affinity" / f"warmup_model_{steps}"
        warm_cfg = cfg.model_copy(update={"ant": cfg.ant.model_copy(
            update={"steps": steps, "checkpoint_every": settings.warmup_steps})})
        warmup = {"range": None, "init_model": start, "teacher_model": None, "output_model": str(out),
                  "tracking": None, "seed": cfg.seed, "name": "ant-warmup"}
        fit(diffusion_loop, {"pipeline": warm_cfg.worker_dump(), "section": "ant", "name": "ant-warmup",
                              "models": [warmup], "evaluation": None},
            name=f"ant-warmup-{cfg.name}-{run_key}", storage=cfg.output_path() / "ray_results",
            resources=cfg.ant.resources)
        models.append(str(out))
    return models


def stage_affinity(cfg: PipelineConfig, run_dir: Path, run_key: str,
                   run: TrackedRun | None) -> tuple[np.ndarray, Path]:
    """The [B, B] bucket affinity of the starting model (averaged over warm-up checkpoints), measured in Ray tasks
    holding the training resources, saved as .npy + heatmap under run_dir/affinity and logged to ``run``. It does
    not depend on k or the MTL method, so a search measures it once for all its trials."""
    sources = _affinity_models(cfg, run_dir, run_key)
    cfg_dump = cfg.worker_dump()
    affinity = average_affinity(ray.get([_measure_affinity_remote.options(**_task_options(cfg)).remote(
        cfg_dump, source) for source in sources]))
    folder = run_dir / "affinity"
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "bucket_affinity.npy", affinity)
    affinity_heatmap(affinity, folder / "bucket_affinity.png",
                     title=f"Task affinity ({cfg.ant.affinity.buckets} timestep buckets)")
    if run is not None:
        run.log_artifact(folder / "bucket_affinity.npy", "affinity")
        run.log_artifact(folder / "bucket_affinity.png", "affinity")
    return affinity, folder / "bucket_affinity.npy"


# ------------------------------------------------------------------------------------------------ training


def fit_ant(cfg: PipelineConfig, *, name: str, storage: Path, loop: dict[str, Any], callbacks: Sequence[Any] = (),
            max_failures: int = 0) -> ray.train.Result:
    """Run ``train_ant`` on Ray Train with ``ant.resources``; returns the Result (return_value: rank 0's summary).
    Re-running with the same name and storage resumes from the run's last checkpoint."""
    return fit(ant_loop, {"pipeline": cfg.worker_dump(), "name": name, **loop}, name=name,
               storage=storage, resources=cfg.ant.resources, callbacks=callbacks, max_failures=max_failures)


def _log(message: str) -> None:
    print(f"[ant_ray {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_ant(cfg: PipelineConfig, *, resume_from: str | Path | None = None, score: bool = True,
            parent_run_id: str | None = None) -> ANTResult:
    """The ``train-ant`` stage end to end. ``resume_from``: a checkpoint folder of an earlier ANT run to continue
    (its ``checkpoint/``); ``score=False`` skips the final FID."""
    from ant_ray.evaluation import load_reference_dataset, metric_name
    from ant_ray.stages.evaluate import score_in_parallel

    started = time.time()
    data = load_reference_dataset(cfg)
    if cfg.ant.batch_size > len(data):
        raise ValueError(f"ant.batch_size ({cfg.ant.batch_size}) exceeds the dataset size ({len(data)})")
    if resume_from is not None and not (Path(resume_from) / "state.json").is_file():
        raise FileNotFoundError(f"resume_from={str(resume_from)!r} is not a checkpoint folder (no state.json)")
    out = cfg.output_path()
    check_output_dir(out)
    check_tracking_store(cfg.tracking_uri())
    run_key = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    name = f"{cfg.name}-ant-{run_key}"
    run_dir = out / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=False)

    uri = cfg.tracking_uri()
    experiment_id = setup_experiment(uri, cfg.tracking.experiment, out / "mlartifacts")
    ant = cfg.ant
    run = TrackedRun.start(uri, experiment_id, f"{name}-{ant.method}", parent_run_id=parent_run_id,
                           tags={"ant_ray.stage": "ant", "ant_ray.run_dir": str(run_dir),
                                 "ant_ray.method": ant.method, "ant_ray.clustering": ant.clustering})
    run.log_params({"ant": ant.model_dump(mode="json"), "data": cfg.data.model_dump(mode="json"),
                    "diffusion": cfg.diffusion.model_dump(mode="json"), "model": cfg.model.model_dump(mode="json"),
                    "seed": cfg.seed})
    result = ANTResult(name=name, method=ant.method, clustering=ant.clustering, intervals=[], run_dir=run_dir,
                       ema_model=run_dir / "ema", model=run_dir / "model", tracking_uri=uri, run_id=run.run_id,
                       metric=metric_name(cfg))
    try:
        _log(start_ray(cfg.ray.address, num_cpus=cfg.ray.num_cpus, env=worker_env()))

        # 1. clusters
        affinity = None
        if ant.clustering == "gradient":
            _log(f"measuring task affinity ({ant.affinity.buckets} buckets)")
            affinity, result.affinity_file = stage_affinity(cfg, run_dir, run_key, run)
        result.intervals = resolve_clusters(cfg, affinity=affinity)
        publish_text(run_dir / "intervals.json", json.dumps(result.intervals))
        run.log_artifact(run_dir / "intervals.json")
        run.log_params({"ant.intervals": json.dumps(result.intervals)})
        _log(f"{ant.clustering} clustering: {result.intervals}")

        # 2. training
        _log(f"training {ant.steps} steps of ANT-{ant.method} on {ant.resources.num_workers} worker(s)")
        fit = fit_ant(cfg, name=name, storage=out / "ray_results",
                      loop={"intervals": [list(iv) for iv in result.intervals], "init_model": ant.init_model,
                            "output_dir": str(run_dir), "tracking": run.handle(), "seed": cfg.seed,
                            "resume_from": str(resume_from) if resume_from is not None else None})
        summary = fit.return_value or {}
        result.images_per_s = summary.get("images_per_s")
        result.cluster_losses = summary.get("cluster_losses", {})
        run.set_tags({"ant_ray.model_dir": str(result.ema_model)})

        # 3. FID of the EMA model
        if score:
            _log(f"scoring the EMA model ({result.metric})")
            result.fid = score_in_parallel(cfg, out / "cache" / "fid", {"ema": ([str(result.ema_model)], None)},
                                           resources=ant.resources)["ema"]
            run.log_metrics({result.metric: result.fid}, step=ant.steps)
        result.seconds = time.time() - started
        run.log_metrics({"seconds": result.seconds}, step=ant.steps)
        run.log_text(run_dir / "summary.txt", result.table())
        run.finish()
        return result
    except BaseException:
        run.finish("FAILED")
        raise
