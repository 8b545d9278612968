"""Interval clustering DP against brute force over all compositions, with costs written straight
from their definitions (ANT Sec. 4.1 / App. G)."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from ant_ray.ant.clustering import (
    cluster_of_timestep,
    default_size_bounds,
    interval_clustering,
    solve_interval_clustering,
)
from ant_ray.ant.clustering_costs import CLUSTERING_COSTS, build_interval_cost

# ---------------------------------------------------------------- independent reference


def centre(start: int, end: int) -> int:
    """Centre of the half-open interval [start, end), i.e. of inclusive [start, end-1]."""
    return (start + end - 1) // 2


def reference_cost(kind: str, start: int, end: int, snr=None, affinity=None) -> float:
    c = centre(start, end)
    if kind == "timestep":
        return float(sum(abs(t - c) for t in range(start, end)))
    if kind == "snr":
        return float(sum(abs(snr[t] - snr[c]) for t in range(start, end)))
    return float(-sum(affinity[c][t] for t in range(start, end)))


def compositions(T: int, k: int, min_size: int, max_size: int):
    """Every split of T into k ordered sizes within bounds."""
    if k == 0:
        if T == 0:
            yield ()
        return
    for size in range(min_size, min(max_size, T) + 1):
        for rest in compositions(T - size, k - 1, min_size, max_size):
            yield (size, *rest)


def to_intervals(sizes) -> list[tuple[int, int]]:
    ends = np.cumsum(sizes).tolist()
    return list(zip([0, *ends[:-1]], ends))


def brute_force(kind, T, k, min_size, max_size, snr=None, affinity=None):
    """(optimal cost, the cost-optimal splits with the least sum of squared sizes)."""
    scored = []
    for sizes in compositions(T, k, min_size, max_size):
        intervals = to_intervals(sizes)
        total = sum(reference_cost(kind, s, e, snr, affinity) for s, e in intervals)
        scored.append((total, sum(x * x for x in sizes), intervals))
    best = min(total for total, _, _ in scored)
    optimal = [(sq, iv) for total, sq, iv in scored if total <= best + 1e-9 * (1 + abs(best))]
    least_sq = min(sq for sq, _ in optimal)
    return best, [iv for sq, iv in optimal if sq == least_sq]


def linear_schedule_snr(T: int) -> np.ndarray:
    betas = np.linspace(1e-4, 0.02 * 1000 / T, T)
    alpha_bar = np.cumprod(1 - betas)
    return alpha_bar / (1 - alpha_bar)


RNG = np.random.default_rng(1234)


def problem_inputs(kind: str, T: int, variant: int):
    """Arrays for each cost: variant 0 realistic, 1 random, 2 integer-valued (many exact ties)."""
    if kind == "timestep":
        return {}
    if kind == "snr":
        snr = [linear_schedule_snr(T), RNG.normal(size=T), RNG.integers(0, 3, size=T).astype(float)][variant]
        return {"snr": snr}
    if variant == 0:  # smooth decay with timestep distance, like the paper's Fig. 1
        idx = np.arange(T)
        affinity = np.exp(-np.abs(idx[:, None] - idx[None, :]) / 3.0)
    elif variant == 1:
        affinity = RNG.uniform(-1, 1, size=(T, T))  # not even symmetric: only row c is used
    else:
        affinity = RNG.integers(-1, 2, size=(T, T)).astype(float)
    return {"affinity": affinity}


def bound_settings(T: int, k: int):
    settings = [("default", *default_size_bounds(T, k)), ("lifted", 1, T)]
    if 2 * k <= T <= 4 * k:
        settings.append(("custom", 2, 4))
    return settings


CASES = [
    (kind, T, k, variant)
    for kind in ("timestep", "snr", "gradient")
    for T in (1, 5, 8, 12)
    for k in sorted({1, 2, 3, 5, T} & set(range(1, T + 1)))
    for variant in ((0,) if kind == "timestep" else (0, 1, 2))
]


@pytest.mark.parametrize("kind,T,k,variant", CASES)
def test_dp_matches_brute_force(kind, T, k, variant):
    inputs = problem_inputs(kind, T, variant)
    for label, min_size, max_size in bound_settings(T, k):
        kwargs = {"min_size": min_size, "max_size": max_size}
        if label == "default":
            kwargs = {}  # exercise the defaults themselves
        result = solve_interval_clustering(k, kind, T=T, **inputs, **kwargs)
        best, preferred = brute_force(kind, T, k, min_size, max_size, **inputs)

        assert math.isclose(result.total_cost, best, rel_tol=1e-9, abs_tol=1e-9), label
        assert result.intervals in preferred, (label, result.intervals, preferred)
        assert (result.min_size, result.max_size) == (min_size, max_size)
        for (start, end), cost in zip(result.intervals, result.interval_costs):
            assert math.isclose(cost, reference_cost(kind, start, end, **inputs), abs_tol=1e-9)
        assert interval_clustering(k, kind, T=T, **inputs, **kwargs) == result.intervals


def test_default_bounds_follow_the_paper():
    assert default_size_bounds(1000, 5) == (100, 400)
    assert default_size_bounds(10, 3) == (2, 6)  # ceil(10/6), floor(20/3)
    # the defaults hold on the chosen intervals
    intervals = interval_clustering(4, "snr", snr=linear_schedule_snr(1000))
    sizes = [end - start for start, end in intervals]
    assert all(125 <= s <= 500 for s in sizes)


def test_bounds_change_the_optimum():
    """A single huge spike makes the unconstrained SNR optimum isolate it; bounds forbid that."""
    snr = np.zeros(12)
    snr[0] = 100.0
    free = interval_clustering(2, "snr", snr=snr, min_size=1, max_size=12)
    bounded = interval_clustering(2, "snr", snr=snr, min_size=4, max_size=8)
    assert free[0] == (0, 1)
    assert bounded[0][1] - bounded[0][0] >= 4


@pytest.mark.parametrize("T,k", [(1000, 2), (1000, 4), (1000, 5), (1000, 8), (1000, 10), (12, 3), (12, 6)])
def test_timestep_cost_gives_equal_split(T, k):
    size = T // k
    expected = [(i * size, (i + 1) * size) for i in range(k)]
    assert interval_clustering(k, "timestep", T=T) == expected
    assert interval_clustering(k, "timestep", T=T, min_size=1, max_size=T) == expected


@pytest.mark.parametrize("kind", ["timestep", "snr", "gradient"])
def test_t1000_k10_is_fast(kind):
    T = 1000
    idx = np.arange(T)
    inputs = {
        "timestep": {"T": T},
        "snr": {"snr": linear_schedule_snr(T)},
        "gradient": {"affinity": np.exp(-np.abs(idx[:, None] - idx[None, :]) / 50.0)},
    }[kind]
    for bounds in ({}, {"min_size": 1, "max_size": T}):
        began = time.perf_counter()
        intervals = interval_clustering(10, kind, **inputs, **bounds)
        elapsed = time.perf_counter() - began
        print(f"{kind} T=1000 k=10 {bounds or 'default bounds'}: {elapsed * 1000:.1f} ms")
        assert elapsed < 2.0
        assert intervals[0][0] == 0 and intervals[-1][1] == T and len(intervals) == 10


def test_cost_objects_and_registry():
    assert set(CLUSTERING_COSTS.names()) == {"timestep", "snr", "gradient"}
    cost = build_interval_cost("timestep", T=10)
    assert cost(0, 3) == 4.0  # centre 1: 1 + 0 + 1 + 2
    assert cost(2, 2) == 0.0
    with pytest.raises(ValueError, match="interval"):
        cost(3, 10)
    # a ready cost object can be passed instead of a name
    assert interval_clustering(2, cost, min_size=1, max_size=10) == [(0, 5), (5, 10)]
    with pytest.raises(ValueError, match="T=7"):
        interval_clustering(2, cost, T=7)


def test_cluster_of_timestep():
    assert cluster_of_timestep([(0, 2), (2, 5)]).tolist() == [0, 0, 1, 1, 1]
    for bad in ([], [(1, 3)], [(0, 2), (3, 5)], [(0, 2), (2, 2)]):
        with pytest.raises(ValueError, match="intervals"):
            cluster_of_timestep(bad)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        ({"k": 0, "T": 10}, r"^k \(number"),
        ({"k": 11, "T": 10}, r"^k \(number"),
        ({"k": 2.0, "T": 10}, r"^k \(number"),
        ({"k": True, "T": 10}, r"^k \(number"),
        ({"k": 2, "T": 0}, "^T must be"),
        ({"k": 2}, "T is required"),
        ({"k": 2, "T": 10, "min_size": 4, "max_size": 3}, "^min_size=4 exceeds max_size=3"),
        ({"k": 3, "T": 10, "min_size": 4, "max_size": 10}, "^min_size=4 is infeasible"),
        ({"k": 3, "T": 10, "min_size": 1, "max_size": 3}, "^max_size=3 is infeasible"),
        ({"k": 2, "T": 10, "min_size": 0, "max_size": 10}, "^min_size must be"),
        ({"k": 2, "T": 10, "min_size": 1, "max_size": 2.5}, "^max_size must be"),
        ({"k": 2, "cost": "manhattan", "T": 10}, "unknown clustering cost 'manhattan'"),
        ({"k": 2, "cost": "snr"}, "^snr is required"),
        ({"k": 2, "cost": "snr", "snr": np.ones((3, 3))}, "^snr must be a non-empty 1-D"),
        ({"k": 2, "cost": "snr", "snr": [1.0, np.nan, 2.0]}, "^snr contains NaN"),
        ({"k": 2, "cost": "snr", "snr": [1.0, np.inf, 2.0]}, "^snr contains NaN or inf"),
        ({"k": 2, "cost": "snr", "snr": np.ones(5), "T": 6}, "T=6"),
        ({"k": 2, "cost": "gradient"}, "^affinity is required"),
        ({"k": 2, "cost": "gradient", "affinity": np.ones(5)}, "^affinity must be a non-empty 2-D"),
        ({"k": 2, "cost": "gradient", "affinity": np.ones((4, 5))}, "^affinity must be square"),
        ({"k": 2, "cost": "gradient", "affinity": np.full((4, 4), np.nan)}, "^affinity contains NaN"),
        ({"k": 2, "cost": "gradient", "affinity": np.full((4, 4), -np.inf)}, "^affinity contains NaN or inf"),
        ({"k": 2, "cost": "gradient", "affinity": np.eye(4), "T": 5}, "T=5"),
        ({"k": 2, "cost": 3, "T": 10}, "^cost must be"),
    ],
)
def test_errors_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        solve_interval_clustering(**kwargs)


def test_inferred_T_allows_matching_T():
    snr = linear_schedule_snr(20)
    assert interval_clustering(2, "snr", snr=snr, T=20) == interval_clustering(2, "snr", snr=snr)
