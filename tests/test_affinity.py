"""Gradient-cosine task affinity: exact mode against numpy cosines, sketch mode against exact,
bucket expansion against the floor rule, and block recovery through interval clustering."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ant_ray.ant.affinity as affinity_module
from ant_ray.ant.affinity import (
    affinity_heatmap,
    average_affinity,
    bucket_bounds,
    expand_bucket_affinity,
    flat_gradient,
    task_affinity,
)
from ant_ray.ant.clustering import interval_clustering


def numpy_cosines(vectors: np.ndarray) -> np.ndarray:
    n = len(vectors)
    out = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            out[i, j] = vectors[i] @ vectors[j] / (np.linalg.norm(vectors[i]) * np.linalg.norm(vectors[j]))
    return out


def correlated_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    """Vectors sharing a common direction in different amounts, so cosines spread over (-1, 1)."""
    rng = np.random.default_rng(seed)
    common = rng.normal(size=dim)
    weights = np.linspace(-1.5, 1.5, n)
    return weights[:, None] * common + rng.normal(size=(n, dim)) * rng.uniform(0.2, 3.0, size=(n, 1))


def test_exact_mode_hand_computed():
    vectors = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [-2.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    A = task_affinity(lambda task: vectors[task], 4)
    s = 1 / np.sqrt(2)
    expected = np.array([[1, s, -1, 0], [s, 1, -s, 0], [-1, -s, 1, 0], [0, 0, 0, 1]])
    np.testing.assert_allclose(A, expected, atol=1e-6)
    assert A.dtype == np.float64 and A.shape == (4, 4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_exact_mode_matches_numpy(dtype):
    vectors = correlated_vectors(6, 500, seed=0)
    grads = torch.tensor(vectors, dtype=dtype)
    A = task_affinity(lambda task: grads[task], 6)
    expected = numpy_cosines(grads.double().numpy())  # cosines of what was actually passed
    np.testing.assert_allclose(A, expected, atol={torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3}[dtype])


def test_sketch_mode_close_to_exact():
    vectors = correlated_vectors(5, 3000, seed=1)
    grads = torch.tensor(vectors, dtype=torch.float32)
    exact = task_affinity(lambda task: grads[task], 5)
    sketched = task_affinity(lambda task: grads[task], 5, sketch_dim=4096, seed=3)
    assert np.abs(sketched - exact).max() < 0.08  # JL error ~ 1/sqrt(4096) per entry
    np.testing.assert_allclose(np.diag(sketched), 1.0, atol=1e-6)
    np.testing.assert_allclose(sketched, sketched.T, atol=1e-6)
    # reproducible for a seed, different for another
    np.testing.assert_array_equal(sketched, task_affinity(lambda task: grads[task], 5, sketch_dim=4096, seed=3))
    assert not np.array_equal(sketched, task_affinity(lambda task: grads[task], 5, sketch_dim=4096, seed=4))


def test_sketch_blocks_are_one_consistent_projection(monkeypatch):
    """With a tiny block budget the projection is generated in many blocks; sketching each basis vector
    e_i reads off row i of the implied matrix R, and every gradient g must sketch to g @ R."""
    sketch_dim, numel = 16, 50
    monkeypatch.setattr(affinity_module, "_SKETCH_CHUNK_ELEMENTS", sketch_dim * 7)  # 7 rows per block
    basis = torch.eye(numel, dtype=torch.float64)
    R = torch.stack([affinity_module._sketch(basis[i], sketch_dim, seed=5) for i in range(numel)])
    assert torch.linalg.matrix_rank(R) == sketch_dim  # really random rows, not a repeated block
    g = torch.randn(numel, dtype=torch.float64)
    torch.testing.assert_close(affinity_module._sketch(g, sketch_dim, seed=5), g @ R)


def test_sketch_mode_parallel_gradients_have_affinity_one(monkeypatch):
    monkeypatch.setattr(affinity_module, "_SKETCH_CHUNK_ELEMENTS", 64 * 5)
    base = torch.randn(1000)
    grads = [base, 3.0 * base, -base]
    A = task_affinity(lambda task: grads[task], 3, sketch_dim=64)
    np.testing.assert_allclose(A, [[1, 1, -1], [1, 1, -1], [-1, -1, 1]], atol=1e-5)


def test_flat_gradient_matches_manual():
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    unused = torch.nn.Parameter(torch.ones(4))
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    x = torch.randn(5, 3)
    loss = layer(x).pow(2).sum()
    flat = flat_gradient(loss, [layer.weight, layer.bias, unused, frozen])
    out = layer(x).detach()
    expected = torch.cat([(2 * out.T @ x).reshape(-1), 2 * out.sum(0), torch.zeros(4)])
    torch.testing.assert_close(flat, expected)


@pytest.mark.parametrize(
    "grad_fn,n_tasks,kwargs,message",
    [
        (lambda t: torch.ones(3), 0, {}, "^n_tasks"),
        (lambda t: torch.ones(3), 2, {"sketch_dim": 0}, "^sketch_dim"),
        (lambda t: torch.ones(3), 2, {"sketch_dim": 2.0}, "^sketch_dim"),
        (lambda t: torch.ones(3), 2, {"seed": -1}, "^seed"),
        (lambda t: torch.ones(2, 3), 2, {}, r"^grad_fn\(0\) must return a 1-D"),
        (lambda t: np.ones(3), 2, {}, r"^grad_fn\(0\) must return a 1-D"),
        (lambda t: torch.ones(3, dtype=torch.int64), 2, {}, r"^grad_fn\(0\) must return a 1-D floating"),
        (lambda t: torch.ones(3 + t), 2, {}, r"^grad_fn\(1\) returned 4 elements"),
        (lambda t: torch.zeros(3) if t == 1 else torch.ones(3), 2, {}, r"^grad_fn\(1\) returned a gradient with norm 0"),
        (lambda t: torch.tensor([1.0, float("nan")]), 2, {}, r"^grad_fn\(0\) returned a gradient with norm nan"),
    ],
)
def test_task_affinity_errors(grad_fn, n_tasks, kwargs, message):
    with pytest.raises(ValueError, match=message):
        task_affinity(grad_fn, n_tasks, **kwargs)


def test_expand_bucket_affinity_follows_floor_rule():
    A = np.arange(9, dtype=float).reshape(3, 3)
    T = 10
    expanded = expand_bucket_affinity(A, T)
    assert expanded.shape == (T, T)
    for t in range(T):
        for s in range(T):
            assert expanded[t, s] == A[t * 3 // T, s * 3 // T]
    np.testing.assert_array_equal(expand_bucket_affinity(A, 3), A)
    with pytest.raises(ValueError, match="^T must be"):
        expand_bucket_affinity(A, 2)
    with pytest.raises(ValueError, match="^bucket_affinity must be a non-empty square"):
        expand_bucket_affinity(np.ones((2, 3)), 10)
    with pytest.raises(ValueError, match="^bucket_affinity contains NaN"):
        expand_bucket_affinity(np.full((2, 2), np.nan), 10)


@pytest.mark.parametrize("n_buckets,T", [(1, 1), (3, 10), (7, 7), (10, 1000), (6, 1000), (13, 100)])
def test_bucket_bounds_agree_with_floor_rule(n_buckets, T):
    bounds = bucket_bounds(n_buckets, T)
    assert len(bounds) == n_buckets and bounds[0][0] == 0 and bounds[-1][1] == T
    for b, (start, end) in enumerate(bounds):
        assert start < end
        assert all(t * n_buckets // T == b for t in range(start, end))
    with pytest.raises(ValueError, match="^n_buckets"):
        bucket_bounds(T + 1, T)


def test_average_affinity():
    mats = [np.eye(2), np.ones((2, 2)), np.array([[1.0, -1.0], [-1.0, 1.0]])]
    np.testing.assert_allclose(average_affinity(mats), [[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="^matrices must hold"):
        average_affinity([])
    with pytest.raises(ValueError, match="^matrices must all have the same shape"):
        average_affinity([np.eye(2), np.eye(3)])
    with pytest.raises(ValueError, match=r"^matrices\[1\] contains NaN"):
        average_affinity([np.eye(2), np.full((2, 2), np.nan)])


def test_heatmap_writes_png(tmp_path):
    path = affinity_heatmap(np.array([[1.0, 0.2], [0.2, 1.0]]), tmp_path / "plots" / "affinity.png")
    assert path.exists() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="^affinity must be a non-empty square"):
        affinity_heatmap(np.ones(3), tmp_path / "bad.png")


def test_gradient_clustering_recovers_blocks():
    """Bucket gradients drawn around three block directions -> affinity -> per-timestep affinity ->
    gradient-cost clustering returns the block boundaries."""
    T, blocks_of_buckets = 100, [0, 0, 0, 1, 1, 1, 1, 1, 2, 2]  # 10 buckets of 10 timesteps
    generator = torch.Generator().manual_seed(0)
    directions = torch.randn(3, 400, generator=generator)
    noise = torch.randn(10, 400, generator=generator)
    grads = directions[blocks_of_buckets] + 0.5 * noise

    bucket_affinity = task_affinity(lambda task: grads[task], 10)
    expanded = expand_bucket_affinity(bucket_affinity, T)
    expected = [(0, 30), (30, 80), (80, 100)]
    assert interval_clustering(3, "gradient", affinity=expanded) == expected
    assert interval_clustering(3, "gradient", affinity=expanded, min_size=1, max_size=T) == expected


def test_gradient_clustering_recovers_blocks_of_a_synthetic_affinity():
    sizes = [17, 41, 23, 19]
    labels = np.repeat(np.arange(4), sizes)
    A = np.where(labels[:, None] == labels[None, :], 0.8, -0.1)
    np.fill_diagonal(A, 1.0)
    ends = np.cumsum(sizes).tolist()
    assert interval_clustering(4, "gradient", affinity=A) == list(zip([0, *ends[:-1]], ends))
