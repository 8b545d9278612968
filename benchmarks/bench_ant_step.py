"""Cost of ANT clustered-MTL training steps, and data-parallel scaling on Ray Train.

    python -m benchmarks.bench_ant_step [--batch 64] [--k 5] [--repeats 10] [--device cpu|cuda] [--model tiny]
                                        [--resolution 8] [--threads 1] [--methods uw,pcgrad,...] [--skip-ray]
                                        [--ray-steps 40]

(run from the repository root, or with ant_ray installed). Not part of the test suite.

Part 1, one process: the median time of one optimizer step (forward, backward, combine, clip, AdamW) of plain
diffusion training ("vanilla") and of ``ClusteredStep`` with each MTL method at k clusters, with the ratio to
vanilla. Loss-balancing methods and Nash-MTL between refreshes need one backward; gradient methods one forward and
backward per cluster sub-batch. "pcgrad, naive" is the textbook alternative for comparison: one forward over the
batch and k full backward passes (retain_graph). Nash-MTL runs ``update_every`` (default 25) consecutive steps so
that one refresh is included, and its mean per step is printed. Also printed: one forward+backward at batch 1, the
fixed cost that each of a gradient method's k sub-batch passes pays on top of its share of the batch.

Part 2, Ray Train: images/s of ``train_ant`` (second half of a short run) with 1 and with 2 workers (1 CPU each,
or 1 GPU each with --device cuda) and their ratio; 2 workers on the same global batch do the same work split in two.
"""

from __future__ import annotations

import argparse
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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step_fn, steps: int, device: torch.device) -> list[float]:
    seconds = []
    for step in range(steps):
        synchronize(device)
        start = time.perf_counter()
        step_fn(step)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
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

    # vanilla: the plain diffusion step
    model = fresh_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def vanilla(step: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model_denoiser(model), x0, t, noise).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    # Vanilla is timed before and after the methods and the faster median is the baseline: a first measurement on
    # a cold process runs slow, which would flatter every ratio.
    timed_steps(vanilla, 5, device)
    vanilla_first = statistics.median(timed_steps(vanilla, args.repeats, device))

    def one_pass(step: int) -> None:  # the fixed cost of a forward+backward pass, whatever the batch
        loss_fn(model_denoiser(model), x0[:1], t[:1], noise[:1]).sum().backward()

    timed_steps(one_pass, 2, device)
    per_pass = statistics.median(timed_steps(one_pass, args.repeats, device))

    rows = []
    methods = args.methods.split(",") if args.methods else [*MTL_METHODS.names(), "naive"]
    for name in methods:
        if name != "naive":
            MTL_METHODS.get(name)  # an unknown name fails here, listing the choices
    for name in (m for m in methods if m != "naive"):
        model = fresh_model()
        method = build_mtl_method(name, args.k).to(device)
        optimizer = torch.optim.AdamW([{"params": list(model.parameters())},
                                       {"params": list(method.parameters()), "weight_decay": 0.0}], lr=1e-4)
        step_fn = ClusteredStep(model=model, ddp_model=model, method=method, optimizer=optimizer,
                                scaler=torch.amp.GradScaler(device.type, enabled=False), schedule=schedule,
                                loss_fn=loss_fn, intervals=intervals, micro_batch=args.batch, grad_clip=1.0,
                                world_size=1, autocast_dtype=None)
        steps = max(args.repeats, getattr(method, "update_every", 0))
        timed_steps(lambda s: step_fn(x0, t, noise, counts, s), 2, device)
        seconds = timed_steps(lambda s: step_fn(x0, t, noise, counts, 100 + s), steps, device)
        rows.append((name, statistics.median(seconds), statistics.mean(seconds)))

    if "naive" in methods:
        rows.append(naive_pcgrad(args, fresh_model, loss_fn, x0, t, noise, lookup, params_count, device))
    model = fresh_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    timed_steps(vanilla, 2, device)
    base = min(vanilla_first, statistics.median(timed_steps(vanilla, args.repeats, device)))
    rows.insert(0, ("vanilla", base, base))

    print(f"{'step':<34}{'median ms':>10}{'mean ms':>10}{'x vanilla':>11}")
    for name, median, mean in rows:
        print(f"{name:<34}{median * 1000:>10.1f}{mean * 1000:>10.1f}{mean / base:>11.2f}")
    print(f"\none forward+backward at batch 1 (the fixed cost per sub-batch pass): {per_pass * 1000:.1f} ms")

    if not args.skip_ray:
        ray_scaling(args)


def naive_pcgrad(args, fresh_model, loss_fn, x0, t, noise, lookup, params_count, device):
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

    timed_steps(naive, 2, device)
    seconds = timed_steps(naive, args.repeats, device)
    return "pcgrad, naive (k full backward)", statistics.median(seconds), statistics.mean(seconds)


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
    print(f"\nRay Train, {args.ray_steps} steps of batch {args.batch}, images/s over the second half:")
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
