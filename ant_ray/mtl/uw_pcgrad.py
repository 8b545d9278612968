"""UW + PCGrad, the combination ANT uses in Sec. 5.4 and App. D (Tables 5, 6).

Per-cluster gradients g_i are those of the raw cluster losses L_i. Uncertainty weighting (Kendall et al.)
scales cluster i's loss, hence its gradient, by exp(-s_i); PCGrad (Yu et al.) is then applied to the
scaled gradients exp(-s_i) g_i, and the direction is the PCGrad sum (see ``pcgrad.py``).

The log-variances s are this module's parameters, trained by the trainer's optimizer exactly as in plain
UW: ``combine`` sets ``log_vars.grad`` to the gradient of sum_i exp(-s_i) L_i + s_i, i.e.
1 - exp(-s_i) L_i for present clusters and 0 for absent ones (the same value ``uw`` gets from autograd),
computed from the all-reduced losses so every worker agrees. Logged: ``uw_logvar_{i}``,
``uw_weight_{i}`` = exp(-s_i) and ``pcgrad_conflict_rate``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ant_ray.mtl.base import MTL_METHODS, GradientMethod
from ant_ray.mtl.pcgrad import conflict_rate, draw_projection_orders, pcgrad_coefficients


@MTL_METHODS.register("uw_pcgrad")
class UWPCGrad(GradientMethod):
    name = "uw_pcgrad"

    def __init__(
        self, num_tasks: int, *, init_logvar: float = 0.0, seed: int = 0, reduction: str = "sum"
    ):
        super().__init__(num_tasks)
        options = self._checked(init_logvar=init_logvar, seed=seed, reduction=reduction)
        self.reduction = options["reduction"]
        self.log_vars = nn.Parameter(torch.full((num_tasks,), options["init_logvar"], dtype=torch.float32))
        self._init_rng(options["seed"])
        self._conflict_rate: float | None = None

    def _coefficients(self, gram, losses, index, step):
        log_vars = self.log_vars.detach()[index].to("cpu", torch.float64).numpy()
        scales = np.exp(-log_vars)
        scaled_gram = gram * np.outer(scales, scales)
        orders = draw_projection_orders(self, index)
        self._conflict_rate = conflict_rate(scaled_gram)
        weights = pcgrad_coefficients(scaled_gram, orders).sum(axis=0)
        if self.reduction == "mean":
            weights = weights / len(index)

        log_var_grad = torch.zeros_like(self.log_vars)
        log_var_grad[torch.as_tensor(index, device=log_var_grad.device)] = torch.as_tensor(
            1.0 - scales * losses, dtype=log_var_grad.dtype, device=log_var_grad.device
        )
        self.log_vars.grad = log_var_grad
        return weights * scales

    def _on_no_present(self) -> None:
        draw_projection_orders(self, [])
        self._conflict_rate = 0.0
        self.log_vars.grad = torch.zeros_like(self.log_vars)

    def log_values(self) -> dict[str, float]:
        values = self.log_vars.detach().tolist()
        logs = {f"uw_logvar_{i}": float(s) for i, s in enumerate(values)}
        logs.update({f"uw_weight_{i}": float(np.exp(-s)) for i, s in enumerate(values)})
        if self._conflict_rate is not None:
            logs["pcgrad_conflict_rate"] = self._conflict_rate
        return logs
