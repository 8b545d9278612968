"""Scoring a model: FID-nK of samples drawn with the configured sampler against cached reference statistics, and the
plan a training loop follows to score itself at fixed steps (what a search trial reports to Tune)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ant_ray.config import PipelineConfig
from ant_ray.data import ImageDataset, load_dataset
from ant_ray.diffusion import Denoiser, NoiseSchedule, load_model, model_denoiser, sample_images
from ant_ray.evaluation_plan import EvaluationPlan
from ant_ray.fid import (StreamingFeatureStats, build_feature_extractor, extend_feature_stream, fid_metric_name,
                         reference_stats)
from ant_ray.merge import TaskVectorMerger, compute_task_vector
from ant_ray.training.progress import show_progress


def metric_name(cfg: PipelineConfig, num_samples: int | None = None) -> str:
    return fid_metric_name(num_samples or cfg.fid.num_samples, cfg.fid.extractor)


def pick_device(cfg: PipelineConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def load_reference_dataset(cfg: PipelineConfig) -> ImageDataset:
    return load_dataset(cfg.data.dataset, path=cfg.data.path, resolution=cfg.data.resolution,
                        channels=cfg.data.channels, limit=cfg.data.limit)


_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def in_precision(denoiser: Denoiser, precision: str) -> Denoiser:
    """The network under autocast at ``precision``; the sampler's own arithmetic stays in float32."""
    dtype = _AUTOCAST[precision]
    if dtype is None:
        return denoiser

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x_t.device.type, dtype=dtype):
            return denoiser(x_t, t).float()

    return denoise


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

    def sample(self, denoiser: Denoiser, n: int, seed: int, batch_size: int | None = None) -> torch.Tensor:
        s = self.cfg.sampler
        denoiser = in_precision(denoiser, s.precision)
        return torch.cat(list(sample_images(
            denoiser, self.schedule, n, shape=self.shape, sampler=s.name, steps=s.steps, eta=s.eta,
            target=self.cfg.diffusion.prediction, seed=seed, batch_size=batch_size or self.cfg.fid.batch_size,
            device=self.device)))

    def stream(self, denoiser: Denoiser, n: int, *, running: StreamingFeatureStats | None = None,
               seed: int | None = None, batch_size: int | None = None) -> StreamingFeatureStats:
        """Features of the first n samples of the stream (seed, batch_size), continuing ``running``. An evaluation
        of 10 batches or more shows its progress about every 10%, e.g. "[fid5k_inception] 2500/5000 samples"."""
        batch = batch_size or self.cfg.fid.batch_size
        start = running.n if running is not None else 0
        batches = math.ceil((n - start) / batch)
        every = batches // 10 if batches >= 10 else 0
        label, samples, batches_done = metric_name(self.cfg, n), start, 0

        def sample(size: int, batch_seed: int) -> torch.Tensor:
            nonlocal samples, batches_done
            images = self.sample(denoiser, size, batch_seed, batch)
            samples, batches_done = samples + size, batches_done + 1
            if every and (batches_done % every == 0 or batches_done == batches):
                show_progress(f"[{label}] {samples}/{n} samples")
            return images

        return extend_feature_stream(sample, running, n, batch, self.extractor,
                                     self.cfg.fid.seed if seed is None else seed)

    def fid(self, running: StreamingFeatureStats) -> float:
        return running.to_stats().frechet_distance(self.reference)

    def score(self, denoiser: Denoiser, num_samples: int | None = None, seed: int | None = None) -> float:
        return self.fid(self.stream(denoiser, num_samples or self.cfg.fid.num_samples, seed=seed))


# ------------------------------------------------------------------------------------------ scoring inside a loop


@dataclass
class MergedScore:
    metric: str
    fid: float
    weights: list[float] | None  # None: a single model, nothing merged
    tried: list[tuple[list[float], float]] = field(default_factory=list)

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {self.metric: self.fid}
        if self.weights is not None:
            out["merge_weights"] = list(self.weights)
        return out


def score_merged_states(plan: EvaluationPlan, scorer: FIDScorer, states: list[dict[str, torch.Tensor]],
                        template: torch.nn.Module, cfg: PipelineConfig) -> MergedScore:
    """FID of one model's weights, or of the merge of several specialists' weights (see EvaluationPlan).
    ``template`` is a scratch module of the models' architecture (its weights are overwritten)."""
    metric = metric_name(cfg, plan.num_samples)
    template.to(scorer.device).eval()
    if plan.base_model is None:
        template.load_state_dict(states[0])
        return MergedScore(metric, scorer.score(model_denoiser(template), plan.num_samples), None)
    base_state = {k: v.to(scorer.device) for k, v in load_model(plan.base_model).state_dict().items()}
    task_vectors = [compute_task_vector(base_state, {k: v.to(scorer.device) for k, v in s.items()}) for s in states]
    merger = TaskVectorMerger.from_task_vectors(base_state, task_vectors)
    tried = []
    for weights in plan.weight_candidates(len(states)):
        template.load_state_dict(merger.merge(weights))
        tried.append((weights, scorer.score(model_denoiser(template), plan.num_samples)))
    best_weights, best_fid = min(tried, key=lambda item: item[1])
    return MergedScore(metric, best_fid, best_weights, tried)
