"""The plan a training loop follows to score itself at fixed steps (what a search trial reports to Tune): plain data,
built by the process that launches the run and followed by the workers (the scorer itself is in evaluation.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ant_ray.config import PipelineConfig
from ant_ray.merge import anchor_weights, random_weights

if TYPE_CHECKING:
    import torch

    from ant_ray.evaluation import FIDScorer


@dataclass
class EvaluationPlan:
    """FID at fixed steps inside a training loop: every ``every`` steps and at the last one, on ``num_samples``
    samples. With ``base_model`` the loop's models are DeMe specialists of that base, and what is scored is their
    merged model: plain task arithmetic, or (merge="search") the best of the anchors and ``candidates`` random
    weight vectors in [weight_low, weight_high]."""
    num_samples: int
    cache_dir: str
    every: int | None = None
    base_model: str | None = None
    merge: str = "task_arithmetic"
    candidates: int = 0
    weight_low: float = 0.0
    weight_high: float = 1.5
    seed: int = 0

    def dump(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dump(cls, dump: dict[str, Any] | None) -> "EvaluationPlan | None":
        return None if dump is None else cls(**dump)

    def due(self, step: int, total_steps: int) -> bool:
        return step == total_steps or (self.every is not None and step % self.every == 0)

    def scorer(self, cfg: PipelineConfig, device: "torch.device") -> "FIDScorer":
        from ant_ray.evaluation import FIDScorer  # the workers' import, not the launcher's

        return FIDScorer(cfg, Path(self.cache_dir), device=device)

    def weight_candidates(self, n: int) -> list[list[float]]:
        if self.merge == "task_arithmetic":
            return [[1.0] * n]
        return (anchor_weights(n, self.weight_low, self.weight_high)
                + random_weights(n, self.candidates, self.weight_low, self.weight_high, self.seed))
