"""Randomness as a function of (seed, step, rank), so a resumed run redraws exactly what the uninterrupted one drew
and N data-parallel workers see exactly what one worker would on the same global batch."""

from __future__ import annotations

import torch


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator for one optimizer step. Every rank draws the *global* batch's timesteps and noise from it and
    keeps its own slice."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63 - 1))


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the global torch RNG (dropout) for one step on one rank: resume reproduces it from the step alone."""
    return ((seed * 1_000_003 + step) * 10_007 + rank) % (2**63 - 1)
