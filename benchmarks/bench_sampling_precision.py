"""Does reduced-precision sampling keep the ranking of merge candidates? The same candidates (the anchors and random
weight vectors over the task vectors of benchmarks/bench_merge_search.py) are scored at fp32 and at bf16
(sampler.precision), alternately, and compared: Spearman's rank correlation of their FIDs, the FID shift, and the
speed ratio (median of per-candidate ratios with its interquartile range).

    .venv/bin/python -m benchmarks.bench_sampling_precision [--problem /tmp/bench_merge_search] [--candidates 16]
                                                            [--samples 1000] [--precision bf16]

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from ant_ray.config import load_config
from ant_ray.diffusion import load_model, model_denoiser
from ant_ray.evaluation import FIDScorer
from ant_ray.merge import TaskVectorMerger, anchor_weights, load_task_vector, random_weights
from ant_ray.stages.pretrain import cached_pretrained_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", default="/tmp/bench_merge_search", help="bench_merge_search's --out")
    parser.add_argument("--candidates", type=int, default=16)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16"])
    args = parser.parse_args()
    overrides = [f"output_dir={args.problem}", "fid.batch_size=250"]
    cfg = load_config("search_spaces/deme_merge.yaml", overrides)
    low = load_config("search_spaces/deme_merge.yaml", overrides + [f"sampler.precision={args.precision}"])
    task_vectors = sorted((Path(args.problem) / "problem" / "task_vectors").glob("*.safetensors"))
    assert task_vectors, f"no task vectors under {args.problem}; run benchmarks.bench_merge_search first"
    scorers = {"fp32": FIDScorer(cfg, cfg.output_path() / "cache" / "fid"),
               args.precision: FIDScorer(low, cfg.output_path() / "cache" / "fid")}
    model = load_model(cached_pretrained_path(cfg)).eval()
    merger = TaskVectorMerger.from_task_vectors(model.state_dict(), [load_task_vector(p)[0] for p in task_vectors])
    n = len(task_vectors)
    candidates = anchor_weights(n, 0.0, 1.2) + random_weights(n, args.candidates - len(anchor_weights(n, 0, 1.2)),
                                                              0.0, 1.2, seed=0)
    fids = {name: [] for name in scorers}
    seconds = {name: [] for name in scorers}
    for index, weights in enumerate(candidates):
        model.load_state_dict(merger.merge(weights))
        order = list(scorers) if index % 2 == 0 else list(reversed(scorers))  # alternate which goes first
        for name in order:
            start = time.perf_counter()
            fids[name].append(scorers[name].score(model_denoiser(model), args.samples))
            seconds[name].append(time.perf_counter() - start)
        print(f"candidate {index}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in fids.items()), flush=True)
    rho = spearmanr(fids["fp32"], fids[args.precision]).statistic
    shift = np.asarray(fids[args.precision]) - np.asarray(fids["fp32"])
    ratios = np.asarray(seconds[args.precision]) / np.asarray(seconds["fp32"])
    q1, median, q3 = np.percentile(ratios, [25, 50, 75])
    print(f"\n| {len(candidates)} merge candidates, FID at {args.samples} samples | figure |\n| --- | --- |")
    print(f"| Spearman rank correlation, fp32 vs {args.precision} | {rho:.3f} |")
    print(f"| FID shift {args.precision} - fp32, mean (min, max) | {shift.mean():+.3f} ({shift.min():+.3f}, "
          f"{shift.max():+.3f}) |")
    print(f"| time {args.precision} / fp32, median (IQR) | {median:.2f} ({q1:.2f}-{q3:.2f}) |")
    print(f"| fp32 seconds per candidate, median | {statistics.median(seconds['fp32']):.1f} |")


if __name__ == "__main__":
    main()
