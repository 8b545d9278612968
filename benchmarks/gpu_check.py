"""The GPU check: one call verifies the GPU paths (CUDA, bf16 autocast, NCCL-less single-GPU Ray Train) and measures
throughput, printing one Markdown table to paste into benchmarks/README.md with the date and device.

    bash benchmarks/gpu_check.sh            # builds the environment if needed, then runs this (under 10 minutes)

Rows:
- sampling: the ddpm-cifar10 UNet (35.7M parameters) at 32x32, DDIM-50, batch 256, fp32 and bf16 autocast:
  images/s, achieved TFLOP/s (forward FLOPs counted by torch's FlopCounterMode) and its share of the card's dense
  bf16 peak (spec sheet; unknown cards: the share is left out);
- FID-5K: one evaluation (5,000 samples, DDIM-50, bf16) with clean-fid's Inception when its weights are
  available (pre-staged at /tmp/inception-2015-12-05.pt), else with the offline `domain` extractor, saying which;
  the reference set is scikit-learn's digits at 32x32 RGB (no dataset can be downloaded on that machine);
- ANT: one optimizer step of vanilla, UW, PCGrad and Nash-MTL at k=5, batch 128, ddpm-cifar10, bf16, timed
  round-robin (median ms and median ratio to vanilla with its interquartile range);
- DeMe: a short finetune (60 steps, batch 64, bf16) of one specialist as a Ray Train run on one GPU: images/s;
- merge: merging N=4 task vectors of the ddpm-cifar10 UNet on the GPU (median ms per candidate).
Exits 0 with a message when no CUDA GPU is present. Asserts nothing about speed.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

# Dense bf16 tensor-core peaks from the vendors' spec sheets, TFLOP/s (no sparsity).
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 125.0,
                    "A10": 125.0, "RTX 4090": 165.0, "V100": 125.0}


def peak_of(name: str) -> float | None:
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def timed(fn, device) -> float:
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    return time.perf_counter() - start


def sampling_rows(device, rows: list[list[str]]) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from ant_ray.diffusion import NoiseSchedule, build_model, model_denoiser, sample_images

    model = build_model("ddpm-cifar10", resolution=32, channels=3).to(device).eval()
    schedule = NoiseSchedule.create("linear", 1000)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, 32, 32, device=device), torch.tensor([500], device=device))
    flops_per_image_step = counter.get_total_flops()
    peak = peak_of(torch.cuda.get_device_name(device))
    batch, steps = 256, 50
    for label, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        denoiser = model_denoiser(model, autocast_dtype=dtype)

        def run():
            with torch.no_grad():
                next(sample_images(denoiser, schedule, batch, shape=(3, 32, 32), sampler="ddim", steps=steps,
                                   seed=0, batch_size=batch, device=device))

        run()  # warm-up (cuDNN autotuning, allocator)
        seconds = statistics.median(timed(run, device) for _ in range(3))
        tflops = flops_per_image_step * batch * steps / seconds / 1e12
        share = f"{tflops / peak:.1%} of {peak:.0f}" if peak else "peak unknown"
        rows.append([f"sampling, ddpm-cifar10 32px, DDIM-{steps}, batch {batch}, {label}",
                     f"{batch / seconds:,.0f} images/s", f"{tflops:.1f} TFLOP/s ({share})"])


def fid_row(device, rows: list[list[str]]) -> None:
    from ant_ray.config import load_config
    from ant_ray.diffusion import build_model, model_denoiser
    from ant_ray.evaluation import FIDScorer
    from ant_ray.fid import ensure_inception_weights

    try:
        ensure_inception_weights()
        extractor, note = "inception", "clean-fid Inception"
    except Exception as err:  # no weights and no internet: say so, time the offline extractor instead
        extractor, note = "domain", f"domain extractor (Inception weights unavailable: {str(err)[:60]})"
    cfg = load_config(None, ["data.resolution=32", "data.channels=3", "sampler.steps=50", "sampler.precision=bf16",
                             f"fid.extractor={extractor}", "fid.num_samples=5000", "fid.batch_size=500",
                             "device=cuda"])
    with tempfile.TemporaryDirectory() as cache:
        scorer = FIDScorer(cfg, Path(cache), device=device)  # reference statistics first, not timed
        model = build_model("ddpm-cifar10", resolution=32, channels=3).to(device).eval()
        seconds = timed(lambda: scorer.score(model_denoiser(model)), device)
    rows.append([f"FID-5K, DDIM-50 bf16, {note}", f"{seconds:.1f} s", f"{5000 / seconds:,.0f} images/s"])


def ant_rows(device, rows: list[list[str]]) -> None:
    from ant_ray.ant.clustering import interval_clustering
    from ant_ray.ant.train import ClusteredStep, cluster_counts
    from ant_ray.diffusion import NoiseSchedule, build_model, build_weighting, diffusion_loss
    from ant_ray.mtl import build_mtl_method
    from benchmarks.bench_ant_step import vanilla_step
    from benchmarks.round_robin import ratio_quartiles, time_round_robin

    k, batch, T = 5, 128, 1000
    intervals = interval_clustering(k, "timestep", T=T)
    schedule = NoiseSchedule.create("linear", T)
    weighting = build_weighting("uniform")
    gen = torch.Generator().manual_seed(0)
    x0 = (torch.rand(batch, 3, 32, 32, generator=gen) * 2 - 1).to(device)
    noise = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
    t = torch.randint(0, T, (batch,), generator=gen).to(device)
    lookup = torch.tensor([i for i, (a, b) in enumerate(intervals) for _ in range(a, b)], device=device)
    counts = cluster_counts(lookup[t], k)

    def loss_fn(denoise, a, b, c):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return diffusion_loss(denoise, a, b, c, schedule, target="epsilon", weighting=weighting)

    def fresh():
        return build_model("ddpm-cifar10", resolution=32, channels=3, seed=0).to(device).train()

    candidates = {"vanilla": vanilla_step(fresh(), loss_fn, x0, t, noise)}
    for name in ("uw", "pcgrad", "nash_mtl"):
        model, method = fresh(), build_mtl_method(name, k).to(device)
        optimizer = torch.optim.AdamW([{"params": list(model.parameters())},
                                       {"params": list(method.parameters()), "weight_decay": 0.0}], lr=1e-4)
        step = ClusteredStep(model=model, ddp_model=model, method=method, optimizer=optimizer,
                             scaler=torch.amp.GradScaler("cuda", enabled=False), schedule=schedule, loss_fn=loss_fn,
                             intervals=intervals, micro_batch=batch, grad_clip=1.0, world_size=1,
                             autocast_dtype=torch.bfloat16)
        candidates[name] = lambda i, step=step: step(x0, t, noise, counts, i)
    sync = lambda: torch.cuda.synchronize(device)  # noqa: E731
    time_round_robin(candidates, 2, first="vanilla", synchronize=sync)
    seconds = time_round_robin(candidates, 25, first="vanilla", step_offset=100, synchronize=sync)
    for name, times in seconds.items():
        q1, ratio, q3 = ratio_quartiles(times, seconds["vanilla"])
        rows.append([f"ANT step, k=5, batch 128, bf16, {name}", f"{statistics.median(times) * 1000:.1f} ms",
                     f"x{ratio:.2f} vanilla (IQR {q1:.2f}-{q3:.2f})" if name != "vanilla" else "baseline"])


def deme_row(rows: list[list[str]]) -> None:
    import ray

    from ant_ray.config import load_config
    from ant_ray.deme.finetune import train_diffusion
    from ant_ray.diffusion import build_model, save_model
    from ant_ray.stages.ray_runtime import start_ray
    from ant_ray.stages.ray_train import fit

    start_ray(None)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, ["data.resolution=32", "data.channels=3", "finetune.steps=60",
                                 "finetune.batch_size=64", "finetune.mixed_precision=bf16", "finetune.log_every=30",
                                 "finetune.checkpoint_every=60", "finetune.resources={cpu: 2, gpu: 1, num_workers: 1}",
                                 f"output_dir={tmp}"])
        base = save_model(build_model("ddpm-cifar10", resolution=32, channels=3), Path(tmp) / "base")
        spec = {"range": [0, 250], "init_model": str(base), "teacher_model": str(base),
                "output_model": str(Path(tmp) / "specialist"), "tracking": None, "seed": 1}
        start = time.perf_counter()
        fit(train_diffusion, {"pipeline": cfg.worker_dump(), "section": "finetune", "name": "gpu-check",
                              "models": [spec], "evaluation": None},
            name="gpu-check", storage=Path(tmp) / "ray", resources=cfg.finetune.resources)
        seconds = time.perf_counter() - start
    ray.shutdown()
    rows.append(["DeMe finetune, 1 specialist, 60 steps x 64, bf16, one Ray Train run",
                 f"{60 * 64 / seconds:,.0f} images/s", f"{seconds:.1f} s with the run's start-up"])


def merge_row(device, rows: list[list[str]]) -> None:
    from ant_ray.diffusion import build_model
    from ant_ray.merge import TaskVectorMerger

    base = {k: v.to(device) for k, v in build_model("ddpm-cifar10", resolution=32, channels=3).state_dict().items()}
    gen = torch.Generator(device=device).manual_seed(0)
    tuned = [{k: v + 0.01 * torch.randn(v.shape, generator=gen, device=device) if v.is_floating_point() else v
              for k, v in base.items()} for _ in range(4)]
    merger = TaskVectorMerger(base, tuned)
    merger.merge([1.0] * 4)
    seconds = statistics.median(timed(lambda: merger.merge([0.9, 1.1, 0.8, 1.2]), device) for _ in range(10))
    rows.append(["merge N=4 task vectors, ddpm-cifar10, on the GPU", f"{seconds * 1000:.1f} ms per candidate", ""])


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU found; nothing to check here (the table needs a GPU machine).")
        return 0
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    print(f"gpu_check on {name}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"{time.strftime('%Y-%m-%d')}", flush=True)
    torch.backends.cudnn.benchmark = True
    rows: list[list[str]] = []
    for part in (lambda: sampling_rows(device, rows), lambda: fid_row(device, rows), lambda: ant_rows(device, rows),
                 lambda: merge_row(device, rows), lambda: deme_row(rows)):
        try:
            part()
        except Exception as err:  # one broken part must not hide the others' figures
            rows.append([f"FAILED: {getattr(part, '__name__', 'part')}", type(err).__name__, str(err)[:120]])
        print(f"  ... {rows[-1][0]}: {rows[-1][1]}", flush=True)
    print(f"\n| what ({name}) | figure | note |\n| --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
