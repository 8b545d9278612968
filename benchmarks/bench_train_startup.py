"""Ray Train start-up in DeMe's finetune stage at N=4, with the quickstart's finetune settings otherwise. Modes:

- packed: one Ray Train run whose one worker trains the 4 specialists in turn (finetune.specialists_per_worker=4,
  the worker holding the whole machine's 2 CPUs): the quickstart's way;
- groups: one run of 4 worker groups, a specialist each, half a CPU each (the quickstart's way before);
- separate: 4 Ray Train runs started together (the way before that).

    .venv/bin/python -m benchmarks.bench_train_startup [--out /tmp/bench_startup] [--steps 150] [--repeats 2]
        [--modes packed,groups,separate]

Start-up is estimated as the wall time of a 1-step run (all of its cost is starting, loading, saving), and its
share as that over the wall time of a --steps run. The modes alternate (A, B, A, B). Prints figures only.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import ray

from ant_ray.config import load_config
from ant_ray.deme.finetune import train_diffusion
from ant_ray.stages.pretrain import pretrained_model
from ant_ray.stages.ray_runtime import start_ray
from ant_ray.stages.ray_train import fit

N = 4


@ray.remote(num_cpus=0)
def _fit_one(cfg_dump: dict, name: str, storage: str, model: dict) -> None:
    from ant_ray.config import PipelineConfig

    cfg = PipelineConfig.model_validate(cfg_dump)
    fit(train_diffusion, {"pipeline": cfg_dump, "section": "finetune", "name": name, "models": [model],
                          "evaluation": None}, name=name, storage=Path(storage), resources=cfg.finetune.resources)


def specs(base: Path, out: Path) -> list[dict]:
    return [{"range": [i * 250, (i + 1) * 250], "init_model": str(base), "teacher_model": str(base),
             "output_model": str(out / f"specialist_{i}"), "tracking": None, "seed": i, "name": f"s{i}"}
            for i in range(N)]


def one_run(cfg, base: Path, out: Path) -> float:
    start = time.perf_counter()
    fit(train_diffusion, {"pipeline": cfg.worker_dump(), "section": "finetune", "name": out.name,
                          "models": specs(base, out), "models_per_worker": cfg.finetune.specialists_per_worker,
                          "evaluation": None},
        name=out.name, storage=out / "ray", resources=cfg.finetune.resources, models=N)
    return time.perf_counter() - start


def separate_runs(cfg, base: Path, out: Path) -> float:
    start = time.perf_counter()
    ray.get([_fit_one.remote(cfg.worker_dump(), f"{out.name}-{i}", str(out / "ray"), spec)
             for i, spec in enumerate(specs(base, out))])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/bench_startup")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--modes", default="packed,groups")
    args = parser.parse_args()
    out = Path(args.out)
    overrides = [f"output_dir={out}", "finetune.log_every=1000", "finetune.checkpoint_every=1000"]
    print(start_ray(None, num_cpus=4))
    base, _ = pretrained_model(load_config("search_spaces/quickstart.yaml", overrides), run_dir=out / "base",
                               tracking=None)
    one_worker = ["finetune.specialists_per_worker=4", "finetune.resources={cpu: 2, num_workers: 1}"]
    a_group_each = ["finetune.specialists_per_worker=1", "finetune.resources={cpu: 0.5, num_workers: 1}"]
    known = {"packed": ("one run, one worker training the 4 in turn", one_run, one_worker),
             "groups": ("one run, 4 worker groups", one_run, a_group_each),
             "separate": ("4 runs started together", separate_runs, a_group_each)}
    modes = {known[key][0]: known[key][1:] for key in args.modes.split(",")}
    walls: dict[tuple[str, int], list[float]] = {}
    for repeat in range(args.repeats):
        for steps in (1, args.steps):
            for name, (mode, settings) in modes.items():
                cfg = load_config("search_spaces/quickstart.yaml", overrides + settings + [f"finetune.steps={steps}"])
                folder = out / f"{name.split()[0]}-{name.split()[-1]}-{steps}-{repeat}-{int(time.time())}"
                walls.setdefault((name, steps), []).append(mode(cfg, base, folder))
                print(f"{name}, {steps} steps: {walls[name, steps][-1]:.1f} s", flush=True)
    print(f"\n| N=4 specialists, quickstart finetune settings | 1-step run (start-up), median s | {args.steps}-step "
          "run, median s | start-up share |\n| --- | --- | --- | --- |")
    for name in modes:
        startup, full = statistics.median(walls[name, 1]), statistics.median(walls[name, args.steps])
        print(f"| {name} | {startup:.1f} | {full:.1f} | {startup / full:.0%} |")
    ray.shutdown()


if __name__ == "__main__":
    main()
