"""CAGrad, conflict-averse gradient descent (Liu et al., NeurIPS 2021).

Primal: d maximises min_i g_i . d subject to ||d - g_0|| <= c ||g_0||, with g_0 the mean gradient.
Dual over the simplex (paper Eq. 3 / the official code):

    w* = argmin_{w in simplex} g_w . g_0 + c ||g_0|| ||g_w||,      g_w = sum_i w_i g_i,
    d  = g_0 + (c ||g_0|| / ||g_w*||) g_w*,

solved with scipy's SLSQP on the n x n Gram matrix (analytic gradient; the objective is rescaled by the
Gram's mean diagonal, which leaves w* unchanged, so the tolerances mean the same at any gradient
scale). ``rescale`` follows the official code: 0 returns d, 1 (default) d / (1 + c^2), 2 d / (1 + c).
With c = 0, d is the mean gradient.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize

from ant_ray.mtl.base import MTL_METHODS, GradientMethod

_EPS = 1e-8  # keeps sqrt differentiable at 0, as the official code does


def cagrad_dual_weights(gram: np.ndarray, c: float) -> np.ndarray:
    """w* on the simplex minimising g_w . g_0 + c ||g_0|| ||g_w|| (see module docstring)."""
    gram = np.asarray(gram, dtype=np.float64)
    n = gram.shape[0]
    if n == 1 or c == 0.0:
        return np.full(n, 1.0 / n)
    scale = float(np.mean(np.diag(gram)))
    if scale <= 0.0:
        return np.full(n, 1.0 / n)
    a = gram / scale
    mean_weights = np.full(n, 1.0 / n)
    a_g0 = a @ mean_weights  # (g_i . g_0) for each i
    radius = c * np.sqrt(mean_weights @ a_g0 + _EPS)  # c ||g_0||

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        a_w = a @ w
        norm_w = np.sqrt(w @ a_w + _EPS)
        return float(w @ a_g0 + radius * norm_w), a_g0 + radius * a_w / norm_w

    result = minimize(
        objective,
        mean_weights,
        jac=True,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * n,
        constraints=({"type": "eq", "fun": lambda w: 1.0 - w.sum(), "jac": lambda w: -np.ones_like(w)},),
        options={"ftol": 1e-12, "maxiter": 200},
    )
    weights = np.clip(result.x, 0.0, None)
    return weights / weights.sum()


def cagrad_coefficients(gram: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """(coefficients of d = g_0 + (c ||g_0|| / ||g_w*||) g_w* in terms of the rows, before rescaling;
    the dual weights w*)."""
    gram = np.asarray(gram, dtype=np.float64)
    n = gram.shape[0]
    mean_weights = np.full(n, 1.0 / n)
    w = cagrad_dual_weights(gram, c)
    g0_norm = np.sqrt(max(float(mean_weights @ gram @ mean_weights), 0.0))
    gw_norm = np.sqrt(max(float(w @ gram @ w), 0.0))
    if c == 0.0 or g0_norm == 0.0 or gw_norm == 0.0:
        return mean_weights, w
    return mean_weights + (c * g0_norm / gw_norm) * w, w


@MTL_METHODS.register("cagrad")
class CAGrad(GradientMethod):
    name = "cagrad"

    def __init__(self, num_tasks: int, *, c: float = 0.4, rescale: int = 1):
        super().__init__(num_tasks)
        options = self._checked(c=c, rescale=rescale)
        self.c, self.rescale = options["c"], options["rescale"]
        self._dual: dict[int, float] = {}

    def _coefficients(self, gram, losses, index, step):
        coefficients, dual = cagrad_coefficients(gram, self.c)
        self._dual = dict(zip(index, dual.tolist()))
        divisor = {0: 1.0, 1: 1.0 + self.c**2, 2: 1.0 + self.c}[self.rescale]
        return coefficients / divisor

    def log_values(self) -> dict[str, float]:
        return {f"cagrad_weight_{i}": w for i, w in self._dual.items()}
