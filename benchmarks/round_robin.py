"""Round-robin timing for the benchmarks: each round runs every candidate once, so background load on a shared
machine falls on all candidates alike instead of on whichever one happened to be timed in its own block, and each
round yields a ratio to the baseline measured under the same load. The median of those per-round ratios, with its
interquartile range, is the figure to read."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np


def round_order(names: list[str], round_index: int, first: str | None = None) -> list[str]:
    """The candidates' order in a round: rotated by one place each round, so that no candidate always runs right
    after the same neighbour; ``first``, if given, stays first in every round."""
    rest = [name for name in names if name != first]
    shift = round_index % len(rest) if rest else 0
    return ([first] if first is not None else []) + rest[shift:] + rest[:shift]


def time_round_robin(
    candidates: dict[str, Callable[[int], object]],
    rounds: int,
    *,
    first: str | None = None,
    step_offset: int = 0,
    synchronize: Callable[[], None] = lambda: None,
) -> dict[str, list[float]]:
    """Seconds of each call, per candidate, in round order. Candidate functions take the step index
    ``step_offset + round``; ``synchronize`` waits for queued GPU work so that it is timed where it was queued."""
    seconds: dict[str, list[float]] = {name: [] for name in candidates}
    for round_index in range(rounds):
        for name in round_order(list(candidates), round_index, first):
            synchronize()
            start = time.perf_counter()
            candidates[name](step_offset + round_index)
            synchronize()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def ratio_quartiles(seconds: list[float], baseline: list[float]) -> tuple[float, float, float]:
    """25th percentile, median and 75th percentile of the per-round ratios seconds / baseline."""
    ratios = np.asarray(seconds) / np.asarray(baseline)
    q1, median, q3 = np.percentile(ratios, [25, 50, 75])
    return float(q1), float(median), float(q3)
