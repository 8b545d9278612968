"""ANT's comparison at small scale (ANT Table 1): vanilla training vs ANT with each MTL method and each interval
clustering, over several seeds, at equal iterations.

Vanilla is the same loop with one cluster and linear scalarisation (k=1, LS: the plain mean loss), so every arm
shares data order, noise, model and optimizer settings and differs only in the clustered-MTL part. Results: one
MLflow parent run with a child per (arm, seed), and a Markdown table of mean and standard deviation.
"""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import ray

from ant_ray.config import PipelineConfig
from ant_ray.stages.ant_train import run_ant
from ant_ray.experiments.comparison_table import ComparisonResult, start_comparison_run
from ant_ray.stages.ray_runtime import start_ray
from ant_ray.tracking import worker_env


def comparison_arms(cfg: PipelineConfig) -> dict[str, dict]:
    """arm name -> ant-section updates, from cfg.comparison (methods x clusterings, plus vanilla)."""
    arms = {"vanilla": {"k": 1, "method": "ls", "clustering": "timestep", "min_size": None, "max_size": None}}
    for method in cfg.comparison.ant_methods:
        for clustering in cfg.comparison.ant_clusterings:
            arms[f"ANT-{method} ({clustering})"] = {"method": method, "clustering": clustering}
    return arms


def run_ant_comparison(cfg: PipelineConfig, seeds: list[int], *, report: Path | None = None) -> ComparisonResult:
    """Every (seed, arm) run, ``comparison.max_concurrent`` at a time. Each run is an independent ``run_ant`` (its
    own Ray Train run, run directory and MLflow child run), so runs go concurrently from driver threads; Ray's
    resource accounting (``ant.resources`` per worker) decides what actually runs at once."""
    parent, _ = start_comparison_run(cfg, seeds, "ant_comparison")
    arms = comparison_arms(cfg)
    jobs = [(seed, arm, cfg.model_copy(update={"seed": seed, "ant": cfg.ant.model_copy(update=updates)}))
            for seed in seeds for arm, updates in arms.items()]
    scores: dict[tuple[str, int], float] = {}
    metric = ""
    pool = ThreadPoolExecutor(max_workers=cfg.comparison.max_concurrent, thread_name_prefix="ant-arm")
    try:
        # Started once here: concurrent runs must not race to start it.
        start_ray(cfg.ray.address, num_cpus=cfg.ray.num_cpus, env=worker_env())
        queue, running = list(jobs), {}
        while queue or running:
            # Submit only up to max_concurrent, so that after a failure no further run starts.
            while queue and len(running) < cfg.comparison.max_concurrent:
                seed, arm, arm_cfg = queue.pop(0)
                running[pool.submit(run_ant, arm_cfg, parent_run_id=parent.run_id)] = (seed, arm)
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                seed, arm = running.pop(future)
                outcome = future.result()  # the first failure stops the comparison (finished runs stay in MLflow)
                metric, scores[arm, seed] = outcome.metric, float(outcome.fid)
                print(f"[ant_ray] ({len(scores)}/{len(jobs)}) seed {seed} {arm}: {outcome.metric} "
                      f"{outcome.fid:.3f}", flush=True)
        result = ComparisonResult(metric=metric, seeds=seeds,
                                  scores={arm: [scores[arm, seed] for seed in seeds] for arm in arms})
        result.publish(parent, f"{cfg.name}: ANT comparison", report)
        parent.finish()
        pool.shutdown()
        return result
    except BaseException:
        # No further run starts. Running ones end when Ray goes (each marks its own MLflow run FAILED): shut it
        # down here, since Python joins the pool's threads at exit, before Ray's own exit hook would run.
        pool.shutdown(wait=False, cancel_futures=True)
        parent.finish("FAILED")
        ray.shutdown()
        raise
