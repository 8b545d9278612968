"""Scoring a model: FID-nK of samples drawn with the configured sampler against cached reference statistics."""

from __future__ import annotations

from pathlib import Path

import torch

from ant_ray.config import PipelineConfig
from ant_ray.data import ImageDataset, load_dataset
from ant_ray.diffusion import Denoiser, NoiseSchedule, sample_images
from ant_ray.fid import build_feature_extractor, fid_from_sampler, fid_metric_name, reference_stats


def metric_name(cfg: PipelineConfig) -> str:
    return fid_metric_name(cfg.fid.num_samples, cfg.fid.extractor)


def pick_device(cfg: PipelineConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def load_reference_dataset(cfg: PipelineConfig) -> ImageDataset:
    return load_dataset(cfg.data.dataset, path=cfg.data.path, resolution=cfg.data.resolution,
                        channels=cfg.data.channels, limit=cfg.data.limit)


class FIDScorer:
    """Holds the feature extractor and reference statistics once; scores any denoiser (a model, a merged
    model, or DeMe's routed ensemble) with the same samples seed so that scores are comparable."""

    def __init__(self, cfg: PipelineConfig, cache_dir: Path, device: torch.device | None = None,
                 dataset: ImageDataset | None = None):
        self.cfg = cfg
        self.device = device or pick_device(cfg)
        dataset = dataset or load_reference_dataset(cfg)
        self.shape = tuple(dataset.images.shape[1:])
        self.extractor = build_feature_extractor(cfg.fid.extractor, dataset=dataset, cache_dir=cache_dir,
                                                 device=self.device)
        self.reference = reference_stats(dataset, self.extractor, cache_dir)
        self.schedule = NoiseSchedule.create(cfg.diffusion.schedule, cfg.diffusion.T)
        self.metric = metric_name(cfg)

    def sample(self, denoiser: Denoiser, n: int, seed: int) -> torch.Tensor:
        s = self.cfg.sampler
        return torch.cat(list(sample_images(
            denoiser, self.schedule, n, shape=self.shape, sampler=s.name, steps=s.steps, eta=s.eta,
            target=self.cfg.diffusion.prediction, seed=seed, batch_size=self.cfg.fid.batch_size,
            device=self.device)))

    def score(self, denoiser: Denoiser) -> float:
        return fid_from_sampler(lambda size, seed: self.sample(denoiser, size, seed), self.cfg.fid.num_samples,
                                self.cfg.fid.batch_size, self.extractor, self.reference, self.cfg.fid.seed)
