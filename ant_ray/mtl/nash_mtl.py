"""Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022).

The update is d = sum_i alpha_i g_i where alpha > 0 solves the bargaining condition

    (G G^T alpha)_i = 1 / alpha_i      for every present cluster i,

i.e. every cluster gets utility g_i . d = 1 / alpha_i (so ||d||^2 = alpha^T G G^T alpha = n, the number of
present clusters, whatever the gradient scale). As in the reference code, the direction is then clipped
to norm ``max_norm`` (default 1.0, 0 disables), which makes the step length a hyperparameter.

Solver (numpy only, no cvxpy): alpha > 0 solving the condition is exactly the stationary point of the
strictly convex function F(alpha) = 1/2 alpha^T M alpha - sum_i log alpha_i (M = G G^T), because
grad F = M alpha - 1/alpha. We minimise F with Newton's method (Hessian M + diag(1/alpha^2) is positive
definite), a fraction-to-the-boundary step cap and Armijo backtracking; it converges in a handful of
iterations. The condition is invariant to rescaling the gradients (alpha_i = c_i / ||g_i|| where c solves
it for the cosine matrix), so we solve on the cosine matrix, which is well conditioned whatever the
gradient norms. When the gradients cancel exactly (0 lies in their convex hull, e.g. g_2 = -g_1) no
solution exists; a ridge of 1e-8 on the cosine matrix keeps the problem solvable (alpha stays bounded
and d ~ 0 along the cancelling directions) and changes well-posed solutions by a relative ~1e-8 c_i^2.
Clusters whose gradient is exactly zero get alpha_i = 0 (they cannot change d).

The reference implementation instead iterates a sequence of convex approximations with cvxpy (at most 20
solves); both target the same unique solution. Weights are refreshed every ``update_every`` steps and
reused in between (the Nash paper's speed-up; its code defaults to 1, ANT App. C uses 25, our default).
A refresh also happens when a present cluster has no weight from the last refresh (it was absent then).
Between refreshes the trainer may skip the per-cluster gradients: see ``fixed_weights``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ant_ray.mtl.base import MTL_METHODS, GradientMethod
from ant_ray.plugin_options import check_positive_int

NASH_RIDGE = 1e-8


def solve_nash_weights(gram: np.ndarray, *, tol: float = 1e-10, max_iter: int = 100) -> np.ndarray:
    """alpha >= 0 with (gram @ alpha) * alpha = 1 for every row with a non-zero gradient (alpha = 0 for
    zero rows). ``gram`` is the n x n Gram matrix G G^T of the gradients."""
    gram = np.asarray(gram, dtype=np.float64)
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square matrix, got shape {gram.shape}")
    n = gram.shape[0]
    alpha = np.zeros(n)
    active = np.diag(gram) > 0.0
    if not active.any():
        return alpha
    norms = np.sqrt(np.diag(gram)[active])
    cosine = gram[np.ix_(active, active)] / np.outer(norms, norms) + NASH_RIDGE * np.eye(len(norms))

    def objective(c: np.ndarray) -> float:
        return 0.5 * c @ cosine @ c - np.sum(np.log(c))

    c = np.ones(len(norms))  # exact when the gradients are orthogonal
    for _ in range(max_iter):
        cosine_c = cosine @ c
        if np.max(np.abs(c * cosine_c - 1.0)) < tol:
            break
        gradient = cosine_c - 1.0 / c
        step = np.linalg.solve(cosine + np.diag(1.0 / c**2), -gradient)
        shrinking = step < 0
        t = 1.0
        if shrinking.any():  # stay strictly inside alpha > 0
            t = min(1.0, 0.99 * float(np.min(-c[shrinking] / step[shrinking])))
        f0, slope = objective(c), float(gradient @ step)
        while objective(c + t * step) > f0 + 1e-4 * t * slope and t > 1e-12:
            t *= 0.5
        if t <= 1e-12:  # no further progress possible in floating point
            break
        c = c + t * step
    alpha[active] = c / norms
    return alpha


@MTL_METHODS.register("nash_mtl")
class NashMTL(GradientMethod):
    name = "nash_mtl"

    def __init__(self, num_tasks: int, *, update_every: int = 25, max_norm: float = 1.0):
        super().__init__(num_tasks)
        options = self._checked(update_every=update_every, max_norm=max_norm)
        self.update_every, self.max_norm = options["update_every"], options["max_norm"]
        self.register_buffer("alpha", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("alpha_valid", torch.zeros(num_tasks, dtype=torch.bool))
        self.register_buffer("last_refresh_step", torch.tensor(-1, dtype=torch.int64))
        self._refreshed = False

    def _refresh_due(self, step: int, index: list[int]) -> bool:
        last = int(self.last_refresh_step)
        if last < 0 or step < last or step - last >= self.update_every:
            return True
        return not bool(self.alpha_valid[index].all()) if index else False

    def fixed_weights(self, step: int, present: Tensor | None = None) -> Tensor | None:
        """The weights ``combine`` would use at ``step`` if no refresh is due, else None.

        When not None the trainer may skip the k per-cluster backward passes: backpropagate
        ``(weights * losses_with_absent_zeroed).sum()`` once, all-reduce, and pass the flat gradient
        through ``finish_direction``; the result equals ``combine`` at this step (which would change no
        state). Returns a float64 tensor of shape [k] (zero for absent clusters)."""
        step = check_positive_int("step", step, minimum=0)
        present = self._check_present(present, self.alpha.device)
        index = torch.nonzero(present.to("cpu")).flatten().tolist()
        if self._refresh_due(step, index):
            return None
        self._refreshed = False
        return torch.where(present, self.alpha, torch.zeros_like(self.alpha))

    def finish_direction(self, direction: Tensor) -> Tensor:
        """Apply the ``max_norm`` clip to a direction built from ``fixed_weights``."""
        return self._postprocess(direction)

    def _coefficients(self, gram, losses, index, step):
        self._refreshed = self._refresh_due(step, index)
        if self._refreshed:
            alpha = solve_nash_weights(gram)
            self.alpha.zero_()
            self.alpha_valid.zero_()
            self.alpha[index] = torch.as_tensor(alpha, dtype=self.alpha.dtype, device=self.alpha.device)
            self.alpha_valid[index] = True
            self.last_refresh_step.fill_(step)
        return self.alpha[index].to("cpu").numpy()

    def _postprocess(self, direction: Tensor) -> Tensor:
        if self.max_norm > 0:
            # same rule as torch.nn.utils.clip_grad_norm_, which the reference code applies
            scale = torch.clamp(self.max_norm / (direction.norm() + 1e-6), max=1.0)
            direction = direction * scale.to(direction.dtype)
        return direction

    def log_values(self) -> dict[str, float]:
        if int(self.last_refresh_step) < 0:
            return {}
        logs = {
            f"nash_alpha_{i}": float(a)
            for i, (a, valid) in enumerate(zip(self.alpha.tolist(), self.alpha_valid.tolist()))
            if valid
        }
        logs["nash_refreshed"] = float(self._refreshed)
        return logs
