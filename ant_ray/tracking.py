"""MLflow tracking: one run per stage, child runs nested under a parent with `mlflow.parentRunId`.

Runs are addressed by id through an explicit `MlflowClient`, so a Ray worker in another process logs to the same
run as long as it gets the tracking URI and run id (no reliance on MLflow's process-global active run).
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

# SQLite stores are opened by several processes (driver, trials, workers); MLflow's own sqlite pool is fine with
# that for the low write rate here, but creating the schema must happen once, on the driver, before any worker.


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"


def setup_experiment(tracking_uri: str, experiment: str, artifact_root: Path) -> str:
    """Create (or reuse) the experiment on the driver and return its id. Artifacts go to an explicit folder so
    they never land in a temporary working directory (as under `ray job submit`)."""
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        experiment_id = found.experiment_id
    else:
        artifact_location = None
        if not tracking_uri.startswith(("http://", "https://", "databricks")):
            artifact_root.mkdir(parents=True, exist_ok=True)
            artifact_location = artifact_root.resolve().as_uri()
        experiment_id = client.create_experiment(experiment, artifact_location=artifact_location)
    # MLflow 3's UI opens an experiment of unknown kind on its GenAI overview; this one is model training, so it
    # opens on the runs table.
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, "custom_model_development")
    return experiment_id


class TrackedRun:
    """A handle on one MLflow run that any process can reconstruct from (tracking_uri, run_id)."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri)

    @classmethod
    def start(cls, tracking_uri: str, experiment_id: str, name: str, *, parent_run_id: str | None = None,
              tags: Mapping[str, str] | None = None) -> "TrackedRun":
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = MlflowClient(tracking_uri).create_run(experiment_id, run_name=name, tags=all_tags)
        return cls(tracking_uri, run.info.run_id)

    def handle(self) -> dict[str, str]:
        """What a Ray worker needs to log into this run."""
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id}

    def log_params(self, params: Mapping[str, Any]) -> None:
        flat = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(flat), 100):
            self.client.log_batch(self.run_id, params=flat[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        import time

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and math.isfinite(v)]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, path: str | Path, text: str) -> Path:
        """Write ``text`` (plus a final newline) to ``path``, a file kept beside the run's outputs, and log it as an
        artifact; returns the path."""
        path = Path(path)
        path.write_text(text + "\n")
        self.log_artifact(path)
        return path

    def log_table(self, table, artifact_file: str) -> None:
        """A pandas DataFrame as an MLflow table (shown in the UI's artifact view); non-finite numbers as null."""
        import numpy as np

        finite = table.replace([np.inf, -np.inf], np.nan)
        clean = finite.astype(object).where(finite.notna(), None)
        self.client.log_table(self.run_id, data=clean, artifact_file=artifact_file)

    def log_figure(self, figure, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / name
            figure.savefig(target, dpi=100, bbox_inches="tight")
            self.log_artifact(target)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def status(self) -> str:
        return self.client.get_run(self.run_id).info.status

    def reopen(self) -> None:
        """Mark a run RUNNING again (a resumed search continues its runs instead of opening new ones)."""
        self.client.update_run(self.run_id, status="RUNNING")


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix=f"{name}."))
        else:
            out[name] = value
    return out


def loss_curve_figure(steps: Iterable[int], losses: Iterable[float], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(list(steps), list(losses))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    return fig


def ui_command(tracking_uri: str) -> str:
    if tracking_uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {tracking_uri}"
    return f"open {tracking_uri} (MLFLOW_TRACKING_URI) in a browser"


def tracking_env(tracking_uri: str) -> dict[str, str]:
    """Environment for the workers of a private local Ray: the URI and a quiet MLflow. Workers never need the URI
    from here (tracking handles carry it); a joined cluster's workers get the job's runtime env instead."""
    return {"MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_ENABLE_ASYNC_LOGGING": "false",
            "GIT_PYTHON_REFRESH": "quiet", **({"HOME": os.environ["HOME"]} if "HOME" in os.environ else {})}
