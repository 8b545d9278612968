"""Ray Train start-up in DeMe's finetune stage at N=4, with the quickstart's finetune settings otherwise. Modes:

- packed: one Ray Train run whose one worker trains the 4 specialists in turn (finetune.specialists_per_worker=4,
  the worker holding the whole machine's 2 CPUs): the quickstart's way;
- groups: one run of 4 worker groups, a specialist each, half a CPU each (the quickstart's way before);
- separate: 4 Ray Train runs started together (the way before that);
- packed_2s_poll: packed, with the Train controller polling its workers every 2 s (Ray's default) instead of the
  0.5 s the private Ray sets: what the poll interval costs.

    .venv/bin/python -m benchmarks.bench_train_startup [--out /tmp/bench_startup] [--steps 150] [--repeats 2]
        [--modes packed,groups,separate,packed_2s_poll]

Start-up is estimated as the wall time of a 1-step run (all of its cost is starting, loading, saving), and its
share as that over the wall time of a --steps run. For one-run modes it also prints Ray Train's own part: from the
call to the loop's first line, and from the loop's return to the call's. The modes alternate (A, B, A, B). Prints
figures only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import ray

from ant_ray.config import load_config
from ant_ray.deme.finetune import train_diffusion
from ant_ray.stages.pretrain import pretrained_model
from ant_ray.stages.ray_runtime import TRAIN_POLL_INTERVAL, start_ray
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


def _timed_loop(config: dict) -> dict:
    """The loop, and when it was entered and left (this machine's clock)."""
    entered = time.time()
    train_diffusion(config)
    return {"entered": entered, "left": time.time()}


def one_run(cfg, base: Path, out: Path) -> tuple[float, tuple[float, float]]:
    """Wall time, and (Ray Train's start before the loop, its end after the loop)."""
    start = time.time()
    result = fit(_timed_loop, {"pipeline": cfg.worker_dump(), "section": "finetune", "name": out.name,
                               "models": specs(base, out), "models_per_worker": cfg.finetune.specialists_per_worker,
                               "evaluation": None},
                 name=out.name, storage=out / "ray", resources=cfg.finetune.resources, models=N)
    end = time.time()
    return end - start, (result.return_value["entered"] - start, end - result.return_value["left"])


def separate_runs(cfg, base: Path, out: Path) -> tuple[float, None]:
    start = time.perf_counter()
    ray.get([_fit_one.remote(cfg.worker_dump(), f"{out.name}-{i}", str(out / "ray"), spec)
             for i, spec in enumerate(specs(base, out))])
    return time.perf_counter() - start, None


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
    poll = os.environ[TRAIN_POLL_INTERVAL]  # the private Ray's; Ray Train reads the driver's at each run
    known = {"packed": ("one run, one worker training the 4 in turn", one_run, one_worker, poll),
             "groups": ("one run, 4 worker groups", one_run, a_group_each, poll),
             "separate": ("4 runs started together", separate_runs, a_group_each, poll),
             "packed_2s_poll": ("the same, its controller polling every 2 s", one_run, one_worker, "2")}
    modes = {known[key][0]: known[key][1:] for key in args.modes.split(",")}
    walls: dict[tuple[str, int], list[float]] = {}
    ray_train: dict[str, list[tuple[float, float]]] = {}  # Ray Train's own (start, end) around the loop
    for repeat in range(args.repeats):
        for steps in (1, args.steps):
            for index, (name, (mode, settings, interval)) in enumerate(modes.items()):
                cfg = load_config("search_spaces/quickstart.yaml", overrides + settings + [f"finetune.steps={steps}"])
                folder = out / f"mode{index}-{steps}-{repeat}-{int(time.time())}"
                os.environ[TRAIN_POLL_INTERVAL] = interval
                wall, phases = mode(cfg, base, folder)
                walls.setdefault((name, steps), []).append(wall)
                if phases is not None:
                    ray_train.setdefault(name, []).append(phases)
                print(f"{name}, {steps} steps: {wall:.1f} s", flush=True)
    print(f"\n| N=4 specialists, quickstart finetune settings | 1-step runs (start-up), s | {args.steps}-step runs, s "
          "| start-up share (medians) |\n| --- | --- | --- | --- |")
    for name in modes:
        startup, full = statistics.median(walls[name, 1]), statistics.median(walls[name, args.steps])
        each = [" ".join(f"{wall:.1f}" for wall in walls[name, steps]) for steps in (1, args.steps)]
        print(f"| {name} | {each[0]} | {each[1]} | {startup / full:.0%} |")
    print("\n| one Ray Train run | before the loop starts, s | after the loop ends, s |\n| --- | --- | --- |")
    for name, phases in ray_train.items():
        before, after = (" ".join(f"{value:.1f}" for value in values) for values in zip(*phases))
        print(f"| {name} | {before} | {after} |")
    ray.shutdown()


if __name__ == "__main__":
    main()
