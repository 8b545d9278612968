"""PCGrad, projecting conflicting gradients (Yu et al., "Gradient Surgery for Multi-Task Learning",
NeurIPS 2020, Algorithm 1).

For each present cluster i, start from g_i^PC = g_i and visit the other clusters j in a random order;
whenever g_i^PC . g_j < 0, remove the conflicting component: g_i^PC -= (g_i^PC . g_j / ||g_j||^2) g_j
(projections are onto the *original* g_j, as in the paper and LibMTL). The update is
sum_i g_i^PC (Algorithm 1 and LibMTL sum; ``reduction="mean"`` divides by the number of present
clusters). The visiting order is a fresh permutation per cluster per call (LibMTL's choice), drawn for
all k clusters from a generator seeded by ``seed`` whose state is in the state dict.

Everything is done on coefficients: g_i^PC = sum_m C[i, m] g_m, so g_i^PC . g_j = (C M)[i, j] with the
Gram matrix M; the [n, P] gradients are only read to form M and the final sum.

Logged: ``pcgrad_conflict_rate``, the fraction of ordered pairs (i, j), i != j, of present clusters whose
gradients have negative cosine (0 when fewer than two clusters are present).
"""

from __future__ import annotations

import numpy as np
import torch

from ant_ray.mtl.base import MTL_METHODS, GradientMethod


def pcgrad_coefficients(gram: np.ndarray, orders: list[list[int]]) -> np.ndarray:
    """Coefficient matrix C[n, n] with g_i^PC = sum_m C[i, m] g_m. ``orders[i]`` is the sequence of
    row indices that row i is projected against (entries equal to i are harmless: g_i . g_i >= 0)."""
    n = gram.shape[0]
    coefficients = np.eye(n)
    for i in range(n):
        for j in orders[i]:
            dot = coefficients[i] @ gram[:, j]
            if dot < 0.0 and gram[j, j] > 0.0:
                coefficients[i, j] -= dot / gram[j, j]
    return coefficients


def conflict_rate(gram: np.ndarray) -> float:
    """Fraction of ordered pairs i != j with g_i . g_j < 0."""
    n = gram.shape[0]
    if n < 2:
        return 0.0
    off_diagonal = ~np.eye(n, dtype=bool)
    return float(np.count_nonzero(gram[off_diagonal] < 0.0)) / (n * (n - 1))


def draw_projection_orders(method: GradientMethod, index: list[int]) -> list[list[int]]:
    """One random permutation of all k clusters per cluster (so the random stream does not depend on
    which clusters are present), restricted to the present ones and given as row positions."""
    with method._generator() as generator:
        permutations = [
            torch.randperm(method.num_tasks, generator=generator).tolist() for _ in range(method.num_tasks)
        ]
    position = {cluster: row for row, cluster in enumerate(index)}
    return [[position[c] for c in permutations[cluster] if c in position] for cluster in index]


@MTL_METHODS.register("pcgrad")
class PCGrad(GradientMethod):
    name = "pcgrad"

    def __init__(self, num_tasks: int, *, seed: int = 0, reduction: str = "sum"):
        super().__init__(num_tasks)
        options = self._checked(seed=seed, reduction=reduction)
        self.reduction = options["reduction"]
        self._init_rng(options["seed"])
        self._conflict_rate: float | None = None

    def _coefficients(self, gram, losses, index, step):
        orders = draw_projection_orders(self, index)
        self._conflict_rate = conflict_rate(gram)
        weights = pcgrad_coefficients(gram, orders).sum(axis=0)
        if self.reduction == "mean":
            weights = weights / len(index)
        return weights

    def _on_no_present(self) -> None:
        draw_projection_orders(self, [])  # keep the random stream independent of presence
        self._conflict_rate = 0.0

    def log_values(self) -> dict[str, float]:
        return {} if self._conflict_rate is None else {"pcgrad_conflict_rate": self._conflict_rate}
