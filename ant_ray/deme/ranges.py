"""The specialists' timestep ranges: explicit, N equal ranges (DeMe), or ANT's interval clustering with N clusters."""

from __future__ import annotations

from ant_ray.ant.clustering import interval_clustering
from ant_ray.config import PipelineConfig
from ant_ray.diffusion import NoiseSchedule


def specialist_ranges(cfg: PipelineConfig) -> list[tuple[int, int]]:
    ft, T = cfg.finetune, cfg.diffusion.T
    if ft.ranges is not None:
        return [(int(a), int(b)) for a, b in ft.ranges]
    n = ft.num_specialists
    if ft.range_clustering is None:
        return [(i * T // n, (i + 1) * T // n) for i in range(n)]
    # DeMe with ANT's ranges (neither paper combines them): the DP's size bounds T/(2N) <= size <= 2T/N apply.
    snr = NoiseSchedule.create(cfg.diffusion.schedule, T).snr().numpy()
    return [(int(a), int(b)) for a, b in interval_clustering(n, ft.range_clustering, T=T, snr=snr)]
