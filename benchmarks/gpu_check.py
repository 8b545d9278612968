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

    python -m benchmarks.gpu_check --smoke  # every row on the CPU at toy sizes: the code paths, no figures

GPU windows are rare, so `tests/test_gpu_check.py` runs the smoke form in CI: a change that breaks a row shows
there, not in the one run on a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# Dense bf16 tensor-core peaks from the vendors' spec sheets, TFLOP/s (no sparsity).
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 125.0,
                    "A10": 125.0, "RTX 4090": 165.0, "V100": 125.0}


@dataclass(frozen=True)
class Sizes:
    """What each row runs: the real sizes on a GPU, toy ones for the CPU smoke run."""
    model: str = "ddpm-cifar10"
    resolution: int = 32
    channels: int = 3
    sampling_batch: int = 256
    sampling_steps: int = 50
    fid_samples: int = 5000
    fid_batch: int = 500
    ant_batch: int = 128
    ant_steps: int = 25
    deme_steps: int = 60
    deme_batch: int = 64
    deme_resources: str = "{cpu: 2, gpu: 1, num_workers: 1}"
    repeats: int = 3


GPU = Sizes()
SMOKE = Sizes(model="tiny", resolution=8, channels=1, sampling_batch=8, sampling_steps=2, fid_samples=100,
              fid_batch=50, ant_batch=16, ant_steps=2, deme_steps=2, deme_batch=8,
              deme_resources="{cpu: 1, num_workers: 1}", repeats=1)


def peak_of(name: str) -> float | None:
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def sampling_rows(device, rows: list[list[str]], sizes: Sizes) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from ant_ray.diffusion import NoiseSchedule, build_model, model_denoiser, sample_images

    shape = (sizes.channels, sizes.resolution, sizes.resolution)
    model = build_model(sizes.model, resolution=sizes.resolution, channels=sizes.channels).to(device).eval()
    schedule = NoiseSchedule.create("linear", 1000)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, *shape, device=device), torch.tensor([500], device=device))
    flops_per_image_step = counter.get_total_flops()
    peak = peak_of(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    batch, steps = sizes.sampling_batch, sizes.sampling_steps
    for label, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        denoiser = model_denoiser(model, autocast_dtype=dtype)

        def run():
            with torch.no_grad():
                next(sample_images(denoiser, schedule, batch, shape=shape, sampler="ddim", steps=steps,
                                   seed=0, batch_size=batch, device=device))

        run()  # warm-up (cuDNN autotuning, allocator)
        seconds = statistics.median(timed(run, device) for _ in range(sizes.repeats))
        tflops = flops_per_image_step * batch * steps / seconds / 1e12
        share = f"{tflops / peak:.1%} of {peak:.0f}" if peak else "peak unknown"
        rows.append([f"sampling, {sizes.model} {sizes.resolution}px, DDIM-{steps}, batch {batch}, {label}",
                     f"{batch / seconds:,.0f} images/s", f"{tflops:.1f} TFLOP/s ({share})"])


def fid_row(device, rows: list[list[str]], sizes: Sizes) -> None:
    from ant_ray.config import load_config
    from ant_ray.diffusion import build_model, model_denoiser
    from ant_ray.evaluation import FIDScorer
    from ant_ray.fid import ensure_inception_weights

    try:
        ensure_inception_weights()
        extractor, note = "inception", "clean-fid Inception"
    except Exception as err:  # no weights and no internet: say so, time the offline extractor instead
        extractor, note = "domain", f"domain extractor (Inception weights unavailable: {str(err)[:60]})"
    cfg = load_config(None, [f"data.resolution={sizes.resolution}", f"data.channels={sizes.channels}",
                             f"sampler.steps={sizes.sampling_steps}", "sampler.precision=bf16",
                             f"fid.extractor={extractor}", f"fid.num_samples={sizes.fid_samples}",
                             f"fid.batch_size={sizes.fid_batch}", f"device={device.type}"])
    with tempfile.TemporaryDirectory() as cache:
        scorer = FIDScorer(cfg, Path(cache), device=device)  # reference statistics first, not timed
        model = build_model(sizes.model, resolution=sizes.resolution, channels=sizes.channels).to(device).eval()
        seconds = timed(lambda: scorer.score(model_denoiser(model)), device)
    rows.append([f"FID-{sizes.fid_samples}, DDIM-{sizes.sampling_steps} bf16, {note}", f"{seconds:.1f} s",
                 f"{sizes.fid_samples / seconds:,.0f} images/s"])


def ant_rows(device, rows: list[list[str]], sizes: Sizes) -> None:
    from ant_ray.ant.clustering import interval_clustering
    from ant_ray.ant.train import ClusteredStep, cluster_counts
    from ant_ray.diffusion import NoiseSchedule, build_model, build_weighting, diffusion_loss
    from ant_ray.mtl import build_mtl_method
    from benchmarks.bench_ant_step import vanilla_step
    from benchmarks.round_robin import ratio_quartiles, time_round_robin

    k, batch, T = 5, sizes.ant_batch, 1000
    shape = (batch, sizes.channels, sizes.resolution, sizes.resolution)
    intervals = interval_clustering(k, "timestep", T=T)
    schedule = NoiseSchedule.create("linear", T)
    weighting = build_weighting("uniform")
    gen = torch.Generator().manual_seed(0)
    x0 = (torch.rand(shape, generator=gen) * 2 - 1).to(device)
    noise = torch.randn(shape, generator=gen).to(device)
    t = torch.randint(0, T, (batch,), generator=gen).to(device)
    lookup = torch.tensor([i for i, (a, b) in enumerate(intervals) for _ in range(a, b)], device=device)
    counts = cluster_counts(lookup[t], k)

    def loss_fn(denoise, a, b, c):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return diffusion_loss(denoise, a, b, c, schedule, target="epsilon", weighting=weighting)

    def fresh():
        return build_model(sizes.model, resolution=sizes.resolution, channels=sizes.channels, seed=0).to(device).train()

    candidates = {"vanilla": vanilla_step(fresh(), loss_fn, x0, t, noise)}
    for name in ("uw", "pcgrad", "nash_mtl"):
        model, method = fresh(), build_mtl_method(name, k).to(device)
        optimizer = torch.optim.AdamW([{"params": list(model.parameters())},
                                       {"params": list(method.parameters()), "weight_decay": 0.0}], lr=1e-4)
        scaler = torch.amp.GradScaler(device.type, enabled=False)
        step = ClusteredStep(model=model, ddp_model=model, method=method, optimizer=optimizer, scaler=scaler,
                             schedule=schedule, loss_fn=loss_fn, intervals=intervals, micro_batch=batch,
                             grad_clip=1.0, world_size=1, autocast_dtype=torch.bfloat16)
        candidates[name] = lambda i, step=step: step(x0, t, noise, counts, i)
    sync = lambda: synchronize(device)  # noqa: E731
    time_round_robin(candidates, 2, first="vanilla", synchronize=sync)
    seconds = time_round_robin(candidates, sizes.ant_steps, first="vanilla", step_offset=100, synchronize=sync)
    for name, times in seconds.items():
        q1, ratio, q3 = ratio_quartiles(times, seconds["vanilla"])
        rows.append([f"ANT step, k=5, batch {batch}, bf16, {name}", f"{statistics.median(times) * 1000:.1f} ms",
                     f"x{ratio:.2f} vanilla (IQR {q1:.2f}-{q3:.2f})" if name != "vanilla" else "baseline"])


def deme_row(rows: list[list[str]], sizes: Sizes) -> None:
    import ray

    from ant_ray.config import load_config
    from ant_ray.deme.finetune import train_diffusion
    from ant_ray.diffusion import build_model, save_model
    from ant_ray.stages.ray_runtime import start_ray
    from ant_ray.stages.ray_train import fit

    ours = start_ray(None) != "already connected"
    steps, batch = sizes.deme_steps, sizes.deme_batch
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [f"data.resolution={sizes.resolution}", f"data.channels={sizes.channels}",
                                 f"finetune.steps={steps}", f"finetune.batch_size={batch}",
                                 "finetune.mixed_precision=bf16", f"finetune.log_every={steps}",
                                 f"finetune.checkpoint_every={steps}", f"finetune.resources={sizes.deme_resources}",
                                 f"output_dir={tmp}"])
        base = save_model(build_model(sizes.model, resolution=sizes.resolution, channels=sizes.channels),
                          Path(tmp) / "base")
        spec = {"range": [0, 250], "init_model": str(base), "teacher_model": str(base),
                "output_model": str(Path(tmp) / "specialist"), "tracking": None, "seed": 1}
        start = time.perf_counter()
        fit(train_diffusion, {"pipeline": cfg.worker_dump(), "section": "finetune", "name": "gpu-check",
                              "models": [spec], "evaluation": None},
            name="gpu-check", storage=Path(tmp) / "ray", resources=cfg.finetune.resources)
        seconds = time.perf_counter() - start
    if ours:
        ray.shutdown()
    rows.append([f"DeMe finetune, 1 specialist, {steps} steps x {batch}, bf16, one Ray Train run",
                 f"{steps * batch / seconds:,.0f} images/s", f"{seconds:.1f} s with the run's start-up"])


def merge_row(device, rows: list[list[str]], sizes: Sizes) -> None:
    from ant_ray.diffusion import build_model
    from ant_ray.merge import TaskVectorMerger

    model = build_model(sizes.model, resolution=sizes.resolution, channels=sizes.channels)
    base = {k: v.to(device) for k, v in model.state_dict().items()}
    gen = torch.Generator(device=device).manual_seed(0)
    tuned = [{k: v + 0.01 * torch.randn(v.shape, generator=gen, device=device) if v.is_floating_point() else v
              for k, v in base.items()} for _ in range(4)]
    merger = TaskVectorMerger(base, tuned)
    merger.merge([1.0] * 4)
    seconds = statistics.median(timed(lambda: merger.merge([0.9, 1.1, 0.8, 1.2]), device)
                                for _ in range(sizes.repeats * 3))
    rows.append([f"merge N=4 task vectors, {sizes.model}, on the {device.type}",
                 f"{seconds * 1000:.1f} ms per candidate", ""])


def main(argv: list[str] | None = None) -> list[list[str]]:
    """Print the table; return its rows (a row whose first cell starts with FAILED is a part that raised)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="every row on the CPU at toy sizes (no figures)")
    args = parser.parse_args(argv)
    if args.smoke:
        device, sizes, name = torch.device("cpu"), SMOKE, "CPU smoke run, toy sizes: not figures"
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU found; nothing to check here (the table needs a GPU machine).")
        return []
    else:
        device, sizes = torch.device("cuda"), GPU
        name = torch.cuda.get_device_name(device)
        torch.backends.cudnn.benchmark = True
    print(f"gpu_check on {name}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"{time.strftime('%Y-%m-%d')}", flush=True)
    rows: list[list[str]] = []
    for part in (sampling_rows, fid_row, ant_rows, merge_row):
        _run_part(part.__name__, lambda: part(device, rows, sizes), rows)
    _run_part("deme_row", lambda: deme_row(rows, sizes), rows)
    print(f"\n| what ({name}) | figure | note |\n| --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return rows


def _run_part(name: str, part, rows: list[list[str]]) -> None:
    try:
        part()
    except Exception as err:  # one broken part must not hide the others' figures
        rows.append([f"FAILED: {name}", type(err).__name__, str(err)[:120]])
    print(f"  ... {rows[-1][0]}: {rows[-1][1]}", flush=True)


if __name__ == "__main__":
    main()
