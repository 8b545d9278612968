"""ant_ray: diffusion models trained as multi-task learners (ANT clustered MTL, DeMe decouple-then-merge), searched
with Ray Tune + Optuna by FID and tracked in MLflow.

The public Python API; heavy modules (Ray, MLflow) load only when their functions are used.
"""

from ant_ray.config import ConfigError, PipelineConfig, load_config

__version__ = "0.1.0"


def merge_task_vectors(base_state_dict, finetuned_state_dicts, weights, **options):
    """base + sum_i w_i (finetuned_i - base) (DeMe Eq. 8), in memory. See ant_ray.merge for TIES and layer groups."""
    from ant_ray.merge import merge_task_vectors as merge

    return merge(base_state_dict, finetuned_state_dicts, weights, **options)


def interval_clustering(k, cost="timestep", **options):
    """k contiguous half-open timestep intervals minimising the ANT clustering cost (exact DP)."""
    from ant_ray.ant.clustering import interval_clustering as cluster

    return cluster(k, cost, **options)


def run_pipeline(config):
    """Run pretrain -> DeMe specialists -> merge-weight search for a PipelineConfig (see load_config)."""
    from ant_ray.experiments.pipeline import run_pipeline as run

    return run(config)


__all__ = ["ConfigError", "PipelineConfig", "load_config", "merge_task_vectors", "interval_clustering",
           "run_pipeline"]
