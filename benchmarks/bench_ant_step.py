"""Cost of ANT clustered-MTL training steps, and data-parallel scaling on Ray Train.

    python -m benchmarks.bench_ant_step [--batch 64] [--k 5] [--repeats 10] [--device cpu|cuda] [--model tiny]
                                        [--resolution 8] [--threads 1] [--methods uw,pcgrad,...] [--skip-ray]
                                        [--ray-steps 40]

(run from the repository root, or with ant_ray installed). Not part of the test suite.

Part 1, one process: the time of one optimizer step (forward, backward, combine, clip, AdamW) of plain diffusion
training ("vanilla") and of ``ClusteredStep`` with each MTL method at k clusters. Methods are timed round-robin:
each of ``--repeats`` rounds runs one step of vanilla, then one of every method (their order rotating), so that
background load falls on all of them alike. Printed per method: the median step time, the mean, and the median of
the per-round ratios method / vanilla with its interquartile range. Loss-balancing methods and Nash-MTL between
refreshes need one backward; gradient methods one forward and backward per cluster sub-batch. "pcgrad, naive" is
the textbook alternative for comparison: one forward over the batch and k full backward passes (retain_graph).
Nash-MTL re-solves its weights every ``update_every`` (default 25) steps: with it, the rounds are rounded up to a
multiple of that, so its mean per step includes exactly one refresh per interval (its median is the step between
refreshes). Also printed: one forward+backward at batch 1, the fixed cost that each of a gradient method's k
sub-batch passes pays on top of its share of the batch.

Part 2, Ray Train: images/s of ``train_ant`` (second half of a short run) with 1 and with 2 workers (1 CPU each,
or 1 GPU each with --device cuda) and their ratio; 2 workers on the same global batch do the same work split in two.
Each configuration is its own Ray Train run, so this part is block-timed, not round-robin.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ant_ray.ant.clustering import interval_clustering
from ant_ray.ant.train import ClusteredStep, cluster_counts, cluster_losses
from ant_ray.diffusion import NoiseSchedule, build_model, build_weighting, diffusion_loss, model_denoiser
from ant_ray.mtl import MTL_METHODS, build_mtl_method, flat_grad, write_flat_grad
from benchmarks.round_robin import ratio_quartiles, time_round_robin

NAIVE_PCGRAD = "pcgrad, naive (k full backward)"
WARMUP_ROUNDS = 2
# Timed steps are numbered from here: Nash-MTL, which refreshed at warm-up step 0, refreshes again on the first
# timed step and then every update_every steps.
FIRST_TIMED_STEP = 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds (each: one step of every method)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="tiny", help="a model preset (tiny, small, ddpm-cifar10)")
    parser.add_argument("--resolution", type=int, default=8)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads in part 1 (Ray workers use 1)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated MTL methods for part 1 (default: all registered, plus the naive PCGrad)")
    parser.add_argument("--skip-ray", action="store_true", help="only part 1")
    parser.add_argument("--ray-steps", type=int, default=40)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",") if args.methods else [*MTL_METHODS.names(), "naive"]
    for name in methods:
        if name != "naive":
            MTL_METHODS.get(name)  # an unknown name fails here, listing the choices

    T = 1000
    intervals = interval_clustering(args.k, "timestep", T=T)
    schedule = NoiseSchedule.create("linear", T)
    weighting = build_weighting("uniform")
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch, args.channels, args.resolution, args.resolution)
    x0 = (torch.rand(shape, generator=generator) * 2 - 1).to(device)
    noise = torch.randn(shape, generator=generator).to(device)
    t = torch.randint(0, T, (args.batch,), generator=generator).to(device)
    lookup = torch.as_tensor(np.repeat(np.arange(args.k), [e - s for s, e in intervals]), device=device)
    counts = cluster_counts(lookup[t], args.k)

    def loss_fn(denoise, a, b, c):
        return diffusion_loss(denoise, a, b, c, schedule, target="epsilon", weighting=weighting)

    def fresh_model():
        return build_model(args.model, resolution=args.resolution, channels=args.channels, seed=0).to(device).train()

    params_count = sum(p.numel() for p in fresh_model().parameters())
    print(f"{args.model} UNet ({params_count / 1e6:.2f}M parameters) at {args.resolution}px, batch {args.batch}, "
          f"k={args.k}, {device}, {args.threads} thread(s); per-cluster counts {counts.tolist()}\n")

    # Every candidate has its own model and optimizer: fn(step) runs one optimizer step.
    vanilla_model = fresh_model()
    candidates = {"vanilla": vanilla_step(vanilla_model, loss_fn, x0, t, noise)}
    refresh_interval = 1
    for name in (m for m in methods if m != "naive"):
        model = fresh_model()
        method = build_mtl_method(name, args.k).to(device)
        optimizer = torch.optim.AdamW([{"params": list(model.parameters())},
                                       {"params": list(method.parameters()), "weight_decay": 0.0}], lr=1e-4)
        step_fn = ClusteredStep(model=model, ddp_model=model, method=method, optimizer=optimizer,
                                scaler=torch.amp.GradScaler(device.type, enabled=False), schedule=schedule,
                                loss_fn=loss_fn, intervals=intervals, micro_batch=args.batch, grad_clip=1.0,
                                world_size=1, autocast_dtype=None)
        candidates[name] = lambda step, step_fn=step_fn: step_fn(x0, t, noise, counts, step)
        refresh_interval = max(refresh_interval, getattr(method, "update_every", 1))
    if "naive" in methods:
        candidates[NAIVE_PCGRAD] = naive_pcgrad_step(args, fresh_model, loss_fn, x0, t, noise, lookup, params_count,
                                                     device)

    rounds = math.ceil(args.repeats / refresh_interval) * refresh_interval
    print(f"{rounds} timed rounds after {WARMUP_ROUNDS} warm-up rounds"
          + (f" (--repeats {args.repeats} rounded up to a multiple of Nash-MTL's refresh interval, {refresh_interval})"
             if rounds != args.repeats else ""))
    sync = lambda: synchronize(device)  # noqa: E731
    time_round_robin(candidates, WARMUP_ROUNDS, first="vanilla", synchronize=sync)
    seconds = time_round_robin(candidates, rounds, first="vanilla", step_offset=FIRST_TIMED_STEP, synchronize=sync)

    print(f"\n{'step':<34}{'median ms':>10}{'mean ms':>10}{'x vanilla (median)':>20}{'IQR':>14}")
    for name, times in seconds.items():
        q1, ratio, q3 = ratio_quartiles(times, seconds["vanilla"])
        print(f"{name:<34}{statistics.median(times) * 1000:>10.1f}{statistics.mean(times) * 1000:>10.1f}"
              f"{ratio:>20.2f}{f'{q1:.2f}-{q3:.2f}':>14}")
    if refresh_interval > 1:
        print(f"(Nash-MTL: the median is a step between refreshes; the mean includes one refresh per "
              f"{refresh_interval} steps.)")

    def one_pass(step: int) -> None:  # the fixed cost of a forward+backward pass, whatever the batch
        loss_fn(model_denoiser(vanilla_model), x0[:1], t[:1], noise[:1]).sum().backward()

    time_round_robin({"one pass": one_pass}, 2, synchronize=sync)
    per_pass = statistics.median(time_round_robin({"one pass": one_pass}, rounds, synchronize=sync)["one pass"])
    print(f"\none forward+backward at batch 1 (the fixed cost per sub-batch pass): {per_pass * 1000:.1f} ms")

    if not args.skip_ray:
        ray_scaling(args)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def vanilla_step(model, loss_fn, x0, t, noise):
    """The plain diffusion step: one forward and backward over the batch, clip, AdamW."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def vanilla(step: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model_denoiser(model), x0, t, noise).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return vanilla


def naive_pcgrad_step(args, fresh_model, loss_fn, x0, t, noise, lookup, params_count, device):
    """The textbook per-cluster gradients: one forward, k backward passes through the full batch's graph."""
    model = fresh_model()
    method = build_mtl_method("pcgrad", args.k)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    params = list(model.parameters())

    def naive(step: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        losses, present_counts = cluster_losses(loss_fn(model_denoiser(model), x0, t, noise), lookup[t], args.k)
        present = present_counts > 0
        grads = torch.stack([flat_grad(losses[i], params) if present[i] else
                             torch.zeros(params_count, device=device) for i in range(args.k)])
        direction = method.combine(grads, losses.detach(), present, step)
        write_flat_grad(params, direction)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    return naive


def ray_scaling(args: argparse.Namespace) -> None:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ant_ray.ant.train import train_ant
    from ant_ray.config import load_config

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    use_gpu = args.device.startswith("cuda")
    ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False,
             logging_level="WARNING", log_to_driver=False)
    print(f"\nRay Train, {args.ray_steps} steps of batch {args.batch}, images/s over the second half "
          "(block-timed: each configuration is a separate run, so it cannot be interleaved step by step):")
    throughput = {}
    for method in ("uw", "pcgrad"):
        for workers in (1, 2):
            cfg = load_config(None, [
                f"device={'cuda' if use_gpu else 'cpu'}", f"model.base={args.model}", f"data.resolution={args.resolution}",
                f"data.channels={args.channels}", f"ant.k={args.k}", f"ant.method={method}",
                f"ant.batch_size={args.batch}", f"ant.steps={args.ray_steps}", f"ant.log_every={args.ray_steps // 2}",
                f"ant.checkpoint_every={args.ray_steps}", f"ant.resources.num_workers={workers}",
                f"ant.resources.gpu={1 if use_gpu else 0}"])
            with tempfile.TemporaryDirectory() as out:
                trainer = TorchTrainer(
                    train_ant,
                    train_loop_config={"pipeline": cfg.model_dump(mode="json"),
                                       "intervals": interval_clustering(args.k, "timestep", T=cfg.diffusion.T),
                                       "init_model": None, "output_dir": out, "tracking": None, "seed": 0},
                    scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                                 resources_per_worker={"GPU": 1} if use_gpu else {"CPU": 1}),
                    run_config=RunConfig(name=f"bench-{method}-{workers}-{time.time_ns()}",
                                         storage_path=str(Path(out) / "ray")))
                throughput[method, workers] = trainer.fit().metrics["images_per_s"]
        one, two = throughput[method, 1], throughput[method, 2]
        print(f"  {method:<8} 1 worker {one:8.0f} img/s   2 workers {two:8.0f} img/s   ratio {two / one:5.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
