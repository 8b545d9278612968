"""FID scoring as Ray tasks: every stage scores its models here, concurrently, with declared resources."""

from __future__ import annotations

from pathlib import Path

import ray

from ant_ray.config import PipelineConfig, ResourcesConfig
from ant_ray.diffusion import load_model, model_denoiser, routed_denoiser
from ant_ray.evaluation import FIDScorer


@ray.remote(num_cpus=0)
def _score_remote(cfg_dump: dict, cache_dir: str, model_dirs: list[str], ranges: list[list[int]] | None) -> float:
    """FID of one model, or of DeMe's routed ensemble when several models and their ranges are given."""
    cfg = PipelineConfig.model_validate(cfg_dump)
    scorer = FIDScorer(cfg, Path(cache_dir))
    denoisers = [model_denoiser(load_model(d).to(scorer.device).eval()) for d in model_dirs]
    denoiser = denoisers[0] if ranges is None else routed_denoiser([tuple(r) for r in ranges], denoisers)
    return scorer.score(denoiser)


def score_in_parallel(cfg: PipelineConfig, cache_dir: Path,
                      jobs: dict[str, tuple[list[str], list[list[int]] | None]],
                      resources: ResourcesConfig | None = None) -> dict[str, float]:
    """FID of each job (model folders, plus ranges for a routed ensemble) as concurrent Ray tasks, each holding
    `resources` (default: merge_search.resources; one GPU each on a cluster)."""
    r = resources or cfg.merge_search.resources
    cfg_dump = cfg.model_dump(mode="json")
    refs = {k: _score_remote.options(num_cpus=r.cpu, num_gpus=r.gpu).remote(cfg_dump, str(cache_dir), dirs, rr)
            for k, (dirs, rr) in jobs.items()}
    return dict(zip(refs, ray.get(list(refs.values()))))
