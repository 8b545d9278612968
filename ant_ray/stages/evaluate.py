"""FID scoring as Ray tasks: every stage scores its models here, concurrently, with declared resources."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import ray

from ant_ray.config import PipelineConfig, ResourcesConfig
from ant_ray.diffusion import load_model, model_denoiser, routed_denoiser
from ant_ray.evaluation import FIDScorer


@ray.remote(num_cpus=0)
def _score_remote(cfg_dump: dict, cache_dir: str, model_dirs: list[str], ranges: list[list[int]] | None,
                  num_samples: int | None = None, seed: int | None = None) -> float:
    """FID of one model, or of DeMe's routed ensemble when several models and their ranges are given."""
    cfg = PipelineConfig.model_validate(cfg_dump)
    scorer = FIDScorer(cfg, Path(cache_dir))
    denoisers = [model_denoiser(load_model(d).to(scorer.device).eval()) for d in model_dirs]
    denoiser = denoisers[0] if ranges is None else routed_denoiser([tuple(r) for r in ranges], denoisers)
    return scorer.score(denoiser, num_samples, seed)


def score_in_parallel(cfg: PipelineConfig, cache_dir: Path,
                      jobs: dict[str, tuple[list[str], list[list[int]] | None]],
                      resources: ResourcesConfig | None = None) -> dict[str, float]:
    """FID of each job (model folders, plus ranges for a routed ensemble) as concurrent Ray tasks, each holding
    `resources` (default: merge_search.resources; one GPU each on a cluster)."""
    r = resources or cfg.merge_search.resources
    cfg_dump = cfg.worker_dump()
    refs = {k: _score_remote.options(num_cpus=r.cpu, num_gpus=r.gpu).remote(cfg_dump, str(cache_dir), dirs, rr)
            for k, (dirs, rr) in jobs.items()}
    return dict(zip(refs, ray.get(list(refs.values()))))


@dataclass
class RepeatedScore:
    """FID of one model under several sampling seeds: mean and a 95% t-interval (none for a single seed)."""
    metric: str
    scores: list[float]

    @property
    def mean(self) -> float:
        return sum(self.scores) / len(self.scores)

    @property
    def half_width(self) -> float | None:
        n = len(self.scores)
        if n < 2:
            return None
        from scipy.stats import t

        sd = math.sqrt(sum((s - self.mean) ** 2 for s in self.scores) / (n - 1))
        return float(t.ppf(0.975, n - 1) * sd / math.sqrt(n))

    def text(self) -> str:
        hw = self.half_width
        return f"{self.mean:.3f}" + (f" ± {hw:.3f} (95% interval, {len(self.scores)} seeds)" if hw is not None
                                     else " (1 seed: no interval)")


def score_with_seeds(cfg: PipelineConfig, cache_dir: Path, model_dir: Path, *, num_samples: int, seeds: list[int],
                     metric: str, resources: ResourcesConfig) -> RepeatedScore:
    """FID-n of a model once per sampling seed, the seeds in parallel as Ray tasks."""
    cfg_dump = cfg.worker_dump()
    refs = [_score_remote.options(num_cpus=resources.cpu, num_gpus=resources.gpu).remote(
        cfg_dump, str(cache_dir), [str(model_dir)], None, num_samples, seed) for seed in seeds]
    return RepeatedScore(metric, [float(v) for v in ray.get(refs)])
