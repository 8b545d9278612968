"""Linear scalarization (LS): the plain sum of the cluster losses, every weight 1.

This is LibMTL's "EW" (equal weighting) and the baseline of ANT App. D.4 (Table 7). ``reduction="sum"``
(default, as LibMTL) gives sum_i L_i over present clusters; ``reduction="mean"`` divides by the number of
present clusters, which keeps the loss on the scale of a single cluster loss (closer to vanilla
diffusion training's E_t[L_t]).
"""

from __future__ import annotations

from torch import Tensor

from ant_ray.mtl.base import MTL_METHODS, LossWeightingMethod


@MTL_METHODS.register("ls")
class LinearScalarization(LossWeightingMethod):
    name = "ls"

    def __init__(self, num_tasks: int, *, reduction: str = "sum"):
        super().__init__(num_tasks)
        self.reduction = self._checked(reduction=reduction)["reduction"]

    def _weighted_loss(self, losses: Tensor, present: Tensor) -> Tensor:
        total = losses.sum()
        if self.reduction == "mean":
            total = total / present.sum().clamp(min=1).to(losses.dtype)
        return total
