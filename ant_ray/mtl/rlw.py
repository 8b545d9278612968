"""Random loss weighting (RLW; Lin et al., "Reasonable Effectiveness of Random Weighting", TMLR 2022).

Each call draws z ~ N(0, I_k) and weights the losses by softmax(z) (the paper's default normal
distribution, as in LibMTL), so the weights are positive and sum to 1 over the present clusters:
L = sum_i softmax(z)_i L_i. A ANT baseline (App. D.4, Table 7).

z is drawn for all k clusters every call (so the random stream does not depend on which clusters are
present) from a generator seeded by ``seed`` whose state is in the state dict; the softmax runs over the
present clusters only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ant_ray.mtl.base import MTL_METHODS, LossWeightingMethod


@MTL_METHODS.register("rlw")
class RandomLossWeighting(LossWeightingMethod):
    name = "rlw"

    def __init__(self, num_tasks: int, *, seed: int = 0):
        super().__init__(num_tasks)
        self._init_rng(self._checked(seed=seed)["seed"])
        self._last_weights: Tensor | None = None

    def _weighted_loss(self, losses: Tensor, present: Tensor) -> Tensor:
        with self._generator() as generator:
            z = torch.randn(self.num_tasks, generator=generator, dtype=torch.float64)
        z = z.to(losses.device)
        logits = torch.where(present, z, torch.full_like(z, float("-inf")))
        # All-absent gives softmax = NaN everywhere; the where maps it to zero weights.
        weights = torch.where(present, torch.softmax(logits, dim=0), torch.zeros_like(z))
        self._last_weights = weights.detach()
        return (weights.to(losses.dtype) * losses).sum()

    def log_values(self) -> dict[str, float]:
        if self._last_weights is None:
            return {}
        return {f"rlw_weight_{i}": float(w) for i, w in enumerate(self._last_weights.tolist())}
