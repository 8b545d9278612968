"""Running a training loop on Ray Train (the Train V2 API): one `TorchTrainer` per run, resources declared.

A run is named and stored under `storage`; running it again with the same name and storage resumes from its last
checkpoint, which is how an interrupted stage or search trial picks up where it stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import ray
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.v2.api.config import LoggingConfig
from ray.train.torch import TorchTrainer

from ant_ray.config import ResourcesConfig
from ant_ray.stages.ray_logs import verbose
from ant_ray.training import TrainingDiverged, worker_groups


class TrainingRunFailed(RuntimeError):
    """A Ray Train run failed; ``reason`` is one line (the divergence message when the loss went non-finite)."""

    def __init__(self, name: str, reason: str, diverged: bool):
        super().__init__(f"training run {name!r} failed: {reason}")
        self.reason = reason
        self.diverged = diverged


def scaling_config(resources: ResourcesConfig, groups: int = 1) -> ScalingConfig:
    """``groups`` worker groups side by side (a model each, or several in turn), each of ``resources.num_workers``
    workers."""
    per_worker = {"CPU": resources.cpu}
    if resources.gpu:
        per_worker["GPU"] = resources.gpu
    return ScalingConfig(num_workers=resources.num_workers * groups, use_gpu=resources.gpu > 0,
                         resources_per_worker=per_worker)


def failure_reason(error: BaseException) -> tuple[str, bool]:
    """(one line, diverged?) for a Ray Train failure: the loop's own message when a worker raised one of ours."""
    seen: list[BaseException] = [error]
    seen += list(getattr(error, "worker_failures", {}).values())
    for failure in seen:
        cause: BaseException | None = failure
        while cause is not None:
            if isinstance(cause, TrainingDiverged):
                return str(cause), True
            cause = getattr(cause, "cause", None) or cause.__cause__
        for line in str(failure).splitlines():
            if "TrainingDiverged: " in line:
                return line.split("TrainingDiverged: ", 1)[1].strip(), True
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__), False


def fit(train_fn: Callable[[dict], Any], loop_config: dict[str, Any], *, name: str, storage: Path,
        resources: ResourcesConfig, models: int = 1, callbacks: Sequence[Any] = (),
        max_failures: int = 0) -> ray.train.Result:
    """Run ``train_fn`` on Ray Train and return its Result (``return_value``: rank 0's return); raises
    TrainingRunFailed with a one-line reason. ``models`` models train side by side, ``loop_config``'s
    ``models_per_worker`` (default 1) of them per worker group."""
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=loop_config,
        scaling_config=scaling_config(resources, worker_groups(models, loop_config.get("models_per_worker") or 1)),
        run_config=RunConfig(name=name, storage_path=str(storage), callbacks=list(callbacks),
                             failure_config=FailureConfig(max_failures=max_failures),
                             # Ray Train's own INFO lines (every report, every checkpoint path) only with --verbose
                             logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING")),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        reason, diverged = failure_reason(err)
        raise TrainingRunFailed(name, reason, diverged) from err
    if result.error is not None:  # local mode (num_workers 0) reports instead of raising
        reason, diverged = failure_reason(result.error)
        raise TrainingRunFailed(name, reason, diverged) from result.error
    if isinstance(result.return_value, dict) and result.return_value.get("diverged"):
        # the loop stopped itself (an exception would have made Ray Train restart it, only to diverge again)
        raise TrainingRunFailed(name, result.return_value["diverged"], diverged=True)
    return result
