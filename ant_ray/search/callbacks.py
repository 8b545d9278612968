"""Two callbacks that connect the layers of a trial:

- `ScoreReportCallback` (Ray Train side): forwards to Tune only the training reports that carry the stage's FID,
  so schedulers and searchers see one metric at fixed steps (plain `TuneReportCallback` forwards every report,
  and Tune insists that every result has the metric).
- `TrialTracker` (Tune driver side): mirrors each trial's scores into its MLflow run as they arrive, and when the
  trial ends records its fate (finished, stopped early, diverged, failed) and closes its MLflow runs, also when
  the trial process was killed by a scheduler and never got to close them itself. A trial stopped early ends
  FINISHED (its fate tag tells it apart), a diverged or failed one FAILED.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from ant_ray.tracking import TrackedRun

RUN_ID_FILE = "mlflow_run_id"  # in a trial's folder: its MLflow run
TRAIN_RUN_IDS_FILE = "mlflow_train_run_ids.json"  # in a trial's folder: its Ray Train runs' MLflow runs


class ScoreReportCallback(TuneReportCallback):
    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if self.metric in metrics[0]:
            super().after_report(run_context, metrics, None)  # a trial resumes through Train's own checkpoints


def trial_folder(stage_dir: Path, trial_id: str) -> Path:
    return stage_dir / "trials" / trial_id


class TrialTracker(tune.Callback):
    """``metric``: the result key to mirror; ``final_step``: the step (or sample count) of a trial's final score;
    ``step_key``: how far a trial got. Trials find their MLflow run ids in their folders under ``stage_dir``."""

    def __init__(self, tracking_uri: str, stage_dir: Path, metric: str, final_step: int, step_key: str = "step",
                 trial_dir_of=None):
        self.tracking_uri = tracking_uri
        self.stage_dir = stage_dir
        self.metric = metric
        self.final_step = final_step
        self.step_key = step_key
        self.trial_dir_of = trial_dir_of or (lambda trial: trial_folder(stage_dir, trial.trial_id))
        self._logged_step: dict[str, int] = {}  # a trial's final report repeats its last in-loop score

    def _runs(self, trial) -> tuple[TrackedRun | None, list[TrackedRun]]:
        folder = self.trial_dir_of(trial)
        main = folder / RUN_ID_FILE
        run = TrackedRun(self.tracking_uri, main.read_text().strip()) if main.is_file() else None
        train = folder / TRAIN_RUN_IDS_FILE
        train_runs = [TrackedRun(self.tracking_uri, rid) for rid in json.loads(train.read_text())] \
            if train.is_file() else []
        return run, train_runs

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        value = result.get(self.metric)
        step = int(result.get(self.step_key, 0))
        if value is None or not math.isfinite(value) or self._logged_step.get(trial.trial_id) == step:
            return
        run, _ = self._runs(trial)
        if run is not None:
            run.log_metrics({self.metric: value}, step=step)
            self._logged_step[trial.trial_id] = step

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result or {}
        if result.get("diverged"):
            self._close(trial, "diverged", "FAILED")
        elif int(result.get(self.step_key, 0)) < self.final_step:
            # Stopping a trial that is behind is the scheduler doing its job, not a crash: FINISHED, with the fate
            # tag saying it stopped early (MLflow shows KILLED with a red cross; that stays for signals).
            self._close(trial, "stopped_early", "FINISHED")
        else:
            self._close(trial, "finished", "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._close(trial, "failed", "FAILED")

    def _close(self, trial, fate: str, status: str) -> None:
        run, train_runs = self._runs(trial)
        for tracked in ([run] if run is not None else []) + train_runs:
            tracked.set_tags({"ant_ray.fate": fate})
            if tracked.status() == "RUNNING":
                tracked.finish(status)


class TrialStatusPrinter(tune.Callback):
    """One compact line when a stage's first trial starts and whenever a trial ends: how many run, wait, finished,
    were stopped early or failed, and the best final score so far, over every trial of the stage (those a resume
    restored as finished too; Tune's own progress tables are off by default)."""

    def __init__(self, stage: str, metric: str, final_step: int, log, step_key: str = "step"):
        self.stage, self.metric, self.final_step, self.log, self.step_key = stage, metric, final_step, log, step_key
        self.started = False

    def _fate(self, trial) -> str:
        last = trial.last_result or {}
        return ("diverged" if last.get("diverged") else
                "stopped early" if int(last.get(self.step_key, 0) or 0) < self.final_step else "finished")

    def _print(self, trials, trial, status: str) -> None:
        """``status``: what the event says about ``trial`` (Tune updates ``trial.status`` only after the callbacks)."""
        counts: dict[str, int] = {}
        best: tuple[float, dict] | None = None
        for other in trials:
            state = status if other is trial else {"TERMINATED": self._fate(other), "ERROR": "failed"}.get(
                other.status, other.status.lower())
            counts[state] = counts.get(state, 0) + 1
            value = (other.last_result or {}).get(self.metric)
            if state == "finished" and value is not None and math.isfinite(value) and (best is None or value < best[0]):
                config = other.config.get("point", other.config)
                best = (value, {k: v for k, v in config.items() if not isinstance(v, (dict, list))})
        order = ["running", "pending", "finished", "stopped early", "diverged", "failed"]
        parts = [f"{counts[k]} {k}" for k in order if counts.get(k)]
        shown = ""
        if best is not None:
            values = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best[1].items())
            shown = f" | best {self.metric} {best[0]:.3f}" + (f" ({values})" if values else "")
        self.log(f"{self.stage} trials: {', '.join(parts)}{shown}")

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        if not self.started:  # later starts show in the next line about an ended trial
            self.started = True
            self._print(trials, trial, "running")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._print(trials, trial, self._fate(trial))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._print(trials, trial, "failed")
