"""The interface every merge method implements, and the registry that maps YAML names to methods.

`TaskVectorMerger` (in `ant_ray.merge.task_vectors`) flattens every floating tensor of a state dict into one
vector of P entries, ordered so that each layer group is one contiguous slice, and stacks the N task vectors
tau_i = theta_i - theta_base into one (N, P) matrix. A merge method sees only these flat tensors:

- `prepare(task_vectors, tensor_slices)` runs once per merger and may rewrite the (N, P) matrix in place
  (weight-independent work, e.g. TIES trimming), so that every later `combine` call is cheap.
- `combine(base, task_vectors, weights, out)` writes the merged parameters of one contiguous slice (one layer
  group: `base` (P_s,), `task_vectors` (N, P_s), `weights` (N,)) into `out` (P_s,).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ant_ray.registry import Registry


class MergeMethod:
    """Base class: options go to `__init__` (they come from YAML); the two hooks do the math."""

    def prepare(self, task_vectors: torch.Tensor, tensor_slices: Sequence[slice]) -> None:
        """Weight-independent preprocessing, in place on the (N, P) task-vector matrix. Default: nothing."""

    def combine(self, base: torch.Tensor, task_vectors: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> None:
        raise NotImplementedError


MERGE_METHODS: Registry[type[MergeMethod]] = Registry("merge method")


def build_merge_method(name: str, **options: object) -> MergeMethod:
    """`MERGE_METHODS.get(name)(**options)`, turning a wrong option name into a ValueError that names it."""
    method_class = MERGE_METHODS.get(name)
    try:
        return method_class(**options)
    except TypeError as error:
        raise ValueError(f"bad options {sorted(options)} for merge method {name!r}: {error}") from None
