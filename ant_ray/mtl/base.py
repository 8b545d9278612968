"""The contract every MTL method follows, the registry they live in, and flat-gradient helpers.

ANT (Go et al., NeurIPS 2023, Sec. 4.2) treats each timestep cluster as one task and applies an
off-the-shelf MTL method to the k clusters. Two families exist:

* loss balancing (LS, RLW, UW): ``needs_grads = False``. The trainer calls
  ``weighted_loss(losses[k], present[k])`` and does one ``backward()``.
* gradient manipulation (PCGrad, Nash-MTL, GradNorm, IMTL-G, CAGrad, UW+PCGrad): ``needs_grads = True``.
  The trainer computes one flat gradient per cluster (``flat_grad``), all-reduces the ``[k, P]`` matrix
  and the ``[k]`` losses across data-parallel workers, calls ``combine(grads, losses, present, step)``,
  writes the returned ``[P]`` direction into ``.grad`` (``write_flat_grad``) and steps the optimizer.

Every method is an ``nn.Module`` so that learnable state (UW log-variances, GradNorm weights) is reached
by ``method.parameters()`` for the optimizer, and all state (parameters, RNG state, cached Nash weights,
GradNorm's initial losses) is in ``state_dict()`` as plain tensors, so checkpoints may be torch or
safetensors files and resume is exact.

Learnable parameters of *gradient* methods are updated by the trainer's optimizer, like those of UW:
``combine`` sets their ``.grad`` (overwriting it) to a closed-form gradient computed from the
all-reduced losses/gradients, so it is identical on every worker. Consequences for the trainer:
put ``method.parameters()`` in the optimizer (not in DDP; a param group with ``weight_decay=0``, since
decay would pull log-variances / weights towards 0), call ``optimizer.step()`` after ``combine`` and do
not zero gradients in between.

``present[i]`` is False when cluster i had no sample in the (global) batch: its loss and gradient row are
ignored entirely (they may hold NaN) and results equal those of the method run on the present rows only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from ant_ray.plugin_options import check_mtl_options, check_positive_int
from ant_ray.registry import Registry

MTL_METHODS: Registry[type["MTLMethod"]] = Registry("MTL method")


# ---------------------------------------------------------------- the base class


class MTLMethod(nn.Module):
    """Base class of all MTL methods; see the module docstring for the calling contract."""

    name: ClassVar[str] = ""
    needs_grads: ClassVar[bool]

    def __init__(self, num_tasks: int):
        super().__init__()
        self.num_tasks = check_positive_int("num_tasks", num_tasks)

    def _checked(self, **options: Any) -> dict[str, Any]:
        """The constructor's options checked by the rules the config is validated with (plugin_options)."""
        return check_mtl_options(self.name, options)

    # -- the two entry points; each family implements one of them
    def weighted_loss(self, losses: Tensor, present: Tensor | None = None) -> Tensor:
        raise TypeError(
            f"{type(self).__name__} is a gradient method (needs_grads=True): call "
            "combine(grads, losses, present, step) instead of weighted_loss"
        )

    def combine(
        self, grads: Tensor, losses: Tensor, present: Tensor | None = None, step: int = 0
    ) -> Tensor:
        raise TypeError(
            f"{type(self).__name__} is a loss-balancing method (needs_grads=False): call "
            "weighted_loss(losses, present) and backward() its result instead of combine"
        )

    def log_values(self) -> dict[str, float]:
        """Scalars worth logging after the latest call (names are stable across steps)."""
        return {}

    # -- input validation shared by both families
    def _check_losses(self, losses: Tensor) -> Tensor:
        if not isinstance(losses, Tensor) or losses.shape != (self.num_tasks,):
            shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise ValueError(f"losses must be a tensor of shape ({self.num_tasks},), got {shape}")
        if not losses.is_floating_point():
            raise ValueError(f"losses must be floating point, got {losses.dtype}")
        return losses

    def _check_present(self, present: Tensor | None, device: torch.device) -> Tensor:
        if present is None:
            return torch.ones(self.num_tasks, dtype=torch.bool, device=device)
        if not isinstance(present, Tensor) or present.shape != (self.num_tasks,):
            shape = tuple(present.shape) if isinstance(present, Tensor) else type(present).__name__
            raise ValueError(f"present must be a bool tensor of shape ({self.num_tasks},), got {shape}")
        if present.dtype != torch.bool:
            raise ValueError(f"present must have dtype torch.bool, got {present.dtype}")
        return present.to(device)

    # -- seeded randomness whose state lives in the state dict (a uint8 buffer)
    def _init_rng(self, seed: int) -> None:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(seed)
        self.register_buffer("rng_state", generator.get_state())

    @contextmanager
    def _generator(self) -> Iterator[torch.Generator]:
        """A CPU generator restored from the ``rng_state`` buffer; its new state is written back, so
        the buffer is the single source of truth (and ``load_state_dict`` restores it exactly).
        CPU on purpose: the draw sequence is then the same whatever device the inputs live on."""
        generator = torch.Generator(device="cpu")
        generator.set_state(self.rng_state.detach().to("cpu"))
        yield generator
        self.rng_state.copy_(generator.get_state().to(self.rng_state.device))


class LossWeightingMethod(MTLMethod):
    """Loss balancing: the trainer backpropagates ``weighted_loss(losses, present)`` once."""

    needs_grads: ClassVar[bool] = False

    def weighted_loss(self, losses: Tensor, present: Tensor | None = None) -> Tensor:
        losses = self._check_losses(losses)
        present = self._check_present(present, losses.device)
        # Absent clusters may carry NaN (mean over no samples): replace before any arithmetic so that
        # neither the value nor any gradient can pick the NaN up.
        safe_losses = torch.where(present, losses, torch.zeros_like(losses))
        return self._weighted_loss(safe_losses, present)

    def _weighted_loss(self, losses: Tensor, present: Tensor) -> Tensor:
        """``losses`` is already zero where ``present`` is False."""
        raise NotImplementedError


class GradientMethod(MTLMethod):
    """Gradient manipulation. Subclasses implement ``_coefficients``: the direction is always a linear
    combination ``sum_i c_i g_i`` of the present clusters' gradients, so every method works on the
    small n x n Gram matrix (float64, on the CPU) and touches the [n, P] gradients only twice (one
    Gram product, one weighted sum). That keeps it cheap for large P and deterministic across workers
    that hold the same all-reduced gradients."""

    needs_grads: ClassVar[bool] = True

    def combine(
        self, grads: Tensor, losses: Tensor, present: Tensor | None = None, step: int = 0
    ) -> Tensor:
        if not isinstance(grads, Tensor) or grads.dim() != 2 or grads.shape[0] != self.num_tasks:
            shape = tuple(grads.shape) if isinstance(grads, Tensor) else type(grads).__name__
            raise ValueError(f"grads must be a tensor of shape ({self.num_tasks}, P), got {shape}")
        if not grads.is_floating_point():
            raise ValueError(f"grads must be floating point, got {grads.dtype}")
        losses = self._check_losses(losses)
        step = check_positive_int("step", step, minimum=0)
        present = self._check_present(present, grads.device)

        present_cpu = present.detach().to("cpu")
        index = torch.nonzero(present_cpu).flatten()
        n_present = int(index.numel())
        if n_present == 0:
            self._on_no_present()
            return torch.zeros(grads.shape[1], dtype=grads.dtype, device=grads.device)

        # Select rows only when needed (indexing copies [n, P]); bf16/fp16 are summed in float32.
        rows = grads if n_present == self.num_tasks else grads[index.to(grads.device)]
        work = rows if rows.dtype in (torch.float32, torch.float64) else rows.float()
        work = work.detach()
        gram = (work @ work.T).to(device="cpu", dtype=torch.float64).numpy()
        if not np.all(np.isfinite(gram)):
            raise ValueError("grads has non-finite values in the rows of present clusters")
        present_losses = losses.detach()[index.to(losses.device)].to("cpu", torch.float64).numpy()
        if not np.all(np.isfinite(present_losses)):
            raise ValueError("losses has non-finite values for present clusters")

        coefficients = self._coefficients(gram, present_losses, index.tolist(), step)
        coefficients_t = torch.as_tensor(coefficients, dtype=work.dtype, device=work.device)
        direction = coefficients_t @ work
        direction = self._postprocess(direction)
        return direction.to(grads.dtype)

    def _coefficients(
        self, gram: np.ndarray, losses: np.ndarray, index: list[int], step: int
    ) -> np.ndarray:
        """Weights c[n] of the present rows (``index`` are their cluster ids, ascending)."""
        raise NotImplementedError

    def _postprocess(self, direction: Tensor) -> Tensor:
        return direction

    def _on_no_present(self) -> None:
        """Hook for state updates when a (degenerate) batch has no cluster at all."""


# ---------------------------------------------------------------- construction with clear errors


def build_mtl_method(name: str, num_tasks: int, options: Mapping[str, Any] | None = None) -> MTLMethod:
    """``MTL_METHODS.get(name)(num_tasks=num_tasks, **options)``, but an unknown option name raises a
    ValueError listing the accepted ones (instead of Python's TypeError)."""
    options = dict(options or {})
    check_mtl_options(name, options)
    return MTL_METHODS.get(name)(num_tasks=num_tasks, **options)


# ---------------------------------------------------------------- flat gradients for the trainer


def _as_list(params: Iterable[Tensor]) -> list[Tensor]:
    params = list(params)
    if not params:
        raise ValueError("params is empty; pass the model parameters that the MTL method acts on")
    return params


def flatten_grads(params: Iterable[Tensor]) -> Tensor:
    """Concatenate the ``.grad`` of ``params`` (zeros where a parameter has none) into one [P] tensor."""
    params = _as_list(params)
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
    )


def flat_grad(loss: Tensor, params: Iterable[Tensor], *, retain_graph: bool = True) -> Tensor:
    """Gradient of a scalar ``loss`` w.r.t. ``params`` as one [P] tensor, leaving ``.grad`` untouched
    (parameters the loss does not reach get zeros). Use one call per cluster loss."""
    params = _as_list(params)
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise ValueError("loss must be a scalar tensor")
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]
    )


def write_flat_grad(params: Iterable[Tensor], flat: Tensor) -> None:
    """Write a [P] tensor (as laid out by ``flatten_grads``) into the ``.grad`` of ``params``."""
    params = _as_list(params)
    total = sum(p.numel() for p in params)
    if not isinstance(flat, Tensor) or flat.dim() != 1 or flat.numel() != total:
        shape = tuple(flat.shape) if isinstance(flat, Tensor) else type(flat).__name__
        raise ValueError(f"flat must be a 1-D tensor with {total} elements (the params' size), got {shape}")
    offset = 0
    for p in params:
        chunk = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
        if p.grad is None:
            p.grad = chunk.to(device=p.device, dtype=p.dtype, copy=True)
        else:
            p.grad.copy_(chunk)
