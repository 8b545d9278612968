"""Measuring ANT's gradient task affinity of a diffusion model (Go et al. 2023, Sec. 3.2, App. B).

The T timesteps are grouped into B buckets (``bucket_bounds``); bucket b's task loss is the mean weighted diffusion
loss of a batch whose timesteps are drawn from that bucket. A[b, c] is the cosine between the flattened gradients of
buckets b and c (``task_affinity``); ``expand_bucket_affinity`` turns it into the T x T matrix that gradient-based
interval clustering takes.

Every bucket uses the same images and the same noise (common random numbers), so two buckets differ only in their
timesteps and the affinity reflects the tasks, not the sampling noise of different batches. The draws are explicit
(``draw_affinity_batch``) so a caller or a test can supply its own. Pure: no Ray, no files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from torch import Tensor

from ant_ray.ant.affinity import bucket_bounds, flat_gradient, task_affinity
from ant_ray.diffusion import Denoiser, NoiseSchedule, diffusion_loss
from ant_ray.diffusion.weightings import LossWeighting


@dataclass(frozen=True)
class AffinityBatch:
    x0: Tensor  # [n, C, H, W] clean images, shared by all buckets
    noise: Tensor  # [n, C, H, W] noise, shared by all buckets
    timesteps: Tensor  # [B, n] int64; row b lies in bucket b

    def __post_init__(self) -> None:
        if self.x0.shape != self.noise.shape or self.x0.dim() != 4:
            raise ValueError(f"x0 and noise must be [n, C, H, W] of equal shape, got {tuple(self.x0.shape)} and "
                             f"{tuple(self.noise.shape)}")
        if self.timesteps.dim() != 2 or self.timesteps.shape[1] != self.x0.shape[0]:
            raise ValueError(f"timesteps must be [buckets, n={self.x0.shape[0]}], got {tuple(self.timesteps.shape)}")


def draw_affinity_batch(images: Tensor, T: int, *, buckets: int, samples_per_bucket: int, seed: int) -> AffinityBatch:
    """n = samples_per_bucket images (without replacement when the dataset is large enough) and noise, shared by all
    buckets, and per bucket n timesteps uniform within the bucket. Deterministic in ``seed``."""
    if isinstance(samples_per_bucket, bool) or not isinstance(samples_per_bucket, int) or samples_per_bucket < 1:
        raise ValueError(f"samples_per_bucket must be a positive integer, got {samples_per_bucket!r}")
    if images.dim() != 4 or images.shape[0] < 1:
        raise ValueError(f"images must be a non-empty [N, C, H, W] tensor, got {tuple(images.shape)}")
    bounds = bucket_bounds(buckets, T)  # validates buckets and T
    generator = torch.Generator().manual_seed(seed)
    n_images = images.shape[0]
    if samples_per_bucket <= n_images:
        pick = torch.randperm(n_images, generator=generator)[:samples_per_bucket]
    else:
        pick = torch.randint(0, n_images, (samples_per_bucket,), generator=generator)
    x0 = images[pick.to(images.device)]
    noise = torch.randn(x0.shape, generator=generator).to(images.device)
    starts = torch.tensor([s for s, _ in bounds], dtype=torch.int64)[:, None]
    widths = torch.tensor([e - s for s, e in bounds], dtype=torch.int64)[:, None]
    offsets = (torch.rand(buckets, samples_per_bucket, generator=generator, dtype=torch.float64) * widths).long()
    return AffinityBatch(x0, noise, starts + torch.minimum(offsets, widths - 1))


def bucket_gradient(denoiser: Denoiser, parameters: list[Tensor], batch: AffinityBatch, bucket: int,
                    schedule: NoiseSchedule, *, target: str, weighting: LossWeighting,
                    chunk_size: int | None = None) -> Tensor:
    """Flat gradient of bucket ``bucket``'s mean weighted loss, accumulated over chunks of ``chunk_size`` samples
    (None: all at once) so that memory stays bounded for large models."""
    n = batch.x0.shape[0]
    size = n if chunk_size is None else chunk_size
    if size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    device = batch.x0.device
    t_all = batch.timesteps[bucket].to(device)
    total: Tensor | None = None
    for start in range(0, n, size):
        part = slice(start, start + size)
        per_sample = diffusion_loss(denoiser, batch.x0[part], t_all[part], batch.noise[part], schedule,
                                    target=target, weighting=weighting)
        grad = flat_gradient(per_sample.sum() / n, parameters)
        total = grad if total is None else total + grad
    assert total is not None
    return total


def bucket_affinity(denoiser: Denoiser, parameters: Iterable[Tensor], batch: AffinityBatch,
                    schedule: NoiseSchedule, *, target: str, weighting: LossWeighting,
                    sketch_dim: int | None = None, seed: int = 0, chunk_size: int | None = None) -> np.ndarray:
    """[B, B] gradient-cosine affinity between the timestep buckets of ``batch`` for the model behind ``denoiser``
    (``parameters``: the model's parameters). ``sketch_dim`` trades exactness for memory (see ``task_affinity``)."""
    parameters = [p for p in parameters if p.requires_grad]
    if not parameters:
        raise ValueError("parameters has no tensor that requires grad; pass the model's parameters")
    buckets = batch.timesteps.shape[0]
    if int(batch.timesteps.max()) >= schedule.T or int(batch.timesteps.min()) < 0:
        raise ValueError(f"batch.timesteps must lie in [0, T={schedule.T})")

    def grad_fn(bucket: int) -> Tensor:
        return bucket_gradient(denoiser, parameters, batch, bucket, schedule, target=target, weighting=weighting,
                               chunk_size=chunk_size)

    return task_affinity(grad_fn, buckets, sketch_dim=sketch_dim, seed=seed)
