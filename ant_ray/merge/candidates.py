"""Merge-weight candidates a search starts from (pure functions of N and the weight bounds).

The anchors are the points every search should score first, because each is a method in its own right: plain task
arithmetic (every weight 1), each specialist alone (weight 1 for it, 0 for the others: exactly that finetuned model
under linear merging) and the uniform mean (1/N each, the average of the finetuned models). A search that scores
them can never return something worse, at the same fidelity, than the best of them.
"""

from __future__ import annotations

import numpy as np


def anchor_weights(n: int, low: float, high: float) -> list[list[float]]:
    """The anchors inside [low, high]^n, without duplicates (for n = 1 the three coincide); an anchor with a
    weight outside the bounds is left out rather than clipped (a clipped anchor is no longer that method)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    points = [[1.0] * n] + [[1.0 if j == i else 0.0 for j in range(n)] for i in range(n)] + [[1.0 / n] * n]
    kept: list[list[float]] = []
    for point in points:
        if all(low <= w <= high for w in point) and point not in kept:
            kept.append(point)
    return kept


def random_weights(n: int, count: int, low: float, high: float, seed: int) -> list[list[float]]:
    """``count`` weight vectors uniform in [low, high]^n, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    return [[float(w) for w in row] for row in rng.uniform(low, high, size=(count, n))]
