"""The result of a comparison run (several arms x seeds): a mean/std table for MLflow and Markdown."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from ant_ray.config import PipelineConfig
from ant_ray.tracking import TrackedRun, setup_experiment


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_").lower()


@dataclass
class ComparisonResult:
    metric: str
    seeds: list[int]
    scores: dict[str, list[float]] = field(default_factory=dict)  # arm -> one FID per seed

    def markdown(self, title: str) -> str:
        lines = [f"### {title}", "", f"| arm | {self.metric} mean | std | per seed ({', '.join(map(str, self.seeds))}) |",
                 "| --- | --- | --- | --- |"]
        for arm, values in self.scores.items():
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            lines.append(f"| {arm} | {statistics.mean(values):.2f} | {std:.2f} | "
                         f"{', '.join(f'{v:.2f}' for v in values)} |")
        return "\n".join(lines)

    def publish(self, run: TrackedRun, title: str, report: Path | None) -> None:
        """Per-arm means as metrics of `run`; the table as its artifact and, if asked, at `report`."""
        for arm, values in self.scores.items():
            run.log_metrics({f"{slug(arm)}_mean": statistics.mean(values)})
        if report is not None:
            report.parent.mkdir(parents=True, exist_ok=True)
            run.log_text(report, self.markdown(f"{title}, {time.strftime('%Y-%m-%d')}"))


def start_comparison_run(cfg: PipelineConfig, seeds: list[int], stage: str) -> tuple[TrackedRun, str]:
    """The parent MLflow run of a comparison (every arm x seed is its child); returns it and the experiment id."""
    uri = cfg.tracking_uri()
    experiment_id = setup_experiment(uri, cfg.tracking.experiment, cfg.output_path() / "mlartifacts")
    parent = TrackedRun.start(uri, experiment_id, f"{cfg.name}-{stage.replace('_', '-')}",
                              tags={"ant_ray.stage": stage})
    parent.log_params({"seeds": seeds, **cfg.model_dump(mode="json")})
    return parent, experiment_id
