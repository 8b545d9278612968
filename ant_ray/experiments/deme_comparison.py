"""DeMe's comparison at small scale (DeMe Table 1): pretrained vs plain finetune vs each loss-weighting baseline vs
DeMe ensemble vs DeMe merged, over several finetuning seeds, at equal total finetuning iterations.

Every arm starts from the same pretrained model (trained once, cached) and is scored with the same FID settings
and sampling seed. The plain and loss-weighting finetunes train one model on all of [0, T) for N x steps
iterations, the iterations DeMe spends on its N specialists. Results: one MLflow parent run with a child per
(arm, seed), and a Markdown table (mean and standard deviation).
"""

from __future__ import annotations

from pathlib import Path

import ray

from ant_ray.config import PipelineConfig
from ant_ray.experiments.comparison_table import ComparisonResult, slug, start_comparison_run
from ant_ray.experiments.pipeline import run_pipeline
from ant_ray.stages.evaluate import score_in_parallel
from ant_ray.stages.ray_runtime import start_ray
from ant_ray.stages.deme_finetune import finetune_plain
from ant_ray.stages.pretrain import cached_pretrained_path
from ant_ray.tracking import TrackedRun, worker_env

# name -> (weighting, options): the baselines of DeMe Table 1 (min-SNR from Hang et al.)
BASELINES = {
    "finetune (uniform)": ("uniform", {}),
    "finetune SNR+1": ("snr+1", {}),
    "finetune truncated SNR": ("truncated-snr", {}),
    "finetune min-SNR-5": ("min-snr", {"gamma": 5.0}),
    "finetune P2 (k=1, gamma=1)": ("p2", {"k": 1.0, "gamma": 1.0}),
}
PIPELINE_ARMS = {"pretrained": "pretrained", "DeMe ensemble": "DeMe ensemble (before merge)",
                 "DeMe merged": "DeMe merged (best weights)"}


def run_deme_comparison(cfg: PipelineConfig, seeds: list[int], *, report: Path | None = None) -> ComparisonResult:
    parent, experiment_id = start_comparison_run(cfg, seeds, "deme_comparison")
    uri = cfg.tracking_uri()
    start_ray(cfg.ray.address, num_cpus=cfg.ray.num_cpus, env=worker_env())
    n = cfg.finetune.num_specialists
    total_steps = n * cfg.finetune.steps
    result: ComparisonResult | None = None
    try:
        for seed in seeds:
            seed_cfg = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"seed": seed})})
            deme = run_pipeline(seed_cfg, parent_run_id=parent.run_id)
            if result is None:
                result = ComparisonResult(metric=deme.metric, seeds=seeds)
            for arm, key in PIPELINE_ARMS.items():
                result.scores.setdefault(arm, []).append(deme.scores[key])

            # The baselines: one model on all of [0, T) for N x steps iterations, no consistency loss.
            base = cached_pretrained_path(seed_cfg)
            refs, runs = {}, {}
            for arm, (weighting, options) in BASELINES.items():
                arm_cfg = seed_cfg.model_copy(update={"finetune": seed_cfg.finetune.model_copy(update={
                    "steps": total_steps, "weighting": seed_cfg.finetune.weighting.model_copy(
                        update={"name": weighting, "options": options})})})
                runs[arm] = TrackedRun.start(uri, experiment_id, f"{arm} seed {seed}", parent_run_id=parent.run_id,
                                             tags={"ant_ray.stage": "baseline_finetune"})
                runs[arm].log_params({"weighting": weighting, **options, "steps": total_steps, "seed": seed})
                out = deme.run_dir / "baselines" / slug(arm) / "model"
                refs[arm] = finetune_plain(arm_cfg, base_model=base, out=out, name=f"{slug(arm)}-{deme.run_dir.name}",
                                           tracking=runs[arm].handle())
            folders = dict(zip(refs, ray.get(list(refs.values()))))
            scores = score_in_parallel(seed_cfg, seed_cfg.output_path() / "cache" / "fid",
                                       {arm: ([str(folder)], None) for arm, folder in folders.items()})
            for arm, value in scores.items():
                runs[arm].log_metrics({deme.metric: value})
                runs[arm].finish()
                result.scores.setdefault(arm, []).append(value)
            print(f"[ant_ray] seed {seed} done: " + ", ".join(f"{a}={v[-1]:.2f}" for a, v in result.scores.items()),
                  flush=True)
        assert result is not None
        order = ["pretrained", *BASELINES, "DeMe ensemble", "DeMe merged"]
        result.scores = {arm: result.scores[arm] for arm in order}
        result.publish(parent, f"{cfg.name}: DeMe comparison", report)
        parent.finish()
        return result
    except BaseException:
        parent.finish("FAILED")
        raise

