"""TIES-merging (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023) with
per-task weights, so that DeMe's searched weights w_i can drive it like they drive Eq. 8.

Exactly what is computed, per entry of the flattened state dict, from task vectors tau_i = theta_i - theta_base:

1. Trim (once per merger; it does not depend on the weights): in every tau_i keep the entries whose magnitude is
   among the top `density` fraction and zero the others. Over n entries the threshold is the ceil(density * n)-th
   largest magnitude; entries equal to the threshold are kept, so exact ties can keep a few more than that.
   `trim_scope="global"` (the paper): n = all floating entries of tau_i, one threshold per task vector.
   `trim_scope="tensor"` (mergekit's variant): one threshold per state-dict tensor.
2. Scale: v_i = w_i * trimmed tau_i (w_i from the layer group of the entry when per-group weights are used).
3. Elect the sign: gamma = sign(sum_i v_i), the sign carrying the larger total mass.
4. Disjoint mean: A = {i : sign(v_i) = gamma} (a zero never agrees with +-1), m = sum_{i in A} v_i / |A|,
   and m = 0 where A holds only zeros.
5. theta_merged = theta_base + m.

With every w_i = lambda this is the paper's theta_base + lambda * tau_m (trimming, the election and the mean are
unchanged by a common positive scale). A one-hot weight e_j gives theta_base + trim(tau_j); all-zero weights give
theta_base. The mean divides by the number of agreeing tasks, not by the sum of their weights (mergekit's choice),
so the weights keep the meaning of lambda and a merge with w = (1, 0, ..., 0) is not rescaled.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .base import MERGE_METHODS, MergeMethod

TRIM_SCOPES = ("global", "tensor")


@MERGE_METHODS.register("ties")
class TiesMerge(MergeMethod):
    # combine() works on column chunks so its temporaries stay around N * 4 MiB instead of N * P floats.
    chunk_size = 1 << 20

    def __init__(self, density: float = 0.2, trim_scope: str = "global"):
        if not isinstance(density, (int, float)) or not 0.0 < float(density) <= 1.0:
            raise ValueError(f"ties option density must be a fraction in (0, 1] (the paper keeps 0.2); got {density!r}")
        if trim_scope not in TRIM_SCOPES:
            raise ValueError(f"ties option trim_scope must be one of {TRIM_SCOPES}; got {trim_scope!r}")
        self.density = float(density)
        self.trim_scope = trim_scope

    def prepare(self, task_vectors: torch.Tensor, tensor_slices: Sequence[slice]) -> None:
        for row in task_vectors:
            if self.trim_scope == "global":
                keep_top_magnitudes_(row, self.density)
            else:
                for part in tensor_slices:
                    keep_top_magnitudes_(row[part], self.density)

    def combine(self, base: torch.Tensor, task_vectors: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> None:
        for start in range(0, base.numel(), self.chunk_size):
            part = slice(start, start + self.chunk_size)
            scaled = task_vectors[:, part] * weights[:, None]
            elected = scaled.sum(dim=0).sign()
            agrees = scaled.sign() == elected
            agreeing_count = agrees.sum(dim=0).clamp_(min=1)
            disjoint_mean = (scaled * agrees).sum(dim=0) / agreeing_count
            torch.add(base[part], disjoint_mean, out=out[part])


def keep_top_magnitudes_(values: torch.Tensor, density: float) -> None:
    """Zero, in place, every entry of the 1-D `values` whose magnitude is below the ceil(density * n)-th largest."""
    n = values.numel()
    keep = max(1, math.ceil(density * n - 1e-6))  # the tolerance absorbs float error in density * n
    if keep >= n:
        return
    magnitudes = values.abs()
    # the keep-th largest magnitude is the (n - keep + 1)-th smallest
    threshold = torch.kthvalue(magnitudes, n - keep + 1).values
    values.masked_fill_(magnitudes < threshold, 0.0)
