"""DeMe's coarse-then-fine merge grid against successive halving + TPE on the same task vectors: is the search's
winner as good as the grid's best, and for what share of the grid's images and time?

    .venv/bin/python -m benchmarks.bench_merge_search [--out /tmp/bench_merge] [--top 1000] [--seeds 5] \\
        [--set key=value ...]

1. Pretrains the digits model (cached) and finetunes 2 DeMe specialists once (`search_spaces/deme_merge.yaml`);
   their task vectors are the problem.
2. The grid (DeMe Sec. 8): the 4 anchors, coarse step 0.2 over [0, 1.2]^2, then step 0.05 within one coarse step
   of the best, every candidate at the top fidelity, as the paper scores every grid point at FID-5K.
3. Successive halving: 16 candidates at top/4 samples (the 4 anchors first, then seeded TPE), the best third at
   top/2, the best third of those at top.
   Both plans are `search.merge` sections of that config, validated on load like a search's (fidelities in whole
   fid.batch_size batches, the grid within its budget) and turned into plans by `MergePlan.from_settings`, as the
   search does: a plan the search would reject fails here before anything runs.
4. The paired comparison: the grid's best and successive halving's winner are re-scored at the top fidelity on the
   same K >= 5 sampling seeds (not the searches' own): the mean per-seed difference (SH - grid) with its standard
   error; the winner's rank among the grid's candidates at the top fidelity (all scored on the searches' common
   sample stream); and the ratios of images generated and of wall time.
Prints figures; asserts nothing (timings depend on the machine).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import ray

from ant_ray.config import PipelineConfig, load_config
from ant_ray.config.search import merge_grid_size
from ant_ray.diffusion import load_model, model_denoiser
from ant_ray.evaluation import FIDScorer
from ant_ray.merge import TaskVectorMerger, load_task_vector
from ant_ray.search.merge_stage import MergePlan, run_merge_stage
from ant_ray.search.tune_runs import StageSetup
from ant_ray.stages.deme_finetune import finetune_specialists
from ant_ray.stages.pretrain import pretrained_model
from ant_ray.stages.ray_runtime import start_ray
from ant_ray.tracking import TrackedRun, setup_experiment

CONFIG = "search_spaces/deme_merge.yaml"
GRID, HALVING = "grid (coarse 0.2, fine 0.05)", "successive halving + TPE"


def bench_configs(out: str, top: int, extra: list[str]) -> dict[str, PipelineConfig]:
    """The two arms as validated configs. The batch divides top/4 and top/2 for the usual tops (500: 125, 1000:
    250), so that successive halving's samples continue from rung to rung; ``extra`` overrides come last."""
    common = [f"output_dir={out}", f"fid.batch_size={min(250, max(1, top // 4))}", "merge_search.weight_low=0",
              "merge_search.weight_high=1.2", "merge_search.grid_step=0.2", "merge_search.grid_fine_step=0.05",
              "search.merge.max_concurrent=2", "search.merge.resources={cpu: 1}"]
    halving = load_config(CONFIG, common + [f"search.merge.fidelities=[{top // 4}, {top // 2}, {top}]",
                                            "search.merge.num_candidates=16", "search.merge.reduction_factor=3",
                                            "search.merge.searcher={name: tpe, seed: 0}"] + extra)
    # the grid's budget is its own size bound: the whole grid, as DeMe scores it
    budget = merge_grid_size(halving.finetune.num_specialists, 1, halving.merge_search).total
    grid = load_config(CONFIG, common + [f"search.merge.fidelities=[{top}]", f"search.merge.num_candidates={budget}",
                                         "search.merge.searcher={name: grid}"] + extra)
    return {GRID: grid, HALVING: halving}


def merged_fids(cfg, base: Path, task_vectors: list[Path], weights: list[float], num_samples: int,
                seeds: list[int]) -> list[float]:
    scorer = FIDScorer(cfg, cfg.output_path() / "cache" / "fid")
    model = load_model(base).eval()
    merger = TaskVectorMerger.from_task_vectors(model.state_dict(), [load_task_vector(p)[0] for p in task_vectors])
    model.load_state_dict(merger.merge(weights))
    return [scorer.score(model_denoiser(model), num_samples, seed) for seed in seeds]


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and standard error of the per-seed differences a - b."""
    diffs = [x - y for x, y in zip(a, b)]
    return statistics.mean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))


def rank_within(score: float, scores: list[float]) -> int:
    """1 + how many of ``scores`` are strictly better (lower) than ``score``."""
    return 1 + sum(s < score for s in scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/bench_merge_search")
    parser.add_argument("--top", type=int, default=1000, help="the top fidelity (samples per FID)")
    parser.add_argument("--seeds", type=int, default=5, help="sampling seeds of the paired re-scores (K >= 5)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for both arms, e.g. pretrain.steps=300 for a quick run")
    args = parser.parse_args()
    if args.seeds < 5:
        parser.error("--seeds must be at least 5: the paired standard error needs them")
    top, seeds = args.top, list(range(100, 100 + args.seeds))
    configs = bench_configs(args.out, top, args.set)  # a plan the search would reject fails here, before any work
    cfg = configs[HALVING]
    out = cfg.output_path()
    uri = f"sqlite:///{out / 'mlflow.db'}"
    experiment = setup_experiment(uri, "bench-merge-search", out / "mlartifacts")
    print(start_ray(None, num_cpus=4))
    started = time.time()
    base, _ = pretrained_model(cfg, run_dir=out / "problem", tracking=None)
    problem = finetune_specialists(cfg, base_model=base, ranges=[(0, 500), (500, 1000)], run_dir=out / "problem",
                                   name="bench-specialists", trackings=[None, None])
    tvs = problem.task_vectors
    print(f"problem ready in {time.time() - started:.0f} s: {[str(p) for p in tvs]}")

    arms = {}
    for name, arm_cfg in configs.items():
        plan = MergePlan.from_settings(arm_cfg.search.merge)
        run = TrackedRun.start(uri, experiment, name)
        setup = StageSetup(cfg=arm_cfg, search_dir=out / name.split()[0], tracking_uri=uri, experiment_id=experiment,
                           stage_run=run, study_name=f"bench-{name.split()[0]}-{int(started)}", resume=False)
        tick = time.time()
        outcome = run_merge_stage(setup, base_model=base, task_vectors=tvs, plan=plan, merge=arm_cfg.merge_search)
        seconds = time.time() - tick
        trials = outcome.trials()
        weights = [float(w) for w in outcome.winner["weights"]]
        rescored = merged_fids(cfg, base, tvs, weights, top, seeds)
        arms[name] = {"outcome": outcome, "trials": trials, "seconds": seconds, "weights": weights,
                      "rescored": rescored}

    grid, sh = arms[GRID], arms[HALVING]
    print(f"\n| searcher | candidates scored | images generated | minutes | winner (w0, w1) | its FID@{top} in the "
          f"search | re-scored FID@{top}, mean ± std over {len(seeds)} seeds |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, arm in arms.items():
        o = arm["outcome"]
        print(f"| {name} | {len(arm['trials'])} | {o.images_generated:,} | {arm['seconds'] / 60:.1f} | "
              f"({arm['weights'][0]:.3f}, {arm['weights'][1]:.3f}) | {o.best_score:.3f} | "
              f"{statistics.mean(arm['rescored']):.3f} ± {statistics.stdev(arm['rescored']):.3f} |")

    print("\n| sampling seed | grid's best | SH's winner | SH - grid |\n| --- | --- | --- | --- |")
    for seed, g, s in zip(seeds, grid["rescored"], sh["rescored"]):
        print(f"| {seed} | {g:.3f} | {s:.3f} | {s - g:+.3f} |")
    mean, se = paired(sh["rescored"], grid["rescored"])
    same = " (the same weights: the difference is 0 by construction)" if sh["weights"] == grid["weights"] else ""
    print(f"\npaired difference, SH's winner - grid's best, at FID@{top} over {len(seeds)} seeds: {mean:+.3f} ± "
          f"{se:.3f} (standard error){same}")
    grid_top = grid["trials"][grid["trials"]["samples"] == top]["fid"].tolist()
    sh_rank = rank_within(sh["outcome"].best_score, grid_top)
    print(f"SH's winner ranks {sh_rank} of the grid's {len(grid_top)} candidates at FID@{top} "
          f"(its {sh['outcome'].best_score:.3f} on the searches' common sample stream; the grid's best "
          f"{min(grid_top):.3f})")
    g_images, s_images = grid["outcome"].images_generated, sh["outcome"].images_generated
    print(f"SH generated {s_images / g_images:.1%} of the grid's images ({s_images:,} vs {g_images:,}) in "
          f"{sh['seconds'] / grid['seconds']:.1%} of its wall time ({sh['seconds']:.0f} s vs {grid['seconds']:.0f} s; "
          f"{grid['seconds'] / sh['seconds']:.1f}x less)")
    ray.shutdown()


if __name__ == "__main__":
    main()
