"""Weighted task arithmetic, DeMe Eq. 8: theta_merged = theta_base + sum_i w_i * (theta_i - theta_base)."""

from __future__ import annotations

import torch

from .base import MERGE_METHODS, MergeMethod


@MERGE_METHODS.register("linear")
class LinearMerge(MergeMethod):
    """No options. One fused matrix-vector product per layer group: out = base + tau^T w."""

    def combine(self, base: torch.Tensor, task_vectors: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> None:
        # addmv reads each task vector once and writes `out` once; a Python loop of add_ calls would re-read
        # and re-write `out` N times (the merge is memory-bound).
        torch.addmv(base, task_vectors.t(), weights, out=out)
