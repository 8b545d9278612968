"""Stop a training run whose loss is no longer finite, with one line that says what happened and what to change,
instead of training on (and publishing) a NaN model."""

from __future__ import annotations

import math


class TrainingDiverged(FloatingPointError):
    """The loss of a training run stopped being finite. The message is one line and names the fix."""


class DivergenceGuard:
    """With fp16's grad scaler an occasional non-finite step is normal (the scaler skips it and lowers the scale),
    so that case tolerates up to ``patience`` such steps in a row; without a scaler the first one stops the run."""

    def __init__(self, section: str, *, tolerate_skipped_steps: bool, patience: int = 8):
        self.section = section
        self.patience = patience if tolerate_skipped_steps else 1
        self.in_a_row = 0

    def check(self, loss: float, step: int) -> None:
        if math.isfinite(loss):
            self.in_a_row = 0
            return
        self.in_a_row += 1
        if self.in_a_row >= self.patience:
            streak = f" for {self.in_a_row} steps in a row" if self.in_a_row > 1 else ""
            raise TrainingDiverged(f"{self.section} diverged: the loss is {loss} at step {step}{streak}; lower "
                                   f"{self.section}.lr, or keep {self.section}.grad_clip set")


def check_finite_weights(state_dict, what: str) -> None:
    """Refuse to save or publish weights with NaN or inf in them (a diverged model must never look trained)."""
    import torch

    for key, tensor in state_dict.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise TrainingDiverged(f"{what} has non-finite weights ({key}); it was not saved: lower the learning "
                                   "rate and train again")
