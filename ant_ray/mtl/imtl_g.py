"""IMTL-G, the gradient half of impartial MTL (Liu et al., "Towards Impartial Multi-task Learning",
ICLR 2021).

Find weights alpha (summing to 1) such that d = sum_i alpha_i g_i has equal projections onto every unit
gradient u_i = g_i / ||g_i||: d . (u_1 - u_i) = 0 for i = 2..n. Closed form (paper Eq. 6):

    alpha_{2:n} = g_1 U^T (D U^T)^{-1},   alpha_1 = 1 - sum_{i>=2} alpha_i,
    D = [g_1 - g_2, ..., g_1 - g_n],   U = [u_1 - u_2, ..., u_1 - u_n].

With E = [1, -I] ((n-1) x n), D = E G and U = E N G (N = diag(1/||g_i||)), so only the Gram matrix M is
needed: D U^T = E M N E^T and g_1 U^T = (M N E^T)[0]. A singular D U^T (e.g. two identical gradients)
falls back to the least-squares solution, like LibMTL's pseudo-inverse. Clusters whose gradient is exactly
zero have no direction and are left out (weight 0). Not implemented: IMTL-L (its loss-scale half).
"""

from __future__ import annotations

import numpy as np

from ant_ray.mtl.base import MTL_METHODS, GradientMethod


def imtl_g_weights(gram: np.ndarray) -> np.ndarray:
    """IMTL-G weights alpha[n] (sum 1 over non-zero rows) from the Gram matrix of the gradients."""
    gram = np.asarray(gram, dtype=np.float64)
    n = gram.shape[0]
    weights = np.zeros(n)
    active = np.flatnonzero(np.diag(gram) > 0.0)
    if active.size == 0:
        return weights
    if active.size == 1:
        weights[active] = 1.0
        return weights
    m = gram[np.ix_(active, active)]
    inverse_norms = 1.0 / np.sqrt(np.diag(m))
    size = active.size
    e = np.hstack([np.ones((size - 1, 1)), -np.eye(size - 1)])
    m_n_et = (m * inverse_norms[None, :]) @ e.T  # M N E^T, shape (n, n-1)
    system = e @ m_n_et  # D U^T
    rhs = m_n_et[0]  # g_1 U^T
    # alpha_{2:n} D U^T = g_1 U^T  <=>  (D U^T)^T alpha_{2:n}^T = (g_1 U^T)^T
    tail, *_ = np.linalg.lstsq(system.T, rhs, rcond=None)
    weights[active] = np.concatenate([[1.0 - tail.sum()], tail])
    return weights


@MTL_METHODS.register("imtl_g")
class IMTLG(GradientMethod):
    name = "imtl_g"

    def __init__(self, num_tasks: int):
        super().__init__(num_tasks)
        self._weights: dict[int, float] = {}

    def _coefficients(self, gram, losses, index, step):
        weights = imtl_g_weights(gram)
        self._weights = dict(zip(index, weights.tolist()))
        return weights

    def log_values(self) -> dict[str, float]:
        return {f"imtl_alpha_{i}": w for i, w in self._weights.items()}
