"""What `ant-ray search` / `ant_ray.launch_search` return: per stage the best configuration and its score, the
final winner's re-scored FID, its model folder, the MLflow run ids and every trial."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ant_ray.search.outcome import StageOutcome
from ant_ray.stages.evaluate import RepeatedScore
from ant_ray.tracking import run_page, ui_address, ui_command


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "(" + ", ".join(_format_value(v) for v in value) + ")"
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_format_value(v)}" for k, v in value.items())
    return str(value)


# The columns every stage's trials share, then the stage's parameters (its space's keys; merge: w0, w1, ...).
# `step`: how far a training trial trained; `fidelity`: the sample count a merge candidate was last scored at.
TRIAL_COLUMNS = ["stage", "trial_id", "fate", "metric", "score", "step", "fidelity"]
_MERGE_BOOKKEEPING = {"candidate", "rung", "samples", "images", "fid", "metric"}


def trials_table(outcome: StageOutcome) -> pd.DataFrame:
    """A stage's trials in the schema of TRIAL_COLUMNS plus the stage's parameters, one row per trial: its last
    score (`score`, under the metric named in `metric`, whose name carries the sample count) and its fate
    (finished / stopped_early / diverged / failed).

    The stages' own `trials.csv` keep their working shapes: a training stage's has the score under the metric's
    name; the merge stage's has a row per candidate and rung. A merge candidate is one trial here (one MLflow run,
    `trial_id` its candidate key) at the highest fidelity it reached: `finished` if that is the last rung, else
    `stopped_early` (successive halving did not promote it)."""
    table = outcome.trials()
    if table.empty or "score" in table.columns:
        return table.assign(stage=outcome.stage).reindex(columns=_ordered(table.columns))
    if outcome.stage == "merge":
        last_rung = len(outcome.extra.get("fidelities") or []) - 1
        first_seen = {key: i for i, key in enumerate(table["candidate"].drop_duplicates())}  # rung 0's order
        last = (table.sort_values("rung", kind="stable").drop_duplicates("candidate", keep="last")
                .sort_values("candidate", key=lambda keys: keys.map(first_seen)).reset_index(drop=True))
        params = [c for c in table.columns if c not in _MERGE_BOOKKEEPING]
        rows = pd.DataFrame({"stage": outcome.stage, "trial_id": last["candidate"],
                             "fate": ["finished" if r >= last_rung else "stopped_early" for r in last["rung"]],
                             "metric": last["metric"], "score": last["fid"], "fidelity": last["samples"]})
        return pd.concat([rows, last[params]], axis=1).reindex(columns=_ordered(params))
    params = [c for c in table.columns if c not in {"trial_id", outcome.metric, "step", "fate"}]
    rows = pd.DataFrame({"stage": outcome.stage, "trial_id": table["trial_id"].astype(str), "fate": table["fate"],
                         "metric": outcome.metric, "score": table[outcome.metric], "step": table["step"]})
    return pd.concat([rows, table[params]], axis=1).reindex(columns=_ordered(params))


def _ordered(columns) -> list[str]:
    return TRIAL_COLUMNS + [c for c in columns if c not in TRIAL_COLUMNS]


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
        """Every trial of every stage, one row each, in one schema (`trials_table`)."""
        frames = [trials_table(o) for o in self.stages.values()]
        table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=TRIAL_COLUMNS)
        # A stage without an integer column (step, fidelity, ant.k) made NaNs there, and floats of its values:
        # keep them integers (a weight that happens to be 1.0 stays a float)
        integers = {c for frame in frames for c in frame.select_dtypes("integer").columns}
        for column in integers:
            values = table[column].dropna()
            if (values == values.round()).all():  # not when another stage has fractions in a column of that name
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
                  f"finished in {self.seconds / 60:.1f} min"]
        address = ui_address(self.tracking_uri)
        if address and self.runs_page:  # "#/experiments/<id>/runs?...": the search run's page in that experiment
            experiment_id = self.runs_page.split("/")[2]
            lines.append(f"search run (figures, trials table): {address}/{run_page(experiment_id, self.parent_run_id)}")
        lines.append(f"MLflow UI: {ui_command(self.tracking_uri, self.runs_page)}")
        return "\n".join(lines)
