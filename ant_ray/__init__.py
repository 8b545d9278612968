"""ant_ray: diffusion models trained as multi-task learners (ANT clustered MTL, DeMe decouple-then-merge), searched
with Ray Tune + Optuna by FID and tracked in MLflow.

The public Python API; heavy modules (torch, Ray, MLflow) load only when their functions are used.
"""

from ant_ray.config import ConfigError, PipelineConfig, load_config

__version__ = "0.1.0"  # equal to pyproject.toml's (tests/test_deploy_files.py)


def launch_search(config_or_path=None, overrides=None, resume=None):
    """Run the search a config's ``search:`` section describes and return a ``SearchResult``: per stage the best
    values and score (``.best``, ``.scores``), the final winner's FID with its 95% interval (``.final``), the
    winner's diffusers folder (``.winner_model``), the MLflow run ids (``.parent_run_id``, ``.stage_run_ids``) and a
    pandas DataFrame of every trial (``.trials``: one row per trial of every stage, with the columns stage,
    trial_id, fate, metric, score, step or fidelity, then the searched values).

    ``resume``: the folder of a search to continue (``<output_dir>/searches/<name>-<date>-<id>``, as the search
    printed). Pass it alone, ``launch_search(resume=folder)``: the search's own config.yaml is read from the
    folder. A config given with it must be the one the search used (overrides may change only where Ray runs).

    Example (about 8 minutes on 2 CPU cores)::

        import ant_ray

        result = ant_ray.launch_search("search_spaces/quickstart.yaml", ["output_dir=/tmp/ant_ray_runs"])
        print(result.table())
        print(result.best["ant"], result.scores["merge"], result.winner_model)
        print(result.trials[["stage", "fate"]].value_counts())
        again = ant_ray.launch_search(resume=result.search_dir)  # a finished search: its saved result
    """
    from pathlib import Path

    if isinstance(overrides, str):  # one "key=value", not its characters
        overrides = [overrides]
    if config_or_path is None:
        if resume is None:
            raise ConfigError("launch_search needs a config (a YAML path or a PipelineConfig), or resume=<the folder "
                              "of a search to continue>")
        folder = Path(resume).expanduser()
        if not (folder / "config.yaml").is_file():
            raise ConfigError(f"resume={str(resume)!r} is not a search folder (it has no config.yaml); pass the folder "
                              "the search printed, <output_dir>/searches/<name>-<date>-<id>")
        config_or_path = folder / "config.yaml"  # the search's own configuration

    from ant_ray.search.chain import run_search
    from ant_ray.stages.ray_logs import quiet_driver_logs

    quiet_driver_logs()  # the terminal shows what `ant-ray search` shows; ANT_RAY_VERBOSE=1 shows everything

    if isinstance(config_or_path, PipelineConfig):
        from ant_ray.config import config_from_dict

        cfg = config_from_dict(config_or_path.model_dump(mode="json"), overrides) if overrides else config_or_path
    else:
        cfg = load_config(config_or_path, list(overrides or []))
    return run_search(cfg, resume=Path(resume) if resume is not None else None)


def merge_task_vectors(base_state_dict, finetuned_state_dicts, weights, **options):
    """base + sum_i w_i (finetuned_i - base) (DeMe Eq. 8), in memory. See ant_ray.merge for TIES and layer groups."""
    from ant_ray.merge import merge_task_vectors as merge

    return merge(base_state_dict, finetuned_state_dicts, weights, **options)


def interval_clustering(k, cost="timestep", **options):
    """k contiguous half-open timestep intervals minimising the ANT clustering cost (exact DP)."""
    from ant_ray.ant.clustering import interval_clustering as cluster

    return cluster(k, cost, **options)


def run_pipeline(config):
    """Run the fixed pipeline (pretrain -> DeMe specialists -> merge-weight search) for a PipelineConfig."""
    from ant_ray.experiments.pipeline import run_pipeline as run
    from ant_ray.stages.ray_logs import quiet_driver_logs

    quiet_driver_logs()
    return run(config)


__all__ = ["ConfigError", "PipelineConfig", "load_config", "launch_search", "merge_task_vectors",
           "interval_clustering", "run_pipeline"]
