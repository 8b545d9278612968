"""How a run's models are spread over its workers: a worker group per model, or several models per group.

A group of W workers trains its models data parallel; with ``models_per_worker`` above 1 a group is one worker that
trains its models in turn (it saves a process start-up per model where workers are scarce, as on CPU).
"""

from __future__ import annotations


def group_members(models: int, models_per_worker: int = 1) -> list[list[int]]:
    """The model indices each worker group trains, in order: [[0, 1], [2, 3], [4]] for 5 models, 2 per worker."""
    per_group = max(1, models_per_worker)
    return [list(range(start, min(models, start + per_group))) for start in range(0, models, per_group)]


def worker_groups(models: int, models_per_worker: int = 1) -> int:
    return len(group_members(models, models_per_worker))
