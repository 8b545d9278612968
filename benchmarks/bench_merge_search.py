"""DeMe's coarse-then-fine grid against multi-fidelity Optuna (successive halving, anchors first) on the same task
vectors: the images each generates to come within FID noise of the grid's best.

    .venv/bin/python -m benchmarks.bench_merge_search [--out /tmp/bench_merge] [--top 1000] [--seeds 5]

1. Pretrains the digits model (cached) and finetunes 2 DeMe specialists once; their task vectors are the problem.
2. FID noise: one model (task arithmetic) scored at the top fidelity with --seeds sampling seeds; "within noise"
   means within 2 standard deviations of that spread.
3. The grid (DeMe Sec. 8): coarse step 0.2 over [0, 1.2]^2, then step 0.05 within one coarse step of the best,
   every candidate at the top fidelity, as the paper scores every grid point at FID-5K.
4. Successive halving: 16 candidates at top/4 samples (the 4 anchors first, then seeded TPE), the best third at
   top/2, the best third of those at top.
Both winners are then re-scored at the top fidelity with the same --seeds seeds, so they are compared at one
fidelity. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import ray

from ant_ray.config import SearcherConfig, load_config
from ant_ray.diffusion import load_model
from ant_ray.evaluation import FIDScorer
from ant_ray.merge import TaskVectorMerger, load_task_vector
from ant_ray.search.merge_stage import MergePlan, run_merge_stage
from ant_ray.search.tune_runs import StageSetup
from ant_ray.stages.deme_finetune import finetune_specialists
from ant_ray.stages.pretrain import pretrained_model
from ant_ray.stages.ray_runtime import start_ray
from ant_ray.tracking import TrackedRun, setup_experiment


def merged_fids(cfg, base: Path, task_vectors: list[Path], weights: list[float], num_samples: int,
                seeds: list[int]) -> list[float]:
    scorer = FIDScorer(cfg, cfg.output_path() / "cache" / "fid")
    model = load_model(base).eval()
    merger = TaskVectorMerger.from_task_vectors(model.state_dict(), [load_task_vector(p)[0] for p in task_vectors])
    model.load_state_dict(merger.merge(weights))
    from ant_ray.diffusion import model_denoiser

    return [scorer.score(model_denoiser(model), num_samples, seed) for seed in seeds]


def images_to_best(trials, top: int) -> tuple[int, float, list[float]]:
    """Images generated, in launch order, until the best top-fidelity candidate had been scored."""
    top_rows = trials[trials["samples"] == top]
    best_index = int(top_rows["fid"].idxmin())
    return int(trials.loc[:best_index, "images"].sum()), float(top_rows["fid"].min()), \
        [float(top_rows.loc[best_index, c]) for c in ("w0", "w1")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/bench_merge_search")
    parser.add_argument("--top", type=int, default=1000, help="the top fidelity (samples per FID)")
    parser.add_argument("--seeds", type=int, default=5, help="sampling seeds for the noise and the re-scores")
    args = parser.parse_args()
    top, seeds = args.top, list(range(100, 100 + args.seeds))
    cfg = load_config("search_spaces/deme_merge.yaml", [f"output_dir={args.out}", "fid.batch_size=250",
                                                         "merge_search.weight_low=0", "merge_search.weight_high=1.2",
                                                         "merge_search.grid_step=0.2",
                                                         "merge_search.grid_fine_step=0.05"])
    out = cfg.output_path()
    uri = f"sqlite:///{out / 'mlflow.db'}"
    experiment = setup_experiment(uri, "bench-merge-search", out / "mlartifacts")
    print(start_ray(None, num_cpus=4))
    started = time.time()
    base, _ = pretrained_model(cfg, run_dir=out / "problem", tracking=None)
    problem = finetune_specialists(cfg, base_model=base, ranges=[(0, 500), (500, 1000)], run_dir=out / "problem",
                                   name="bench-specialists", trackings=[None, None])
    print(f"problem ready in {time.time() - started:.0f} s: {[str(p) for p in problem.task_vectors]}")

    noise = merged_fids(cfg, base, problem.task_vectors, [1.0, 1.0], top, seeds)
    sigma = statistics.stdev(noise)
    print(f"FID noise at {top} samples (task arithmetic, {len(seeds)} seeds): mean {statistics.mean(noise):.3f}, "
          f"std {sigma:.3f}")

    outcomes = {}
    plans = {
        "grid (coarse 0.2, fine 0.05)": MergePlan(fidelities=[top], num_candidates=1, reduction_factor=3,
                                                  searcher=SearcherConfig(name="grid"), max_concurrent=2, cpu=1,
                                                  gpu=0),
        "successive halving + TPE": MergePlan(fidelities=[top // 4, top // 2, top], num_candidates=16,
                                              reduction_factor=3, searcher=SearcherConfig(name="tpe", seed=0),
                                              max_concurrent=2, cpu=1, gpu=0),
    }
    for name, plan in plans.items():
        run = TrackedRun.start(uri, experiment, name)
        setup = StageSetup(cfg=cfg, search_dir=out / name.split()[0], tracking_uri=uri, experiment_id=experiment,
                           stage_run=run, study_name=f"bench-{name.split()[0]}-{int(started)}", resume=False)
        tick = time.time()
        outcome = run_merge_stage(setup, base_model=base, task_vectors=problem.task_vectors, plan=plan,
                                  merge=cfg.merge_search)
        trials = outcome.trials()
        to_best, best_fid, best_weights = images_to_best(trials, top)
        rescored = merged_fids(cfg, base, problem.task_vectors, best_weights, top, seeds)
        outcomes[name] = (outcome.images_generated, to_best, best_fid, best_weights, rescored, time.time() - tick,
                          len(trials))

    grid_mean = statistics.mean(outcomes["grid (coarse 0.2, fine 0.05)"][4])
    print(f"\n| searcher | candidates scored | images generated | images to its best | best FID@{top} (search) | "
          f"winner (w0, w1) | re-scored FID@{top}, {len(seeds)} seeds | vs grid's best | minutes |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, (images, to_best, best_fid, weights, rescored, seconds, count) in outcomes.items():
        gap = statistics.mean(rescored) - grid_mean
        print(f"| {name} | {count} | {images:,} | {to_best:,} | {best_fid:.3f} | ({weights[0]:.3f}, {weights[1]:.3f}) "
              f"| {statistics.mean(rescored):.3f} ± {statistics.stdev(rescored):.3f} | {gap:+.3f} "
              f"({'within' if abs(gap) <= 2 * sigma else 'outside'} 2 sigma = {2 * sigma:.3f}) | {seconds / 60:.1f} |")
    grid_images = outcomes["grid (coarse 0.2, fine 0.05)"][0]
    sh_images = outcomes["successive halving + TPE"][0]
    print(f"\nsuccessive halving generated {sh_images / grid_images:.1%} of the grid's images "
          f"({sh_images:,} vs {grid_images:,}).")
    ray.shutdown()


if __name__ == "__main__":
    main()
