"""What a stage of the search produced: its winner, its score and every trial, in a form that survives a restart
(JSON beside a CSV in the stage's folder)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ant_ray.files import CorruptFileError, publish_text, read_json


class SearchStageFailed(RuntimeError):
    """No trial of a stage produced a final score; the message says why in one line."""


@dataclass
class StageOutcome:
    stage: str
    metric: str  # the metric the winner was chosen by, e.g. fid5k_inception (its fidelity is in the name)
    best_params: dict[str, Any]
    best_score: float
    winner: dict[str, Any]  # ant: model, intervals; deme: task_vectors, base_model, ranges, weights; merge: weights
    run_id: str  # the stage's MLflow run
    finished: int = 0
    stopped_early: int = 0
    diverged: int = 0
    failed: int = 0
    images_generated: int = 0
    seconds: float = 0.0
    trials_csv: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def trials(self) -> pd.DataFrame:
        return pd.read_csv(self.trials_csv) if self.trials_csv else pd.DataFrame()

    def save(self, path: Path) -> None:
        publish_text(path, json.dumps(asdict(self), indent=1, default=str))

    @classmethod
    def load(cls, path: Path) -> "StageOutcome":
        """One line naming the file if it is cut or not a stage's outcome: the stage's finished trials are kept,
        so deleting it makes the resume collect the outcome again."""
        stage = Path(path).parent.name
        fix = f"delete it and resume the search: the {stage} stage's outcome is collected again from its trials"
        record = read_json(path, fix=fix)
        try:
            return cls(**record)
        except TypeError as error:  # a missing or unknown field
            raise CorruptFileError(path, f"is not a stage's outcome ({error})", fix) from None


def fate(result: dict[str, Any], error: bool, final_step: int, step_key: str = "step") -> str:
    """finished / stopped_early / diverged / failed, from a trial's last result."""
    if error:
        return "failed"
    if result.get("diverged"):
        return "diverged"
    if int(result.get(step_key, 0) or 0) < final_step:
        return "stopped_early"
    return "finished"


def count_fates(fates: list[str]) -> dict[str, int]:
    return {name: fates.count(name) for name in ("finished", "stopped_early", "diverged", "failed")}


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
