"""Where a training loop reports: Ray Train's worker session when Ray Train runs the loop, or an in-process one.

A loop is plain torch: it asks `current_session()` for its rank, device, latest checkpoint and where to report, and
never imports Ray itself. Under Ray Train that is `RayTrainSession` (the only place a loop touches `ray.train`); in a
process without Ray (the GPU check, tests, a user's notebook) `run_in_process` installs a `LocalSession`, so the
same loop runs on a machine that has torch and diffusers but neither Ray nor MLflow.
"""

from __future__ import annotations

import contextlib
import contextvars
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch


class TrainSession(Protocol):
    rank: int
    world_size: int

    def device(self, configured: str) -> torch.device: ...

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]: ...

    def report(self, metrics: dict[str, Any], checkpoint: Path | None = None) -> None: ...

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module: ...


def _configured_device(configured: str) -> torch.device | None:
    """cpu when asked for or when no GPU exists; None: a GPU, which one is the session's to say."""
    if configured == "cpu" or (configured == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return None


class RayTrainSession:
    """A Ray Train worker's session (Train V2: `ray.train.report` is a barrier every rank calls equally often)."""

    def __init__(self) -> None:
        import ray.train  # here only: the loops' modules import without Ray

        self._train = ray.train
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()

    def device(self, configured: str) -> torch.device:
        import ray.train.torch

        return _configured_device(configured) or ray.train.torch.get_device()

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        checkpoint = self._train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield Path(folder)

    def report(self, metrics: dict[str, Any], checkpoint: Path | None = None) -> None:
        if checkpoint is None:
            self._train.report(metrics)
        else:
            # The loop's folder stays (ANT keeps its run directory's checkpoint for `resume_from`); Ray copies it.
            self._train.report(metrics, checkpoint=self._train.Checkpoint.from_directory(str(checkpoint)),
                               delete_local_checkpoint_after_upload=False)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=False) if self.world_size > 1 else model


class LocalSession:
    """One process, one rank: reports are kept in `reports`; each reported checkpoint is copied under
    `checkpoint_dir` (when given) as Ray would copy it to its storage, and the last one is what a later run of the
    same session resumes from."""

    def __init__(self, checkpoint_dir: Path | None = None, device: str | None = None) -> None:
        self.rank, self.world_size = 0, 1
        self.reports: list[dict[str, Any]] = []
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.last_checkpoint: Path | None = None
        self._device = device

    def device(self, configured: str) -> torch.device:
        return _configured_device(self._device or configured) or torch.device("cuda")

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        yield self.last_checkpoint

    def report(self, metrics: dict[str, Any], checkpoint: Path | None = None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint is not None and self.checkpoint_dir is not None:
            kept = self.checkpoint_dir / f"checkpoint_{len(self.reports):06d}"
            shutil.copytree(checkpoint, kept)
            self.last_checkpoint = kept

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model


_active: contextvars.ContextVar[TrainSession | None] = contextvars.ContextVar("ant_ray_train_session", default=None)


def current_session() -> TrainSession:
    """The in-process session when `run_in_process` runs the loop, else Ray Train's (the loop is a Ray Train
    worker's `train_loop_per_worker`)."""
    return _active.get() or RayTrainSession()


def run_in_process(loop: Callable[[dict[str, Any]], Any], loop_config: dict[str, Any],
                   session: LocalSession | None = None) -> tuple[Any, LocalSession]:
    """Run a training loop (`train_ant`, `train_diffusion`) in this process, without Ray; returns its result and the
    session holding its reports."""
    session = session or LocalSession()
    token = _active.set(session)
    try:
        return loop(loop_config), session
    finally:
        _active.reset(token)
