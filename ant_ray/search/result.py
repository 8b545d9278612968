"""What `ant-ray search` / `ant_ray.launch_search` return: per stage the best configuration and its score, the
final winner's re-scored FID, its model folder, the MLflow run ids and every trial."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ant_ray.search.outcome import StageOutcome
from ant_ray.stages.evaluate import RepeatedScore
from ant_ray.tracking import ui_command


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "(" + ", ".join(_format_value(v) for v in value) + ")"
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_format_value(v)}" for k, v in value.items())
    return str(value)


@dataclass
class SearchResult:
    search_dir: Path
    tracking_uri: str
    parent_run_id: str
    stages: dict[str, StageOutcome]
    winner_model: Path
    final: RepeatedScore | None = None
    seconds: float = 0.0
    final_images: int = 0
    stage_run_ids: dict[str, str] = field(default_factory=dict)
    runs_page: str | None = None  # the MLflow UI's page for the search's runs (tracking.save_runs_view)

    @property
    def best(self) -> dict[str, dict[str, Any]]:
        """Per stage, the winning values (merge: the weights)."""
        return {name: (dict(o.best_params) if name != "merge" else {"weights": o.winner["weights"]})
                for name, o in self.stages.items()}

    @property
    def scores(self) -> dict[str, tuple[str, float]]:
        """Per stage, (metric, best score); the metric names the fidelity it was measured at."""
        return {name: (o.metric, o.best_score) for name, o in self.stages.items()}

    @property
    def trials(self) -> pd.DataFrame:
        """Every trial of every stage, one row each, with a `stage` column."""
        frames = [o.trials().assign(stage=name) for name, o in self.stages.items()]
        table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        for column in table.select_dtypes("float").columns:  # a stage without the column made NaNs: 2.0 -> 2
            values = table[column].dropna()
            if len(values) and (values == values.round()).all():
                table[column] = table[column].astype("Int64")
        return table

    @property
    def images_generated(self) -> int:
        return sum(o.images_generated for o in self.stages.values()) + self.final_images

    def table(self) -> str:
        rows = [("stage", "trials", "best", "score")]
        for name, o in self.stages.items():
            if name == "merge":
                sizes = o.extra.get("rung_sizes", [])
                count = f"{sizes[0] if sizes else o.finished} candidates, {' -> '.join(map(str, sizes))} per rung"
                best = "weights " + _format_value(o.winner["weights"])
            else:
                total = o.finished + o.stopped_early + o.diverged + o.failed
                count = (f"{total}: {o.finished} finished, {o.stopped_early} stopped early"
                         + (f", {o.diverged} diverged" if o.diverged else "") + (f", {o.failed} failed" if o.failed else ""))
                best = ", ".join(f"{k}={_format_value(v)}" for k, v in o.best_params.items()) or "(no space)"
            rows.append((name, count, best, f"{o.metric} {o.best_score:.3f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "-" * len(lines[0]))
        if len({o.metric for o in self.stages.values()}) > 1:
            lines.append("(scores on different sample counts are not comparable: FID falls as the count grows)")
        if self.final is not None:
            lines += ["", f"final: {self.final.metric} {self.final.text()}"]
        images = ", ".join(f"{n} {o.images_generated:,}" for n, o in self.stages.items())
        lines += [f"images generated: {images}" + (f", final {self.final_images:,}" if self.final_images else ""),
                  f"winner model: {self.winner_model} (diffusers format; 64 samples of it in "
                  f"{Path(self.winner_model).parent / 'samples.png'})",
                  f"search directory: {self.search_dir}",
                  f"finished in {self.seconds / 60:.1f} min",
                  f"MLflow UI: {ui_command(self.tracking_uri, self.runs_page)}"]
        return "\n".join(lines)
