"""Running a training loop on Ray Train (the Train V2 API): one `TorchTrainer` per run, resources declared.

A run is named and stored under `storage`; running it again with the same name and storage resumes from its last
checkpoint, which is how an interrupted stage or search trial picks up where it stopped.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Sequence

import ray
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.v2.api.config import LoggingConfig
from ray.train.torch import TorchTrainer

from ant_ray.config import ResourcesConfig
from ant_ray.files import CorruptFileError, DiskFull, is_disk_full
from ant_ray.stages.ray_logs import verbose
from ant_ray.training import TrainingDiverged, worker_groups


class TrainingRunFailed(RuntimeError):
    """A Ray Train run failed; ``reason`` is one line (the divergence message when the loss went non-finite).
    ``fault`` is set when the cause lies outside the run's configuration and goes away once fixed: "disk_full", or
    "damaged_file" (a truncated or garbage input); a search then stops so that a --resume retries the run."""

    def __init__(self, name: str, reason: str, diverged: bool, fault: str = ""):
        super().__init__(f"training run {name!r} failed: {reason}")
        self.name = name
        self.reason = reason
        self.diverged = diverged
        self.fault = fault

    def __reduce__(self):
        # Ray copies and pickles an exception leaving a worker or trial; the default rebuilds it from its message
        # alone, which this __init__ refuses (a TypeError that would hide the real cause)
        return type(self), (self.name, self.reason, self.diverged, self.fault), self.__dict__


def scaling_config(resources: ResourcesConfig, groups: int = 1) -> ScalingConfig:
    """``groups`` worker groups side by side (a model each, or several in turn), each of ``resources.num_workers``
    workers."""
    per_worker = {"CPU": resources.cpu}
    if resources.gpu:
        per_worker["GPU"] = resources.gpu
    return ScalingConfig(num_workers=resources.num_workers * groups, use_gpu=resources.gpu > 0,
                         resources_per_worker=per_worker)


def _causes(error: BaseException) -> list[BaseException]:
    """`error` and everything behind it: Ray Train's per-worker failures, a RayTaskError's cause, chained
    exceptions; outermost first."""
    found: list[BaseException] = []
    pending = [error]
    while pending:
        current = pending.pop(0)
        if current is None or any(current is seen for seen in found):
            continue
        found.append(current)
        pending += list((getattr(current, "worker_failures", None) or {}).values())
        pending += [getattr(current, "cause", None), current.__cause__, current.__context__]
    return [e for e in found if isinstance(e, BaseException)]


_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(\([\w.]*\))?: \S")  # "OSError: ...", "RayTaskError(OSError): ..."


def _last_error_line(text: str) -> str | None:
    """The 'SomeError: message' line that ends a traceback printed into `text` (Ray's errors carry the worker's),
    else the text's last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return next((line for line in reversed(lines) if _ERROR_LINE.match(line)), lines[-1] if lines else None)


def failure_cause(error: BaseException) -> tuple[str, bool, str]:
    """(one line, diverged?, fault) for a failed run or trial: the loop's own message when a worker raised one of
    ours, a full disk's or damaged file's one line, else the last line of the worker's traceback (not Ray's
    wrapper around it). ``fault`` as in TrainingRunFailed."""
    causes = _causes(error)
    # Ray's RayTaskError(X) is an instance of X too, but its text is Ray's traceback: take the X it carries
    own = [cause for cause in causes if not isinstance(getattr(cause, "cause", None), BaseException)]
    for cause in own:
        if isinstance(cause, TrainingRunFailed):
            return cause.reason, cause.diverged, cause.fault
        if isinstance(cause, TrainingDiverged):
            return str(cause), True, ""
    for cause in own:
        if isinstance(cause, (DiskFull, CorruptFileError)):
            return str(cause), False, "disk_full" if isinstance(cause, DiskFull) else "damaged_file"
    for cause in causes:
        for line in str(cause).splitlines():
            if "TrainingDiverged: " in line:
                return line.split("TrainingDiverged: ", 1)[1].strip(), True, ""
    if any(is_disk_full(cause) for cause in causes):
        text = "; ".join(str(c) for c in causes)
        line = next((ln.strip() for ln in text.splitlines() if "DiskFull: " in ln), None)
        return (line.split("DiskFull: ", 1)[1] if line else
                f"no space left on device ({_last_error_line(str(causes[-1])) or type(causes[-1]).__name__}); "
                "free space in output_dir and continue with --resume"), False, "disk_full"
    for cause in causes:
        for line in str(cause).splitlines():
            if "CorruptFileError: " in line:
                return line.split("CorruptFileError: ", 1)[1].strip(), False, "damaged_file"
    innermost = causes[-1]
    line = _last_error_line(str(innermost)) or _last_error_line(str(error))
    return line or type(innermost).__name__, False, ""


def failure_reason(error: BaseException) -> tuple[str, bool]:
    """(one line, diverged?) for a Ray Train failure (see failure_cause)."""
    reason, diverged, _ = failure_cause(error)
    return reason, diverged


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
        raise TrainingRunFailed(name, *failure_cause(err)) from err
    if result.error is not None:  # local mode (num_workers 0) reports instead of raising
        raise TrainingRunFailed(name, *failure_cause(result.error)) from result.error
    if isinstance(result.return_value, dict) and result.return_value.get("diverged"):
        # the loop stopped itself (an exception would have made Ray Train restart it, only to diverge again)
        raise TrainingRunFailed(name, result.return_value["diverged"], diverged=True)
    return result
