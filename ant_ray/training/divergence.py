"""Stop a training run whose loss is no longer finite, with one line that says what happened and what to change,
instead of training on (and publishing) a NaN model.

A diverged run ends normally (no exception in the workers) with the reason as its result: an exception would make
Ray Train restart the run from its last checkpoint, where it would only diverge again. The stage that launched it
raises TrainingRunFailed from that result.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


class TrainingDiverged(FloatingPointError):
    """The loss of a training run stopped being finite. The message is one line and names the fix."""


class DivergenceGuard:
    """With fp16's grad scaler an occasional non-finite step is normal (the scaler skips it and lowers the scale),
    so that case tolerates up to ``patience`` such steps in a row; without a scaler the first one stops the run."""

    def __init__(self, section: str, *, tolerate_skipped_steps: bool, patience: int = 8):
        self.section = section
        self.patience = patience if tolerate_skipped_steps else 1
        self.in_a_row = 0

    def check(self, loss: float, step: int) -> str | None:
        """None while training is sound; else the one-line reason to stop."""
        if math.isfinite(loss):
            self.in_a_row = 0
            return None
        self.in_a_row += 1
        if self.in_a_row < self.patience:
            return None
        streak = f" for {self.in_a_row} steps in a row" if self.in_a_row > 1 else ""
        return (f"{self.section} diverged: the loss is {loss} at step {step}{streak}; lower {self.section}.lr, or "
                f"keep {self.section}.grad_clip set")


def any_rank_diverged(reason: str | None, world_size: int, device: torch.device) -> bool:
    """Whether any rank of a distributed run found a reason to stop (all ranks must stop at the same step)."""
    flag = torch.tensor([1.0 if reason else 0.0], device=device)
    if world_size > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def check_finite_weights(state_dict, what: str) -> None:
    """Refuse to save or publish weights with NaN or inf in them (a diverged model must never look trained)."""
    for key, tensor in state_dict.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise TrainingDiverged(f"{what} has non-finite weights ({key}); it was not saved: lower the learning "
                                   "rate and train again")
