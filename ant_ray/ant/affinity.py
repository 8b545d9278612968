"""Gradient-cosine task affinity between denoising tasks (Go et al. 2023, Sec. 3.2 and App. B):
A[i, j] = cos(grad L_i, grad L_j), averaged over training checkpoints by the caller.

The kernel knows nothing about models or losses: the caller passes ``grad_fn(task) -> 1-D tensor``
(the flattened gradient of task ``task``'s loss, e.g. a timestep bucket). With many parameters P,
keeping n_tasks gradients costs n_tasks x P memory; ``sketch_dim=d`` instead keeps random
projections of length d (Johnson-Lindenstrauss: cosines are preserved up to ~1/sqrt(d)).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

# Elements of the projection block generated at once in sketch mode (float32: 16 MiB).
_SKETCH_CHUNK_ELEMENTS = 1 << 22


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def flat_gradient(loss: torch.Tensor, parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    """Gradient of a scalar loss w.r.t. parameters, flattened into one 1-D tensor (zeros for
    parameters the loss does not touch). A convenient body for a ``grad_fn``."""
    parameters = [p for p in parameters if p.requires_grad]
    grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    return torch.cat([
        (torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(parameters, grads)
    ])


def _unit_gradient(grad_fn: Callable[[int], torch.Tensor], task: int, numel: int | None) -> torch.Tensor:
    grad = grad_fn(task)
    if not isinstance(grad, torch.Tensor) or grad.ndim != 1 or not grad.is_floating_point():
        raise ValueError(
            f"grad_fn({task}) must return a 1-D floating-point torch tensor (the flattened gradient), got "
            f"{type(grad).__name__} with shape {tuple(getattr(grad, 'shape', ()))}"
        )
    if numel is not None and grad.numel() != numel:
        raise ValueError(f"grad_fn({task}) returned {grad.numel()} elements, but earlier tasks returned {numel}")
    # Half-precision gradients are upcast: their norms and dot products overflow/lose precision.
    grad = grad.detach().to(torch.float64 if grad.dtype == torch.float64 else torch.float32)
    norm = torch.linalg.vector_norm(grad)
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError(
            f"grad_fn({task}) returned a gradient with norm {norm.item()}; the cosine needs a finite, non-zero gradient"
        )
    return grad / norm


def _sketch(unit_grad: torch.Tensor, sketch_dim: int, seed: int) -> torch.Tensor:
    """R^T g for a Gaussian R (P x d) generated block by block from a fresh generator seeded with
    ``seed``: every task sees the same R (same seed, same block shapes) but R is never stored whole.
    The stream depends on the device type, which is the same for all tasks of one call."""
    generator = torch.Generator(device=unit_grad.device)
    generator.manual_seed(seed)
    rows_per_block = max(1, _SKETCH_CHUNK_ELEMENTS // sketch_dim)
    sketch = torch.zeros(sketch_dim, dtype=unit_grad.dtype, device=unit_grad.device)
    for start in range(0, unit_grad.numel(), rows_per_block):
        block = unit_grad[start : start + rows_per_block]
        projection = torch.randn(
            block.numel(), sketch_dim, generator=generator, dtype=unit_grad.dtype, device=unit_grad.device
        )
        sketch += block @ projection
    return sketch


def task_affinity(
    grad_fn: Callable[[int], torch.Tensor],
    n_tasks: int,
    *,
    sketch_dim: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """[n_tasks, n_tasks] float64 matrix of cosine similarities between task gradients.

    Exact mode (sketch_dim=None) holds the n_tasks unit gradients (n_tasks x P) on their device.
    Sketch mode holds n_tasks x sketch_dim projections and is approximate (error ~ 1/sqrt(d))."""
    if not _is_int(n_tasks) or n_tasks < 1:
        raise ValueError(f"n_tasks must be a positive integer, got {n_tasks!r}")
    if sketch_dim is not None and (not _is_int(sketch_dim) or sketch_dim < 1):
        raise ValueError(f"sketch_dim must be a positive integer or None (exact mode), got {sketch_dim!r}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")

    rows: torch.Tensor | None = None
    numel: int | None = None
    for task in range(n_tasks):
        unit_grad = _unit_gradient(grad_fn, task, numel)
        numel = unit_grad.numel()
        row = unit_grad if sketch_dim is None else _sketch(unit_grad, int(sketch_dim), int(seed))
        if rows is None:  # allocate once: stacking a list would briefly double the memory
            rows = torch.empty(n_tasks, row.numel(), dtype=row.dtype, device=row.device)
        rows[task] = row
        del unit_grad, row
    assert rows is not None
    if sketch_dim is not None:
        rows = rows / torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    gram = (rows @ rows.T).clamp(-1.0, 1.0)
    return gram.double().cpu().numpy()


def _check_square(matrix: object, name: str) -> np.ndarray:
    values = np.asarray(matrix, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] != values.shape[1] or values.size == 0:
        raise ValueError(f"{name} must be a non-empty square matrix, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} contains NaN or inf")
    return values


def bucket_bounds(n_buckets: int, T: int) -> list[tuple[int, int]]:
    """Half-open timestep ranges of the buckets: t is in bucket floor(t * n_buckets / T)."""
    if not _is_int(T) or T < 1:
        raise ValueError(f"T must be a positive integer, got {T!r}")
    if not _is_int(n_buckets) or not 1 <= n_buckets <= T:
        raise ValueError(f"n_buckets must be an integer in [1, T={T}] so no bucket is empty, got {n_buckets!r}")
    # floor(t*B/T) >= b  <=>  t >= ceil(b*T/B)
    starts = [-(-b * T // n_buckets) for b in range(n_buckets + 1)]
    return list(zip(starts[:-1], starts[1:]))


def expand_bucket_affinity(bucket_affinity: object, T: int) -> np.ndarray:
    """[T, T] per-timestep affinity from a [B, B] bucket affinity: A_t[t, s] = A[b(t), b(s)] with
    b(t) = floor(t * B / T). Feed the result to interval clustering with cost="gradient"."""
    values = _check_square(bucket_affinity, "bucket_affinity")
    n_buckets = values.shape[0]
    if not _is_int(T) or T < n_buckets:
        raise ValueError(f"T must be an integer >= the number of buckets ({n_buckets}), got {T!r}")
    bucket = (np.arange(T) * n_buckets) // T
    return values[np.ix_(bucket, bucket)]


def average_affinity(matrices: Sequence[object]) -> np.ndarray:
    """Element-wise mean of affinity matrices measured at different training checkpoints."""
    if len(matrices) == 0:
        raise ValueError("matrices must hold at least one affinity matrix")
    arrays = [_check_square(m, f"matrices[{i}]") for i, m in enumerate(matrices)]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"matrices must all have the same shape, got {sorted(shapes)}")
    return np.mean(arrays, axis=0)


def affinity_heatmap(affinity: object, path: str | Path, *, title: str = "Task affinity (gradient cosine)") -> Path:
    """Write the affinity matrix as a PNG heatmap (0 is white; the colour scale is symmetric)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg: no display needed
    from matplotlib.figure import Figure

    values = _check_square(affinity, "affinity")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    limit = float(np.abs(values).max()) or 1.0
    figure = Figure(figsize=(5.5, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    figure.colorbar(image, ax=axes, label="cosine similarity")
    axes.set_xlabel("task")
    axes.set_ylabel("task")
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path
