"""GradNorm (Chen et al., "GradNorm: Gradient Normalization for Adaptive Loss Balancing", ICML 2018).

Learnable task weights w_i (sum k) scale the clusters: d = sum_i w_i g_i. The weights are trained to
equalise the weighted gradient norms relative to each cluster's training rate:

    G_i = ||w_i g_i|| = w_i ||g_i||,   G_bar = mean_i G_i,
    r_i = (L_i / L_i(0)) / mean_j (L_j / L_j(0)),
    L_grad = sum_i | G_i - G_bar * r_i^alpha |        (the target G_bar r_i^alpha is a constant),

so dL_grad/dw_i = sign(G_i - target_i) ||g_i||. L_i(0) is the cluster's loss the first time it is
present. The gradient uses all parameters P the caller passes (the paper uses the last shared layer to
save compute; here the per-cluster gradients already exist).

Update rule (our choice, as in LibMTL): ``weights`` is a parameter trained by the trainer's optimizer.
``combine`` sets ``weights.grad`` to dL_grad/dw (0 for absent clusters) and uses the current weights for
d; before that it renormalises the weights in place to be positive and sum to k, the paper's
renormalisation after each update (done lazily at the next call, so the checkpointed value is
whatever the optimizer left and resume is exact). ``alpha`` (default 1.5) sets the restoring force.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ant_ray.mtl.base import MTL_METHODS, GradientMethod

_MIN_WEIGHT = 1e-6  # keeps weights positive when an optimizer step overshoots below zero


@MTL_METHODS.register("gradnorm")
class GradNorm(GradientMethod):
    name = "gradnorm"

    def __init__(self, num_tasks: int, *, alpha: float = 1.5):
        super().__init__(num_tasks)
        self.alpha = self._checked(alpha=alpha)["alpha"]
        self.weights = nn.Parameter(torch.ones(num_tasks, dtype=torch.float32))
        self.register_buffer("initial_losses", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("initial_recorded", torch.zeros(num_tasks, dtype=torch.bool))
        self._gradnorm_loss: float | None = None

    @torch.no_grad()
    def normalized_weights(self) -> torch.Tensor:
        """Renormalise the weights in place (positive, sum k) and return them."""
        self.weights.clamp_(min=_MIN_WEIGHT)
        self.weights.mul_(self.num_tasks / self.weights.sum())
        return self.weights.detach()

    def _coefficients(self, gram, losses, index, step):
        weights = self.normalized_weights()[index].to("cpu", torch.float64).numpy()
        index_t = torch.as_tensor(index, dtype=torch.long, device=self.initial_losses.device)
        new = ~self.initial_recorded[index_t]
        if bool(new.any()):
            first = torch.as_tensor(losses, dtype=torch.float64, device=self.initial_losses.device)
            self.initial_losses[index_t[new]] = first[new]
            self.initial_recorded[index_t[new]] = True
        initial = self.initial_losses[index_t].to("cpu").numpy()

        grad_norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
        weighted_norms = weights * grad_norms
        # An initial loss of 0 means the cluster was already solved: treat its training rate as 1.
        loss_ratios = np.where(initial > 0, losses / np.where(initial > 0, initial, 1.0), 1.0)
        mean_ratio = loss_ratios.mean()
        rates = loss_ratios / mean_ratio if mean_ratio > 0 else np.ones_like(loss_ratios)
        targets = weighted_norms.mean() * rates**self.alpha
        self._gradnorm_loss = float(np.abs(weighted_norms - targets).sum())

        weight_grad = torch.zeros_like(self.weights)
        weight_grad[index_t.to(weight_grad.device)] = torch.as_tensor(
            np.sign(weighted_norms - targets) * grad_norms, dtype=weight_grad.dtype, device=weight_grad.device
        )
        self.weights.grad = weight_grad
        return weights

    def _on_no_present(self) -> None:
        self.weights.grad = torch.zeros_like(self.weights)  # never re-apply last step's gradient

    def log_values(self) -> dict[str, float]:
        if self._gradnorm_loss is None:
            return {}
        weights = self.weights.detach().clamp(min=_MIN_WEIGHT)
        weights = weights * (self.num_tasks / weights.sum())  # as the next combine will use them
        logs = {f"gradnorm_weight_{i}": float(w) for i, w in enumerate(weights.tolist())}
        logs["gradnorm_loss"] = self._gradnorm_loss
        return logs
