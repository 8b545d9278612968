"""Interval costs for ANT interval clustering (Go et al. 2023, Sec. 4.1).

Timesteps are 0-indexed (0..T-1). A cluster is an inclusive interval [l, r] with centre
c = floor((l + r) / 2). The three costs of the paper:

- ``timestep``: sum_{t in [l, r]} |t - c|
- ``snr``:      sum_{t in [l, r]} |SNR(t) - SNR(c)|
- ``gradient``: -sum_{t in [l, r]} A[c, t]   (A: T x T task-affinity matrix)

Each registered factory validates its inputs and returns an ``IntervalCost`` that answers
``costs(starts, last)`` for many starts at once in O(len(starts)) (prefix sums / closed forms),
which is what keeps the DP in ``clustering.py`` fast for T = 1000.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import numpy as np

from ant_ray.registry import Registry


class IntervalCost(ABC):
    """Cost of inclusive intervals [start, last] of timesteps 0..T-1."""

    def __init__(self, T: int):
        self.T = T

    @abstractmethod
    def costs(self, starts: np.ndarray, last: int) -> np.ndarray:
        """Costs of the intervals [starts[q], last] (inclusive), as float64, one per start."""

    def __call__(self, start: int, last: int) -> float:
        """Cost of the single inclusive interval [start, last]."""
        if not 0 <= start <= last < self.T:
            raise ValueError(f"interval [{start}, {last}] must satisfy 0 <= start <= last < T={self.T}")
        return float(self.costs(np.array([start]), last)[0])


CostFactory = Callable[..., IntervalCost]
CLUSTERING_COSTS: Registry[CostFactory] = Registry("clustering cost")


def _centres(starts: np.ndarray, last: int) -> np.ndarray:
    return (starts + last) // 2


class _TimestepCost(IntervalCost):
    def costs(self, starts: np.ndarray, last: int) -> np.ndarray:
        # Closed form: a = c - l steps to the left of the centre cost 1 + ... + a, likewise b = r - c.
        starts = np.asarray(starts, dtype=np.int64)
        c = _centres(starts, last)
        left, right = c - starts, last - c
        return (left * (left + 1) // 2 + right * (right + 1) // 2).astype(np.float64)


class _MonotoneAbsDeviationCost(IntervalCost):
    """sum_{t in [l, r]} |s_t - s_c| for a non-increasing s, in O(1) per interval via prefix sums:
    left of c every s_t >= s_c and right of c every s_t <= s_c, so the absolute values drop."""

    def __init__(self, values: np.ndarray):
        super().__init__(len(values))
        self.values = values
        self.prefix = np.concatenate([[0.0], np.cumsum(values)])

    def costs(self, starts: np.ndarray, last: int) -> np.ndarray:
        starts = np.asarray(starts, dtype=np.int64)
        c = _centres(starts, last)
        s_c = self.values[c]
        left = (self.prefix[c + 1] - self.prefix[starts]) - (c - starts + 1) * s_c
        right = (last - c + 1) * s_c - (self.prefix[last + 1] - self.prefix[c])
        return left + right


class _CentreRowCost(IntervalCost):
    """sum_{t in [l, r]} M[c, t] for any T x T matrix M, in O(1) per interval via row prefix sums
    (T x (T+1) floats: the same order of memory as the affinity matrix itself)."""

    def __init__(self, matrix: np.ndarray):
        super().__init__(matrix.shape[0])
        self.row_prefix = np.concatenate([np.zeros((matrix.shape[0], 1)), np.cumsum(matrix, axis=1)], axis=1)

    def costs(self, starts: np.ndarray, last: int) -> np.ndarray:
        starts = np.asarray(starts, dtype=np.int64)
        c = _centres(starts, last)
        return self.row_prefix[c, last + 1] - self.row_prefix[c, starts]


def _check_T(T: int | None) -> int | None:
    if T is None:
        return None
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
        raise ValueError(f"T must be a positive integer (number of timesteps), got {T!r}")
    return int(T)


def _infer_T(T: int | None, length: int, name: str) -> int:
    T = _check_T(T)
    if T is not None and T != length:
        raise ValueError(f"T={T} does not match {name}, which covers {length} timesteps; pass T={length} or omit T")
    return length


def _as_finite_array(array: object, name: str, ndim: int) -> np.ndarray:
    if array is None:
        raise ValueError(f"{name} is required for this clustering cost; pass {name}=...")
    try:
        values = np.asarray(array, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a numeric array: {error}") from None
    if values.ndim != ndim or values.size == 0:
        raise ValueError(f"{name} must be a non-empty {ndim}-D array, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} contains NaN or inf; clean it (e.g. clip log-SNR) before clustering")
    return values


@CLUSTERING_COSTS.register("timestep")
def timestep_cost(*, T: int | None = None, snr: object = None, affinity: object = None) -> IntervalCost:
    """sum |t - c|. Needs T; snr and affinity are ignored."""
    T = _check_T(T)
    if T is None:
        raise ValueError("T is required for the 'timestep' clustering cost; pass T=<number of timesteps>")
    return _TimestepCost(T)


@CLUSTERING_COSTS.register("snr")
def snr_cost(*, T: int | None = None, snr: object = None, affinity: object = None) -> IntervalCost:
    """sum |SNR(t) - SNR(c)|. snr[t] is the SNR (or any 1-D score, e.g. log-SNR) of timestep t."""
    values = _as_finite_array(snr, "snr", ndim=1)
    _infer_T(T, len(values), "snr")
    steps = np.diff(values)
    if np.all(steps <= 0):
        return _MonotoneAbsDeviationCost(values)
    if np.all(steps >= 0):
        return _MonotoneAbsDeviationCost(-values)  # |s_t - s_c| is unchanged by negating s
    return _CentreRowCost(np.abs(values[None, :] - values[:, None]))


@CLUSTERING_COSTS.register("gradient")
def gradient_cost(*, T: int | None = None, snr: object = None, affinity: object = None) -> IntervalCost:
    """-sum A[c, t] with A the T x T task affinity (gradient cosine) matrix."""
    matrix = _as_finite_array(affinity, "affinity", ndim=2)
    if matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"affinity must be square (T x T), got shape {matrix.shape}")
    _infer_T(T, matrix.shape[0], "affinity")
    return _CentreRowCost(-matrix)


def build_interval_cost(
    cost: str | IntervalCost,
    *,
    T: int | None = None,
    snr: object = None,
    affinity: object = None,
) -> IntervalCost:
    """Resolve a cost name (or pass through a ready IntervalCost, checking T against it)."""
    if isinstance(cost, IntervalCost):
        if _check_T(T) is not None and T != cost.T:
            raise ValueError(f"T={T} does not match the given cost object, which covers {cost.T} timesteps")
        return cost
    if not isinstance(cost, str):
        raise ValueError(f"cost must be a cost name or an IntervalCost, got {cost!r}")
    return CLUSTERING_COSTS.get(cost)(T=T, snr=snr, affinity=affinity)
