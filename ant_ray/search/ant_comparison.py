"""ANT's comparison at small scale (ANT Table 1): vanilla training vs ANT with each MTL method and each interval
clustering, over several seeds, at equal iterations.

Vanilla is the same loop with one cluster and linear scalarisation (k=1, LS: the plain mean loss), so every arm
shares data order, noise, model and optimizer settings and differs only in the clustered-MTL part. Results: one
MLflow parent run with a child per (arm, seed), and a Markdown table of mean and standard deviation.
"""

from __future__ import annotations

from pathlib import Path

from ant_ray.config import PipelineConfig
from ant_ray.search.ant_runs import run_ant
from ant_ray.search.comparison_table import ComparisonResult, start_comparison_run


def comparison_arms(cfg: PipelineConfig) -> dict[str, dict]:
    """arm name -> ant-section updates, from cfg.comparison (methods x clusterings, plus vanilla)."""
    arms = {"vanilla": {"k": 1, "method": "ls", "clustering": "timestep", "min_size": None, "max_size": None}}
    for method in cfg.comparison.ant_methods:
        for clustering in cfg.comparison.ant_clusterings:
            arms[f"ANT-{method} ({clustering})"] = {"method": method, "clustering": clustering}
    return arms


def run_ant_comparison(cfg: PipelineConfig, seeds: list[int], *, report: Path | None = None) -> ComparisonResult:
    parent, _ = start_comparison_run(cfg, seeds, "ant_comparison")
    arms = comparison_arms(cfg)
    result: ComparisonResult | None = None
    try:
        for seed in seeds:
            for arm, updates in arms.items():
                arm_cfg = cfg.model_copy(update={"seed": seed, "ant": cfg.ant.model_copy(update=updates)})
                outcome = run_ant(arm_cfg, parent_run_id=parent.run_id)
                if result is None:
                    result = ComparisonResult(metric=outcome.metric, seeds=seeds)
                result.scores.setdefault(arm, []).append(float(outcome.fid))
                print(f"[ant_ray] seed {seed} {arm}: {outcome.metric} {outcome.fid:.3f}", flush=True)
        assert result is not None
        result.publish(parent, f"{cfg.name}: ANT comparison", report)
        parent.finish()
        return result
    except BaseException:
        parent.finish("FAILED")
        raise
