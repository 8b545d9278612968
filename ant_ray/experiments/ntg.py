"""Negative transfer gap (ANT Eq. 3, App. A): does a model trained only on the tasks D[a, b) denoise its interval
better than the model trained on all tasks?

For each interval [a, b): train an interval model on timesteps in [a, b) only (same iterations and settings as the
all-task model), then sample with the all-task model everywhere except inside [a, b), where the interval model
takes over. NTG = FID(mixed sampler) - FID(all-task model); a negative gap means negative transfer (the interval
was hurt by sharing the model with the other tasks).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


from ant_ray.config import PipelineConfig
from ant_ray.evaluation import metric_name
from ant_ray.stages.evaluate import score_in_parallel
from ant_ray.stages.ray_runtime import start_ray
from ant_ray.stages.pretrain import pretrained_model
from ant_ray.stages.ray_train import fit
from ant_ray.stages.train_loops import diffusion_loop
from ant_ray.tracking import TrackedRun, setup_experiment, worker_env


@dataclass
class NTGResult:
    metric: str
    all_task_fid: float
    gaps: dict[tuple[int, int], float] = field(default_factory=dict)  # interval -> FID(mixed) - FID(all-task)
    mixed_fids: dict[tuple[int, int], float] = field(default_factory=dict)

    def table(self) -> str:
        lines = [f"all-task model {self.metric}: {self.all_task_fid:.3f}", "",
                 f"{'interval':<14}{'mixed ' + self.metric:<22}NTG (negative: negative transfer)"]
        for interval, gap in self.gaps.items():
            lines.append(f"[{interval[0]}, {interval[1]})".ljust(14) + f"{self.mixed_fids[interval]:<22.3f}{gap:+.3f}")
        return "\n".join(lines)


def routed_ranges(interval: tuple[int, int], T: int) -> tuple[list[list[int]], list[int]]:
    """Ranges covering [0, T) and, for each, 0 (all-task model) or 1 (interval model)."""
    a, b = interval
    pieces = [((0, a), 0), ((a, b), 1), ((b, T), 0)]
    kept = [(list(r), who) for r, who in pieces if r[0] < r[1]]
    return [r for r, _ in kept], [who for _, who in kept]


def equal_intervals(k: int, T: int) -> list[tuple[int, int]]:
    return [(i * T // k, (i + 1) * T // k) for i in range(k)]


def bar_chart(result: NTGResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"[{a},{b})" for a, b in result.gaps]
    values = list(result.gaps.values())
    fig, ax = plt.subplots(figsize=(1.2 * len(values) + 2, 3))
    ax.bar(labels, values, color=["tab:red" if v < 0 else "tab:blue" for v in values])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel(f"NTG ({result.metric})")
    ax.set_title("negative transfer gap per interval (negative: negative transfer)")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def run_ntg(cfg: PipelineConfig, intervals: list[tuple[int, int]]) -> NTGResult:
    T = cfg.diffusion.T
    for a, b in intervals:
        if not 0 <= a < b <= T:
            raise ValueError(f"--intervals: [{a}, {b}) is not a non-empty interval inside [0, {T})")
    uri = cfg.tracking_uri()
    out = cfg.output_path()
    experiment_id = setup_experiment(uri, cfg.tracking.experiment, out / "mlartifacts")
    run = TrackedRun.start(uri, experiment_id, f"{cfg.name}-ntg", tags={"ant_ray.stage": "ntg"})
    run.log_params({"intervals": intervals, **cfg.pretrain.model_dump(mode="json")})
    try:
        start_ray(cfg.ray.address, num_cpus=cfg.ray.num_cpus, env=worker_env())
        (out / "runs").mkdir(parents=True, exist_ok=True)
        run_dir = Path(tempfile.mkdtemp(prefix=f"{cfg.name}-ntg-{time.strftime('%Y%m%d-%H%M%S')}-", dir=out / "runs"))
        run.set_tags({"ant_ray.run_dir": str(run_dir)})
        all_task, _ = pretrained_model(cfg, run_dir=run_dir, tracking=None)
        # Interval models: the pretraining recipe (from scratch, same steps), restricted to [a, b); all of them side
        # by side in one Ray Train run (one worker group per interval).
        models = [{"range": [a, b], "init_model": None, "teacher_model": None, "tracking": None, "seed": cfg.seed,
                   "output_model": str(run_dir / f"interval_{a}_{b}" / "model"), "name": f"interval-{a}-{b}"}
                  for a, b in intervals]
        fit(diffusion_loop, {"pipeline": cfg.worker_dump(), "section": "pretrain",
                              "name": f"ntg-{run_dir.name}", "models": models, "evaluation": None},
            name=f"ntg-{run_dir.name}", storage=out / "ray_results", resources=cfg.pretrain.resources,
            models=len(models))
        specialists = {interval: Path(m["output_model"]) for interval, m in zip(intervals, models)}
        jobs = {"all": ([str(all_task)], None)}
        for interval, folder in specialists.items():
            ranges, who = routed_ranges(interval, T)
            models = [str(all_task), str(folder)]
            jobs[f"{interval[0]},{interval[1]}"] = ([models[w] for w in who], ranges)
        scores = score_in_parallel(cfg, out / "cache" / "fid", jobs)
        metric = metric_name(cfg)
        result = NTGResult(metric=metric, all_task_fid=scores["all"])
        for interval in intervals:
            result.mixed_fids[interval] = scores[f"{interval[0]},{interval[1]}"]
            result.gaps[interval] = result.mixed_fids[interval] - result.all_task_fid
            run.log_metrics({f"ntg_{interval[0]}_{interval[1]}": result.gaps[interval]})
        run.log_metrics({f"all_task_{metric}": result.all_task_fid})
        run.log_artifact(bar_chart(result, run_dir / "ntg.png"))
        run.log_text(run_dir / "ntg.txt", result.table())
        run.finish()
        return result
    except BaseException:
        run.finish("FAILED")
        raise
