"""FID noise: the spread of one model's FID over sampling seeds, at each sample count a search uses, so that a gap
smaller than the noise is never called a win (issue: "a searcher can only be as good as its metric").

    .venv/bin/python -m benchmarks.bench_fid_noise [--problem /tmp/bench_merge_search] [--seeds 8]
                                                   [--counts 250,500,1000,2000]

The model is the task-arithmetic merge of benchmarks/bench_merge_search.py's two specialists (run it first).
Prints, per sample count, the mean, standard deviation and range of fid<n>_domain over the seeds.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from ant_ray.config import load_config
from ant_ray.diffusion import load_model, model_denoiser
from ant_ray.evaluation import FIDScorer, metric_name
from ant_ray.merge import TaskVectorMerger, load_task_vector
from ant_ray.stages.pretrain import cached_pretrained_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", default="/tmp/bench_merge_search")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--counts", default="250,500,1000,2000")
    args = parser.parse_args()
    cfg = load_config("search_spaces/deme_merge.yaml", [f"output_dir={args.problem}", "fid.batch_size=250"])
    task_vectors = sorted((Path(args.problem) / "problem" / "task_vectors").glob("*.safetensors"))
    assert task_vectors, f"no task vectors under {args.problem}; run benchmarks.bench_merge_search first"
    model = load_model(cached_pretrained_path(cfg)).eval()
    merger = TaskVectorMerger.from_task_vectors(model.state_dict(), [load_task_vector(p)[0] for p in task_vectors])
    model.load_state_dict(merger.merge([1.0] * len(task_vectors)))
    scorer = FIDScorer(cfg, cfg.output_path() / "cache" / "fid")
    print("\n| metric | seeds | mean | std | min - max |\n| --- | --- | --- | --- | --- |")
    for count in (int(c) for c in args.counts.split(",")):
        values = [scorer.score(model_denoiser(model), count, seed) for seed in range(1000, 1000 + args.seeds)]
        print(f"| {metric_name(cfg, count)} | {args.seeds} | {statistics.mean(values):.3f} | "
              f"{statistics.stdev(values):.3f} | {min(values):.3f} - {max(values):.3f} |", flush=True)


if __name__ == "__main__":
    main()
