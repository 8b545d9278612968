"""ANT (Go et al. 2023): interval clustering of denoising tasks and gradient task affinity."""

from ant_ray.ant.affinity import (
    affinity_heatmap,
    average_affinity,
    bucket_bounds,
    expand_bucket_affinity,
    flat_gradient,
    task_affinity,
)
from ant_ray.ant.clustering import (
    IntervalClustering,
    cluster_of_timestep,
    default_size_bounds,
    interval_clustering,
    solve_interval_clustering,
)
from ant_ray.ant.clustering_costs import CLUSTERING_COSTS, IntervalCost

__all__ = [
    "CLUSTERING_COSTS",
    "IntervalClustering",
    "IntervalCost",
    "affinity_heatmap",
    "average_affinity",
    "bucket_bounds",
    "cluster_of_timestep",
    "default_size_bounds",
    "expand_bucket_affinity",
    "flat_gradient",
    "interval_clustering",
    "solve_interval_clustering",
    "task_affinity",
]
