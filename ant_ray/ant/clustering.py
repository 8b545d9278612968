"""ANT interval clustering: split timesteps 0..T-1 into k contiguous intervals minimising the sum of
an interval cost (Go et al. 2023, Sec. 4.1), solved exactly by dynamic programming with size bounds
(App. G, Eq. 6/7).

best[i, m] = min over the start j of the last interval of  best[j, m-1] + cost([j, i-1]),
with min_size <= i - j <= max_size. The loop runs over i; the candidates j and all m are handled as
one numpy array, so T = 1000, k = 10 takes a few tens of milliseconds.

Ties (e.g. the timestep cost of sizes (3, 5) equals that of (4, 4)) are broken towards the most
balanced split (smallest sum of squared sizes), so the timestep cost yields the equal split the
ANT reference code uses when k divides T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ant_ray.ant.clustering_costs import IntervalCost, build_interval_cost

# Relative tolerance under which two candidate costs count as tied (prefix-sum rounding is ~1e-13).
_TIE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class IntervalClustering:
    """An optimal clustering. intervals are half-open (start, end) pairs covering 0..T-1 in order."""

    intervals: list[tuple[int, int]]
    interval_costs: list[float]
    total_cost: float
    min_size: int
    max_size: int


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def default_size_bounds(T: int, k: int) -> tuple[int, int]:
    """The paper's bounds T/(2k) <= |I| <= 2T/k, rounded inwards to integers."""
    return math.ceil(T / (2 * k)), (2 * T) // k


def _check_k(k: object, T: int) -> int:
    if not _is_int(k) or not 1 <= k <= T:
        raise ValueError(f"k (number of clusters) must be an integer in [1, T={T}], got {k!r}")
    return int(k)


def _check_size_bounds(T: int, k: int, min_size: object, max_size: object) -> tuple[int, int]:
    default_min, default_max = default_size_bounds(T, k)
    min_size = default_min if min_size is None else min_size
    max_size = default_max if max_size is None else max_size
    for name, value in (("min_size", min_size), ("max_size", max_size)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive integer (pass 1 and T to lift the bounds), got {value!r}")
    if min_size > max_size:
        raise ValueError(f"min_size={min_size} exceeds max_size={max_size}; lower min_size or raise max_size")
    if k * min_size > T:
        raise ValueError(f"min_size={min_size} is infeasible: k={k} intervals of at least {min_size} exceed T={T}")
    if k * max_size < T:
        raise ValueError(f"max_size={max_size} is infeasible: k={k} intervals of at most {max_size} cannot cover T={T}")
    return int(min_size), int(max_size)


def solve_interval_clustering(
    k: int,
    cost: str | IntervalCost = "timestep",
    *,
    T: int | None = None,
    snr: object = None,
    affinity: object = None,
    min_size: int | None = None,
    max_size: int | None = None,
) -> IntervalClustering:
    """Optimal k-interval clustering of timesteps 0..T-1 under ``cost`` ("timestep", "snr",
    "gradient", or a ready IntervalCost). T is required for "timestep" and inferred from snr
    (length T) or affinity (T x T) otherwise. Default size bounds are the paper's
    ceil(T/(2k)) <= |I| <= floor(2T/k); pass min_size=1, max_size=T for the unconstrained problem."""
    interval_cost = build_interval_cost(cost, T=T, snr=snr, affinity=affinity)
    T = interval_cost.T
    k = _check_k(k, T)
    min_size, max_size = _check_size_bounds(T, k, min_size, max_size)

    # best[i, m]: least cost of splitting timesteps 0..i-1 into m intervals (inf: impossible);
    # balance[i, m]: sum of squared sizes of that split (tie-breaker); last_start[i, m]: its last start.
    best = np.full((T + 1, k + 1), np.inf)
    balance = np.full((T + 1, k + 1), np.inf)
    last_start = np.full((T + 1, k + 1), -1, dtype=np.int64)
    best[0, 0] = balance[0, 0] = 0.0
    columns = np.arange(k)
    for end in range(min_size, T + 1):
        starts = np.arange(max(0, end - max_size), end - min_size + 1)
        candidates = best[starts, :k] + interval_cost.costs(starts, end - 1)[:, None]  # [start, m-1]
        lowest = candidates.min(axis=0)
        tied = candidates <= lowest + _TIE_TOLERANCE * (1.0 + np.abs(lowest))
        squared_sizes = ((end - starts) ** 2)[:, None]
        choice = np.where(tied, balance[starts, :k] + squared_sizes, np.inf).argmin(axis=0)
        best[end, 1:] = candidates[choice, columns]
        balance[end, 1:] = balance[starts[choice], columns] + squared_sizes[choice, 0]
        last_start[end, 1:] = starts[choice]

    if not np.isfinite(best[T, k]):  # unreachable after the bound checks; guards future edits
        raise RuntimeError(f"no feasible clustering for T={T}, k={k}, sizes in [{min_size}, {max_size}]")
    intervals: list[tuple[int, int]] = []
    end = T
    for m in range(k, 0, -1):
        start = int(last_start[end, m])
        intervals.append((start, end))
        end = start
    intervals.reverse()
    interval_costs = [interval_cost(start, end - 1) for start, end in intervals]
    return IntervalClustering(intervals, interval_costs, float(sum(interval_costs)), min_size, max_size)


def interval_clustering(
    k: int,
    cost: str | IntervalCost = "timestep",
    *,
    T: int | None = None,
    snr: object = None,
    affinity: object = None,
    min_size: int | None = None,
    max_size: int | None = None,
) -> list[tuple[int, int]]:
    """The k half-open (start, end) intervals of ``solve_interval_clustering``."""
    return solve_interval_clustering(
        k, cost, T=T, snr=snr, affinity=affinity, min_size=min_size, max_size=max_size
    ).intervals


def cluster_of_timestep(intervals: list[tuple[int, int]]) -> np.ndarray:
    """Array mapping each timestep 0..T-1 to the index of its interval (T = last end)."""
    if not intervals:
        raise ValueError("intervals must be a non-empty list of (start, end) pairs")
    expected_start = 0
    for start, end in intervals:
        if start != expected_start or end <= start:
            raise ValueError(
                f"intervals must be contiguous, non-empty and start at 0; got {intervals!r}"
            )
        expected_start = end
    sizes = [end - start for start, end in intervals]
    return np.repeat(np.arange(len(intervals)), sizes)
