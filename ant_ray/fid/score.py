"""FID of a sampler against a dataset: metric names, cached reference statistics, streaming generation."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ant_ray.fid.extractors import FeatureExtractor, ImageDatasetLike, dataset_fingerprint
from ant_ray.fid.frechet import FeatureStats, StreamingFeatureStats

# sample_fn(batch_size, generator_seed) -> float [batch_size, C, H, W] in [-1, 1]
SampleFn = Callable[[int, int], torch.Tensor]

# Reference images are pushed through the extractor this many at a time (the extractor batches further).
_REFERENCE_CHUNK = 1024


def fid_metric_name(n: int, extractor_name: str) -> str:
    """``fid5k_inception`` for 5000 samples, ``fid500_domain`` for 500: the sample count is part of the
    name because FID is biased by it (never compare FIDs measured at different n)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int (number of generated samples), got {n!r}")
    if not re.fullmatch(r"[a-z0-9_]+", extractor_name):
        raise ValueError(f"extractor_name must be lower-case letters, digits or '_', got {extractor_name!r}")
    count = f"{n // 1000}k" if n % 1000 == 0 else str(n)
    return f"fid{count}_{extractor_name}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "dataset"


def reference_stats_path(
    dataset: ImageDatasetLike, extractor: FeatureExtractor, cache_dir: str | os.PathLike
) -> Path:
    """Cache file of the dataset's feature statistics; its name changes with the dataset's fingerprint, the
    resolution, the extractor and the extractor's weights."""
    parts = (dataset.name, dataset_fingerprint(dataset), dataset.resolution, extractor.name, extractor.cache_key)
    identity = "|".join(str(part) for part in parts)
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return Path(cache_dir) / f"ref_{_slug(dataset.name)}_{dataset.resolution}px_{extractor.name}_{key}.npz"


def reference_stats(
    dataset: ImageDatasetLike, extractor: FeatureExtractor, cache_dir: str | os.PathLike
) -> FeatureStats:
    """Feature statistics of all the dataset's images, computed once and cached as .npz under cache_dir."""
    path = reference_stats_path(dataset, extractor, cache_dir)
    if path.exists():
        stats = FeatureStats.load(path)
        if stats.dim != extractor.feature_dim:
            raise ValueError(f"cached reference stats {path} have dimension {stats.dim}, the extractor "
                             f"{extractor.feature_dim}; delete the file")
        return stats
    images = dataset.images
    if images.shape[0] < 2:
        raise ValueError(f"dataset {dataset.name!r} has {images.shape[0]} images; FID needs at least 2")
    running = StreamingFeatureStats(extractor.feature_dim)
    for chunk in images.split(_REFERENCE_CHUNK):
        running.update(extractor.features(chunk))
    stats = running.to_stats()
    stats.save(path)
    return stats


def batch_seed(seed: int, batch_index: int) -> int:
    """Generator seed of batch ``batch_index``: hashed so that runs with different seeds never share
    batches (seed + index would make (seed=0, batch 1) equal (seed=1, batch 0))."""
    # >> 1 keeps it below 2**63, which torch.manual_seed accepts.
    return int(np.random.SeedSequence([seed, batch_index]).generate_state(1, dtype=np.uint64)[0]) >> 1


def fid_from_sampler(
    sample_fn: SampleFn,
    n: int,
    batch_size: int,
    extractor: FeatureExtractor,
    ref_stats: FeatureStats,
    seed: int,
) -> float:
    """FID of ``n`` generated images against ``ref_stats``.

    Batch i asks ``sample_fn(size, batch_seed(seed, i))`` for ``size = min(batch_size, images left)``
    images, so the same (seed, n, batch_size) gives the same images. Only the running mean and covariance
    are kept, so memory does not grow with n.
    """
    if ref_stats.dim != extractor.feature_dim:
        raise ValueError(f"ref_stats have dimension {ref_stats.dim} but the {extractor.name!r} extractor gives "
                         f"{extractor.feature_dim}; compute ref_stats with the same extractor")
    running = extend_feature_stream(sample_fn, None, n, batch_size, extractor, seed)
    return running.to_stats().frechet_distance(ref_stats)


def extend_feature_stream(
    sample_fn: SampleFn,
    running: StreamingFeatureStats | None,
    n: int,
    batch_size: int,
    extractor: FeatureExtractor,
    seed: int,
) -> StreamingFeatureStats:
    """Features of the first ``n`` images of the stream (seed, batch_size), continuing ``running`` (the features
    of its first ``running.n`` images) instead of generating those again: successive halving re-scores a candidate
    at a higher fidelity for the cost of the extra images only. The result equals a fresh stream of ``n``."""
    for arg, value in (("n", n), ("batch_size", batch_size), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{arg} must be an int, got {value!r}")
    if n < 2:
        raise ValueError(f"n must be >= 2 for a covariance, got {n}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    running = running if running is not None else StreamingFeatureStats(extractor.feature_dim)
    if running.dim != extractor.feature_dim:
        raise ValueError(f"the stream has dimension {running.dim} but the {extractor.name!r} extractor gives "
                         f"{extractor.feature_dim}")
    if running.n > n or running.n % batch_size:
        raise ValueError(f"cannot continue a stream of {running.n} images to {n} in batches of {batch_size}: it "
                         "must stop at a whole batch, below n")
    for index, start in enumerate(range(0, n, batch_size)):
        if start < running.n:
            continue
        size = min(batch_size, n - start)
        images = sample_fn(size, batch_seed(seed, index))
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] != size:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"sample_fn({size}, seed) must return a [{size}, C, H, W] tensor, got {got}")
        if not torch.isfinite(images).all():
            raise ValueError(f"sample_fn returned NaN or inf in batch {index}; the model has likely diverged")
        running.update(extractor.features(images))
    return running
