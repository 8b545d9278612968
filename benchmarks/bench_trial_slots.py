"""How busy a merge search keeps its trial slots: sum of trial durations / (search wall time x concurrent trials),
with Tune's actor reuse (trial processes kept, the scorer, model and merger cached per process) against a fresh
process per trial. The two are run alternately (A, B, A, B, ...) on the same task vectors.

    .venv/bin/python -m benchmarks.bench_trial_slots [--out /tmp/bench_slots] [--candidates 8] [--repeats 2]

Uses the task vectors benchmarks/bench_merge_search.py writes under its --out folder (run it first, or pass the
same --problem folder). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import ray

from ant_ray.config import SearcherConfig, load_config
from ant_ray.search.merge_stage import MergePlan, run_merge_stage
from ant_ray.search.tune_runs import StageSetup
from ant_ray.stages.pretrain import cached_pretrained_path
from ant_ray.stages.ray_runtime import start_ray
from ant_ray.tracking import TrackedRun, setup_experiment


def trial_seconds(stage_dir: Path) -> list[float]:
    """Each trial's own running time, from Tune's experiment state (time_total_s of its last result)."""
    from ray import tune

    results = tune.ResultGrid(tune.ExperimentAnalysis(str(stage_dir / "merge" / "tune" / "rung0")))
    return [float(r.metrics["time_total_s"]) for r in results if r.metrics]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", default="/tmp/bench_merge_search", help="bench_merge_search's --out")
    parser.add_argument("--out", default="/tmp/bench_slots")
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    problem = Path(args.problem)
    cfg = load_config("search_spaces/deme_merge.yaml", [f"output_dir={args.problem}", "fid.batch_size=250"])
    base = cached_pretrained_path(cfg)
    task_vectors = sorted((problem / "problem" / "task_vectors").glob("*.safetensors"))
    assert task_vectors, f"no task vectors under {problem}; run benchmarks.bench_merge_search first"
    out = Path(args.out)
    uri = f"sqlite:///{out / 'mlflow.db'}"
    out.mkdir(parents=True, exist_ok=True)
    experiment = setup_experiment(uri, "bench-trial-slots", out / "mlartifacts")
    print(start_ray(None, num_cpus=4))
    utilisation: dict[str, list[float]] = {"reused trial processes": [], "a fresh process per trial": []}
    walls: dict[str, list[float]] = {name: [] for name in utilisation}
    for repeat in range(args.repeats):
        for name, reuse in (("reused trial processes", True), ("a fresh process per trial", False)):
            plan = MergePlan(fidelities=[1000], num_candidates=args.candidates, reduction_factor=3,
                             searcher=SearcherConfig(name="tpe", seed=repeat), max_concurrent=2, cpu=1, gpu=0,
                             reuse_actors=reuse)
            stage_dir = out / f"{'reuse' if reuse else 'fresh'}-{repeat}-{int(time.time())}"
            setup = StageSetup(cfg=cfg, search_dir=stage_dir, tracking_uri=uri, experiment_id=experiment,
                               stage_run=TrackedRun.start(uri, experiment, stage_dir.name),
                               study_name=stage_dir.name, resume=False)
            start = time.perf_counter()
            run_merge_stage(setup, base_model=base, task_vectors=task_vectors, plan=plan, merge=cfg.merge_search)
            wall = time.perf_counter() - start
            busy = sum(trial_seconds(stage_dir))
            utilisation[name].append(busy / (wall * plan.max_concurrent))
            walls[name].append(wall)
            print(f"{name}: {wall:.1f} s for {args.candidates} candidates, slots busy {utilisation[name][-1]:.0%}")
    print("\n| trial processes | search wall time (median s) | trial slots busy (median) |\n| --- | --- | --- |")
    for name in utilisation:
        print(f"| {name} | {statistics.median(walls[name]):.1f} | {statistics.median(utilisation[name]):.0%} |")
    ray.shutdown()


if __name__ == "__main__":
    main()
