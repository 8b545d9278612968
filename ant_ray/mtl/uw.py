"""Uncertainty weighting (UW; Kendall, Gal & Cipolla, CVPR 2018).

One learnable log-variance s_i = log sigma_i^2 per cluster, optimised jointly with the model by the
trainer's optimizer (they are this module's parameters):

    L = sum_i exp(-s_i) L_i + s_i          (over present clusters)

so dL/dL_i = exp(-s_i) and dL/ds_i = 1 - exp(-s_i) L_i: at the optimum exp(s_i) = L_i, i.e. each
cluster's weight tends to 1 / (its loss). Variants: Kendall's regression form is
L_i / (2 sigma_i^2) + log sigma_i, which is exactly half of the expression above (same optimum in s,
half the gradient); LibMTL and the Nash-MTL code use that halved form, LibMTL with s initialised at
-0.5. Here the un-halved form is used and ``init_logvar`` (default 0, i.e. all weights 1 at the start)
is an option. Absent clusters contribute neither their loss nor their s_i term, so their s_i receives
zero gradient.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ant_ray.mtl.base import MTL_METHODS, LossWeightingMethod


def uncertainty_weighted_loss(losses: Tensor, log_vars: Tensor, present: Tensor) -> Tensor:
    """sum over present i of exp(-s_i) L_i + s_i; ``losses`` must already be zero where absent."""
    terms = torch.exp(-log_vars).to(losses.dtype) * losses + log_vars.to(losses.dtype)
    return torch.where(present, terms, torch.zeros_like(terms)).sum()


@MTL_METHODS.register("uw")
class UncertaintyWeighting(LossWeightingMethod):
    name = "uw"

    def __init__(self, num_tasks: int, *, init_logvar: float = 0.0):
        super().__init__(num_tasks)
        init_logvar = self._checked(init_logvar=init_logvar)["init_logvar"]
        self.log_vars = nn.Parameter(torch.full((num_tasks,), init_logvar, dtype=torch.float32))

    def _weighted_loss(self, losses: Tensor, present: Tensor) -> Tensor:
        return uncertainty_weighted_loss(losses, self.log_vars.to(losses.device), present)

    def log_values(self) -> dict[str, float]:
        values = self.log_vars.detach().tolist()
        logs = {f"uw_logvar_{i}": float(s) for i, s in enumerate(values)}
        logs.update({f"uw_weight_{i}": math.exp(-s) for i, s in enumerate(values)})
        return logs
