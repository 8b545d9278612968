"""The GPU check: one call measures what a cluster user needs to know of the GPU paths, printing each row as it
finishes and one Markdown table at the end, to paste into benchmarks/README.md with the date and device.

    bash benchmarks/gpu_check.sh [--out DIR]   # on the GPU machine: runs from carried wheels, no registry needed

It needs torch, torchvision, diffusers and pydantic, never Ray, MLflow or Optuna: the training loops run in-process
(`ant_ray.training.run_in_process`), as they would in a Ray Train worker. Rows, each with its own time budget and
the peak GPU memory it allocated (`torch.cuda.max_memory_allocated`):
- sampling: the ddpm-cifar10 UNet (35.7M parameters) at 32x32, DDIM-50, batch 256 / 1,024 / 4,096, fp32 and bf16
  autocast (and torch.compile where it compiles within the row's budget): images/s, achieved TFLOP/s (forward FLOPs
  counted by torch's FlopCounterMode) and its share of the card's dense peak for that precision (fp32 runs its
  convolutions in TF32, cuDNN's default, so its share is of the TF32 peak);
- FID-5K: sampling 5,000 images (DDIM-50, bf16), Inception features timed with torchvision's
  `inception_v3(weights=None)` (timing only: random weights, the same network and FLOPs as clean-fid's), and the
  Frechet distance in float64 on the GPU;
- ANT: one optimizer step of vanilla, UW, PCGrad and Nash-MTL at k=5, batch 128, bf16, timed round-robin;
- DeMe: a finetune of one specialist in-process (60 steps, batch 64, bf16): the loop's own images/s, apart from
  start-up;
- merge: N=4 task vectors of the ddpm-cifar10 UNet merged on the GPU, GB/s against the card's bandwidth;
- distributed: NCCL initialised with one rank and an all-reduce (two ranks cannot share one GPU), and the
  gradient-based MTL combine (PCGrad) in 2 gloo processes equal to 1 process;
- model families at real size with random weights: DiT-XL/2 at 256px latents and the SD v1.x UNet, one bf16
  training step with and without gradient checkpointing;
- precision: the candidates of one small merge search (digits, trained here) scored at fp32 and at bf16 sampling:
  Spearman's rank correlation of their FIDs (the offline `domain` extractor, a ranking tool, not Inception FID).
Exits 0 with a message when no CUDA GPU is present. Asserts nothing about speed.

    python -m benchmarks.gpu_check --smoke  # every row on the CPU at toy sizes: the code paths, no figures

GPU windows are rare, so `tests/test_loops_without_ray.py` runs the smoke form in CI with Ray, MLflow and Optuna
unimportable, as on the GPU machine: a change that breaks a row fails there, not in the one run on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# Dense peaks from the vendors' spec sheets, TFLOP/s (no sparsity), and memory bandwidth, TB/s. Keys are matched as
# substrings of torch.cuda.get_device_name(), most specific first.
PEAKS = {
    "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "bandwidth": 4.8},
    "H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "bandwidth": 3.35},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "bandwidth": 2.04},
    "L40S": {"fp32": 91.6, "tf32": 183.0, "bf16": 362.0, "bandwidth": 0.864},
    "L4": {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "bandwidth": 0.3},
}
RUN_BUDGET_S = 450  # the whole check: a 15-minute window includes the machine's start and a possible rerun


@dataclass(frozen=True)
class Sizes:
    """What each row runs: the real sizes on a GPU, toy ones for the CPU smoke run."""
    model: str = "ddpm-cifar10"
    resolution: int = 32
    channels: int = 3
    sampling_batches: tuple[int, ...] = (256, 1024, 4096)
    sampling_steps: int = 50
    timed_steps: int = 5  # sampler steps timed per repeat beyond batch 256 (the per-step cost is flat)
    compile: bool = True
    fid_samples: int = 5000
    fid_batch: int = 1000
    inception_size: int = 299  # clean-fid resizes to 299x299 before Inception
    feature_dims: int = 2048
    ant_batch: int = 128
    ant_rounds: int = 15
    deme_steps: int = 60
    deme_batch: int = 64
    dit: dict | None = None
    sd_unet: dict | None = None
    family_batch: int = 16
    precision_pretrain_steps: int = 600
    precision_finetune_steps: int = 150
    precision_candidates: int = 12
    precision_samples: int = 1000
    repeats: int = 3


# DiT-XL/2 (Peebles & Xie): 28 blocks, width 1152, 16 heads, patch 2, on 32x32x4 latents of 256px images.
DIT_XL_2 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")
# Stable Diffusion v1.x's UNet (860M parameters) on 64x64x4 latents of 512px images, CLIP ViT-L/14 text states.
SD_V1_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)

GPU = Sizes(dit=DIT_XL_2, sd_unet=SD_V1_UNET)
SMOKE = Sizes(model="tiny", resolution=8, channels=1, sampling_batches=(8,), sampling_steps=2, timed_steps=2,
              compile=False, fid_samples=64, fid_batch=32, inception_size=75, feature_dims=64, ant_batch=16,
              ant_rounds=2, deme_steps=4, deme_batch=8,
              dit=dict(DIT_XL_2, num_attention_heads=2, attention_head_dim=8, num_layers=1, sample_size=8,
                       num_embeds_ada_norm=10),
              sd_unet=dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                           block_out_channels=(32, 64), cross_attention_dim=32, attention_head_dim=8,
                           norm_num_groups=32, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
              family_batch=2, precision_pretrain_steps=4, precision_finetune_steps=2, precision_candidates=4,
              precision_samples=32, repeats=1)


class Check:
    """The rows so far, the device's peaks and the time budgets. A part adds its rows with `row`, which prints at
    once (a window cut short still shows what finished) with the peak memory since the part began."""

    def __init__(self, device: torch.device, sizes: Sizes, name: str):
        self.device, self.sizes, self.name = device, sizes, name
        self.rows: list[list[str]] = []
        self.peaks = next((p for key, p in PEAKS.items() if key in name), None) if device.type == "cuda" else None
        self.started = time.perf_counter()
        self.part_deadline = float("inf")

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, fn) -> float:
        self.synchronize()
        start = time.perf_counter()
        fn()
        self.synchronize()
        return time.perf_counter() - start

    def left(self) -> float:
        """Seconds left to the running part."""
        return self.part_deadline - time.perf_counter()

    def share(self, tflops: float, precision: str) -> str:
        if self.peaks is None:
            return "peak unknown"
        return f"{tflops / self.peaks[precision]:.1%} of {precision} peak {self.peaks[precision]:.0f}"

    def row(self, what: str, figure: str, note: str = "") -> None:
        peak = (f"{torch.cuda.max_memory_allocated(self.device) / 2**30:.2f} GiB" if self.device.type == "cuda"
                else "n/a (CPU)")
        self.rows.append([what, figure, note, peak])
        print(f"  {what}: {figure}  {note}  [peak {peak}]", flush=True)

    def run_part(self, name: str, budget_s: float, part) -> None:
        """Run one part within its budget (parts check `left()` between measurements); a part that raises adds a
        FAILED row and the others go on. A part that would start past the run's budget is skipped, saying so."""
        if time.perf_counter() - self.started + 5 > RUN_BUDGET_S and self.sizes is not SMOKE:
            self.rows.append([f"SKIPPED: {name}", "over the run's budget", f"{RUN_BUDGET_S} s", ""])
            print(f"  SKIPPED {name}: the run's {RUN_BUDGET_S} s are spent", flush=True)
            return
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        # The smoke run covers every code path: no budget cuts it short.
        self.part_deadline = time.perf_counter() + (budget_s if self.sizes is not SMOKE else float("inf"))
        start = time.perf_counter()
        try:
            part(self)
        except Exception as err:  # one broken part must not hide the others' figures
            self.rows.append([f"FAILED: {name}", type(err).__name__, str(err).splitlines()[0][:160] if str(err)
                              else "", ""])
            print(f"  FAILED {name}: {type(err).__name__}: {err}", flush=True)
        print(f"  ({name}: {time.perf_counter() - start:.1f} s of its {budget_s:.0f})", flush=True)

    def table(self) -> str:
        lines = [f"| what ({self.name}) | figure | note | peak memory |", "| --- | --- | --- | --- |"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in self.rows])


def _model(sizes: Sizes, device, seed: int = 0):
    from ant_ray.diffusion import build_model

    return build_model(sizes.model, resolution=sizes.resolution, channels=sizes.channels, seed=seed).to(device)


# ------------------------------------------------------------------------------------------------------ the parts


def _sampling_measure(check: Check, model, label: str, network, dtype, batch: int, peak: str) -> None:
    """One sampling row: images/s of DDIM-50 with `network` (the model, or its compiled form) at `batch`."""
    from torch.utils.flop_counter import FlopCounterMode

    from ant_ray.diffusion import NoiseSchedule, model_denoiser, sample_images

    sizes, device = check.sizes, check.device
    shape = (sizes.channels, sizes.resolution, sizes.resolution)
    schedule = NoiseSchedule.create("linear", 1000)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, *shape, device=device), torch.tensor([500], device=device))
    flops_per_image_step = counter.get_total_flops()
    denoiser = model_denoiser(network, autocast_dtype=dtype)
    steps = sizes.sampling_steps if batch == sizes.sampling_batches[0] else sizes.timed_steps

    def run():
        with torch.no_grad():
            next(sample_images(denoiser, schedule, batch, shape=shape, sampler="ddim", steps=steps, seed=0,
                               batch_size=batch, device=device))

    run()  # warm-up (cuDNN autotuning, the allocator, compilation)
    times = []
    while len(times) < sizes.repeats and (not times or check.left() > 3 * times[-1]):
        times.append(check.timed(run))
    per_step = statistics.median(times) / steps
    images_per_s = batch / (per_step * sizes.sampling_steps)
    tflops = flops_per_image_step * batch / per_step / 1e12
    timed = f"DDIM-{steps} timed" if steps == sizes.sampling_steps else f"{steps} DDIM steps timed x{len(times)}"
    check.row(f"sampling, {sizes.model} {sizes.resolution}px, DDIM-{sizes.sampling_steps}, batch {batch}, {label}",
              f"{images_per_s:,.0f} images/s", f"{tflops:.1f} TFLOP/s ({check.share(tflops, peak)}); {timed}")


def sampling_rows(check: Check) -> None:
    model = _model(check.sizes, check.device).eval()
    # fp32 convolutions run in TF32 under cuDNN's default; say which peak the share is of.
    fp32_peak = "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"
    for batch in check.sizes.sampling_batches:
        for label, dtype, peak in (("fp32", None, fp32_peak), ("bf16", torch.bfloat16, "bf16")):
            if check.left() < 10:
                check.row(f"sampling batch {batch} {label}", "skipped", "the row's budget is spent")
                continue
            _sampling_measure(check, model, label, model, dtype, batch, peak)


def compile_row(check: Check) -> None:
    """Last, on what is left of the run's budget: compilation takes a minute or more and must not starve the rows."""
    sizes, device = check.sizes, check.device
    left = RUN_BUDGET_S - (time.perf_counter() - check.started)
    if not sizes.compile or left < 60:  # an H200 compiled the 35.7M UNet in 34 s (2026-12-04)
        check.row("sampling, bf16, torch.compile", "skipped",
                  "not in the smoke run" if not sizes.compile else f"{left:.0f} s left of the run's budget")
        return
    model = _model(sizes, device).eval()
    shape = (sizes.channels, sizes.resolution, sizes.resolution)
    batch = sizes.sampling_batches[min(1, len(sizes.sampling_batches) - 1)]
    start = time.perf_counter()
    compiled = torch.compile(model)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        compiled(torch.randn(batch, *shape, device=device), torch.full((batch,), 500, device=device))
    check.synchronize()
    print(f"  (torch.compile: {time.perf_counter() - start:.0f} s to compile)", flush=True)
    _sampling_measure(check, model, "bf16, torch.compile", compiled, torch.bfloat16, batch, "bf16")


def fid_rows(check: Check) -> None:
    import torchvision

    from ant_ray.data import load_dataset
    from ant_ray.diffusion import NoiseSchedule, model_denoiser, sample_images
    from ant_ray.fid.frechet import frechet_distance_torch

    sizes, device = check.sizes, check.device
    shape = (sizes.channels, sizes.resolution, sizes.resolution)
    model = _model(sizes, device).eval()
    schedule = NoiseSchedule.create("linear", 1000)
    denoiser = model_denoiser(model, autocast_dtype=torch.bfloat16)
    # Timing only: random weights (no download), the same architecture and FLOPs as clean-fid's Inception.
    inception = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
    inception.fc = torch.nn.Identity()  # the 2048-d pool features FID uses
    inception = inception.to(device).eval()

    def features(images: torch.Tensor) -> torch.Tensor:
        images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        size = (sizes.inception_size, sizes.inception_size)
        resized = torch.nn.functional.interpolate(images.float(), size=size, mode="bilinear", align_corners=False)
        with torch.no_grad():
            return inception(resized)[:, :sizes.feature_dims].double()

    n, batch = sizes.fid_samples, sizes.fid_batch
    images: list[torch.Tensor] = []
    sample_s = check.timed(lambda: images.extend(sample_images(
        denoiser, schedule, n, shape=shape, sampler="ddim", steps=sizes.sampling_steps, seed=0, batch_size=batch,
        device=device)))
    feats: list[torch.Tensor] = []
    feature_s = check.timed(lambda: feats.extend(features(x) for x in images))
    generated = torch.cat(feats)
    reference = load_dataset("digits", resolution=sizes.resolution, channels=sizes.channels).images[:n].to(device)
    reference_feats = torch.cat([features(x) for x in reference.split(batch)])

    def gaussian(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return f.mean(0), torch.cov(f.T)

    distance: list[float] = []
    frechet_s = check.timed(lambda: distance.append(frechet_distance_torch(*gaussian(generated),
                                                                           *gaussian(reference_feats))))
    total = sample_s + feature_s + frechet_s
    check.row(f"FID-{n // 1000 if n >= 1000 else n}{'K' if n >= 1000 else ''} time, DDIM-{sizes.sampling_steps} "
              f"bf16 sampling + Inception features + Frechet (float64, {device.type})", f"{total:.1f} s",
              f"sampling {sample_s:.1f} s ({n / sample_s:,.0f} images/s), Inception {feature_s:.2f} s "
              f"({n / feature_s:,.0f} images/s; timing only, random weights), Frechet {frechet_s:.2f} s")


def ant_rows(check: Check) -> None:
    from ant_ray.ant.clustering import interval_clustering
    from ant_ray.ant.train import ClusteredStep, cluster_counts
    from ant_ray.diffusion import NoiseSchedule, build_weighting, diffusion_loss
    from ant_ray.mtl import build_mtl_method
    from benchmarks.bench_ant_step import vanilla_step
    from benchmarks.round_robin import ratio_quartiles, time_round_robin

    sizes, device = check.sizes, check.device
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

    candidates = {"vanilla": vanilla_step(_model(sizes, device).train(), loss_fn, x0, t, noise)}
    for name in ("uw", "pcgrad", "nash_mtl"):
        model, method = _model(sizes, device).train(), build_mtl_method(name, k).to(device)
        optimizer = torch.optim.AdamW([{"params": list(model.parameters())},
                                       {"params": list(method.parameters()), "weight_decay": 0.0}], lr=1e-4)
        scaler = torch.amp.GradScaler(device.type, enabled=False)
        step = ClusteredStep(model=model, ddp_model=model, method=method, optimizer=optimizer, scaler=scaler,
                             schedule=schedule, loss_fn=loss_fn, intervals=intervals, micro_batch=batch,
                             grad_clip=1.0, world_size=1, autocast_dtype=torch.bfloat16)
        candidates[name] = lambda i, step=step: step(x0, t, noise, counts, i)
    time_round_robin(candidates, 2, first="vanilla", synchronize=check.synchronize)
    seconds = time_round_robin(candidates, sizes.ant_rounds, first="vanilla", step_offset=100,
                               synchronize=check.synchronize)
    for name, times in seconds.items():
        q1, ratio, q3 = ratio_quartiles(times, seconds["vanilla"])
        check.row(f"ANT step, k=5, batch {batch}, bf16, {name}", f"{statistics.median(times) * 1000:.1f} ms",
                  f"x{ratio:.2f} vanilla (IQR {q1:.2f}-{q3:.2f}, {len(times)} rounds)" if name != "vanilla"
                  else f"baseline, {len(times)} rounds")


def _digits_config(sizes: Sizes, device: torch.device, tmp: Path, *overrides: str):
    from ant_ray.config import load_config

    return load_config(None, ["data.dataset=digits", f"data.resolution={sizes.resolution}",
                              f"data.channels={sizes.channels}", f"model.base={sizes.model}",
                              f"device={device.type}", f"output_dir={tmp}", *overrides])


def _train_in_process(cfg, section: str, models: list[dict], name: str, checkpoints: Path | None = None):
    """One run of the DeMe/pretrain loop in this process (no Ray); returns its session (the reports)."""
    from ant_ray.deme.finetune import train_diffusion
    from ant_ray.training import LocalSession, run_in_process

    _, session = run_in_process(train_diffusion, {
        "pipeline": cfg.worker_dump(), "section": section, "name": name, "models": models,
        "models_per_worker": len(models), "evaluation": None}, LocalSession(checkpoints))
    return session


def deme_row(check: Check) -> None:
    from ant_ray.diffusion import save_model

    sizes, device = check.sizes, check.device
    steps, batch, every = sizes.deme_steps, sizes.deme_batch, max(sizes.deme_steps // 3, 1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _digits_config(sizes, device, Path(tmp), f"finetune.steps={steps}", f"finetune.batch_size={batch}",
                             "finetune.mixed_precision=bf16", f"finetune.log_every={every}",
                             f"finetune.checkpoint_every={steps}")
        base = save_model(_model(sizes, "cpu"), Path(tmp) / "base")
        spec = {"range": [0, 250], "init_model": str(base), "teacher_model": str(base),
                "output_model": str(Path(tmp) / "specialist"), "tracking": None, "seed": 1}
        start = time.perf_counter()
        session = _train_in_process(cfg, "finetune", [spec], "gpu-check", Path(tmp) / "checkpoints")
        seconds = time.perf_counter() - start
    in_loop = [r["images_per_s"] for r in session.reports if "images_per_s" in r]
    steady = in_loop[1:] or in_loop  # the first window holds the warm-up
    check.row(f"DeMe finetune, 1 specialist with its teacher, {steps} steps x {batch}, bf16, in-process",
              f"{statistics.median(steady):,.0f} images/s in the loop",
              f"{seconds:.1f} s in all with model loads and checkpoint; {len(in_loop)} log windows")


def merge_row(check: Check) -> None:
    from ant_ray.merge import TaskVectorMerger

    device = check.device
    base = {k: v.to(device) for k, v in _model(check.sizes, "cpu").state_dict().items()}
    gen = torch.Generator(device=device).manual_seed(0)
    n = 4
    tuned = [{k: v + 0.01 * torch.randn(v.shape, generator=gen, device=device) if v.is_floating_point() else v
              for k, v in base.items()} for _ in range(n)]
    merger = TaskVectorMerger(base, tuned)
    merger.merge([1.0] * n)
    seconds = statistics.median(check.timed(lambda: merger.merge([0.9, 1.1, 0.8, 1.2]))
                                for _ in range(check.sizes.repeats * 5))
    params = sum(v.numel() for v in base.values() if v.is_floating_point())
    moved = (n + 2) * params * 4  # reads the base and N task vectors, writes the merge (float32)
    rate = moved / seconds / 1e9
    share = (f"{rate / (check.peaks['bandwidth'] * 1000):.1%} of {check.peaks['bandwidth']} TB/s"
             if check.peaks else "bandwidth unknown")
    check.row(f"merge N={n} task vectors, {check.sizes.model} ({params / 1e6:.1f}M), on the {device.type}",
              f"{seconds * 1000:.2f} ms per candidate", f"{rate:.0f} GB/s ({share})")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pcgrad_gradient(sizes: Sizes, device: torch.device, rank: int, world: int) -> torch.Tensor:
    """The model's gradient after one PCGrad step (fp32) on rank `rank`'s slice of one fixed global batch."""
    from ant_ray.ant.clustering import interval_clustering
    from ant_ray.ant.train import ClusteredStep, cluster_counts
    from ant_ray.diffusion import NoiseSchedule, build_weighting, diffusion_loss
    from ant_ray.mtl import build_mtl_method

    k, batch, T = 5, sizes.ant_batch, 1000
    intervals = interval_clustering(k, "timestep", T=T)
    schedule, weighting = NoiseSchedule.create("linear", T), build_weighting("uniform")
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand((batch, sizes.channels, sizes.resolution, sizes.resolution), generator=gen) * 2 - 1
    noise, t = torch.randn(x0.shape, generator=gen), torch.randint(0, T, (batch,), generator=gen)
    # eval(): no dropout, whose masks depend on how the batch is split (GroupNorm is per sample either way).
    model = _model(sizes, device, seed=0).eval()
    step = ClusteredStep(model=model, ddp_model=model, method=build_mtl_method("pcgrad", k),
                         optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                         scaler=torch.amp.GradScaler(device.type, enabled=False), schedule=schedule,
                         loss_fn=lambda d, a, b, c: diffusion_loss(d, a, b, c, schedule, target="epsilon",
                                                                   weighting=weighting),
                         intervals=intervals, micro_batch=batch, grad_clip=None, world_size=world,
                         autocast_dtype=None)
    mine = slice(rank * batch // world, (rank + 1) * batch // world)
    with _exact_fp32():
        step(x0[mine].to(device), t[mine].to(device), noise[mine].to(device), cluster_counts(step.cluster_ids(t), k),
             0)
    return torch.cat([p.grad.flatten() for p in model.parameters()]).cpu()


@contextlib.contextmanager
def _exact_fp32():
    """Full fp32 (no TF32) and one convolution algorithm, for an equality up to summation order: TF32's 10-bit
    mantissa or another algorithm per batch size would differ by more. The rows after it keep the defaults."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = (cudnn.allow_tf32, matmul.allow_tf32, cudnn.benchmark, cudnn.deterministic)
    cudnn.allow_tf32 = matmul.allow_tf32 = cudnn.benchmark = False
    cudnn.deterministic = True
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32, cudnn.benchmark, cudnn.deterministic = before


def _gloo_rank(rank: int, world: int, port: int, sizes: Sizes, device: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        gradient = _pcgrad_gradient(sizes, torch.device(device), rank, world)
        if rank == 0:
            save_file({"gradient": gradient}, out)
    finally:
        dist.destroy_process_group()


def distributed_rows(check: Check) -> None:
    import torch.distributed as dist
    import torch.multiprocessing as mp

    device = check.device
    if device.type == "cuda" and dist.is_nccl_available():
        start = time.perf_counter()
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        try:
            tensor = torch.full((64 * 2**20,), 2.0, device=device)  # 256 MB
            dist.all_reduce(tensor)
            check.synchronize()
            ready = time.perf_counter() - start
            seconds = statistics.median(check.timed(lambda: dist.all_reduce(tensor)) for _ in range(5))
            correct = bool((tensor == 2.0).all())
        finally:
            dist.destroy_process_group()
        check.row("NCCL, 1 rank: init + all-reduce of 256 MB", "ok" if correct else "WRONG RESULT",
                  f"init and first all-reduce {ready:.2f} s, all-reduce {seconds * 1000:.2f} ms (one rank: a "
                  f"copy-free no-op; two ranks cannot share one GPU)")
    elif device.type == "cuda":
        check.row("NCCL", "not available in this torch build", "")
    reference = _pcgrad_gradient(check.sizes, device, 0, 1)
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rank0.safetensors")
        start = time.perf_counter()
        mp.start_processes(_gloo_rank, args=(2, _free_port(), check.sizes, str(device), out), nprocs=2,
                           start_method="spawn")
        seconds = time.perf_counter() - start
        two = load_file(out)["gradient"]
    error = float((two - reference).norm() / reference.norm())
    check.row(f"PCGrad combine at k=5, 2 gloo processes on the {device.type} against 1 process",
              "equal" if error < 1e-5 else f"DIFFERENT (relative error {error:.2e})",
              f"relative error {error:.1e} (fp32; sums in another order); {seconds:.1f} s with process start-up")


def family_rows(check: Check) -> None:
    from diffusers import DiTTransformer2DModel, UNet2DConditionModel

    sizes, device = check.sizes, check.device
    batch = sizes.family_batch

    def dit_inputs(model):
        c = model.config
        return dict(hidden_states=torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, device=device),
                    timestep=torch.randint(0, 1000, (batch,), device=device),
                    class_labels=torch.randint(0, c.num_embeds_ada_norm, (batch,), device=device))

    def sd_inputs(model):
        c = model.config
        return dict(sample=torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, device=device),
                    timestep=torch.randint(0, 1000, (batch,), device=device),
                    encoder_hidden_states=torch.randn(batch, 77, c.cross_attention_dim, device=device))

    for label, cls, config, inputs in (("DiT-XL/2, 256px latents", DiTTransformer2DModel, sizes.dit, dit_inputs),
                                       ("SD v1.x UNet, 512px latents", UNet2DConditionModel, sizes.sd_unet,
                                        sd_inputs)):
        for checkpointing in (False, True):
            if check.left() < 15:
                check.row(f"{label}, training step", "skipped", "the row's budget is spent")
                continue
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            with torch.device(device):  # built on the device: an 860M model's CPU init alone takes many seconds
                model = cls(**config)
            model.train()
            if checkpointing:
                model.enable_gradient_checkpointing()
            params = sum(p.numel() for p in model.parameters())
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            args = inputs(model)
            target = torch.randn_like(next(iter(args.values())))

            def step():
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    out = model(**args).sample
                loss = torch.nn.functional.mse_loss(out[:, :target.shape[1]].float(), target)
                loss.backward()
                optimizer.step()

            step()  # warm-up: optimizer state, autotuning
            seconds = statistics.median(check.timed(step) for _ in range(sizes.repeats))
            gradient_mtl = 5 * params * 4 / 2**30
            check.row(f"{label} ({params / 1e6:,.1f}M parameters), bf16 training step, batch {batch}, gradient "
                      f"checkpointing {'on' if checkpointing else 'off'}", f"{seconds * 1000:.0f} ms",
                      f"{batch / seconds:,.1f} images/s; gradient MTL at k=5 adds a [5, P] fp32 buffer: "
                      f"{gradient_mtl:.1f} GiB (computed)")
            del model, optimizer, args


def precision_row(check: Check) -> None:
    """One small merge search's candidates (digits, trained here), scored at fp32 and bf16 sampling."""
    from scipy.stats import spearmanr

    from ant_ray.diffusion import load_model, model_denoiser
    from ant_ray.evaluation import FIDScorer
    from ant_ray.merge import TaskVectorMerger, anchor_weights, random_weights

    sizes, device = check.sizes, check.device
    digits = Sizes(model="tiny", resolution=8, channels=1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        overrides = [f"pretrain.steps={sizes.precision_pretrain_steps}", "pretrain.batch_size=128",
                     f"finetune.steps={sizes.precision_finetune_steps}", "finetune.batch_size=64",
                     f"fid.batch_size={250 if sizes is GPU else 16}", f"sampler.steps={25 if sizes is GPU else 2}"]
        cfg = _digits_config(digits, device, tmp, *overrides)
        _train_in_process(cfg, "pretrain", [{"range": None, "init_model": None, "teacher_model": None,
                                             "output_model": str(tmp / "base"), "tracking": None, "seed": 0}],
                          "pretrain")
        ranges = [[0, 250], [250, 500], [500, 750], [750, 1000]]
        _train_in_process(cfg, "finetune", [{"range": r, "init_model": str(tmp / "base"),
                                             "teacher_model": str(tmp / "base"), "output_model": str(tmp / f"s{i}"),
                                             "tracking": None, "seed": 1 + i} for i, r in enumerate(ranges)],
                          "specialists")
        model = load_model(tmp / "base").to(device).eval()
        merger = TaskVectorMerger(model.state_dict(), [load_model(tmp / f"s{i}").to(device).state_dict()
                                                       for i in range(len(ranges))])
        n = len(ranges)
        anchors = anchor_weights(n, 0.0, 1.2)
        candidates = (anchors + random_weights(n, max(sizes.precision_candidates - len(anchors), 0), 0.0, 1.2,
                                               seed=0))[:max(sizes.precision_candidates, 3)]
        low = _digits_config(digits, device, tmp, *overrides, "sampler.precision=bf16")
        scorers = {"fp32": FIDScorer(cfg, tmp / "fid", device=device), "bf16": FIDScorer(low, tmp / "fid",
                                                                                          device=device)}
        fids: dict[str, list[float]] = {name: [] for name in scorers}
        for weights in candidates:
            if check.left() < 5:
                break
            model.load_state_dict(merger.merge(weights))
            for name, scorer in scorers.items():
                fids[name].append(scorer.score(model_denoiser(model), sizes.precision_samples, seed=0))
    done = len(fids["bf16"])
    rho = spearmanr(fids["fp32"], fids["bf16"]).statistic if done >= 3 else float("nan")
    shift = statistics.median(b - a for a, b in zip(fids["fp32"], fids["bf16"])) if done else float("nan")
    check.row(f"fp32 vs bf16 sampling: FID ranking of {done} merge candidates (digits, N=4, "
              f"{sizes.precision_samples} samples, domain extractor)", f"Spearman {rho:.3f}",
              f"median FID shift bf16 - fp32 {shift:+.3f}; fp32 FIDs {min(fids['fp32']):.2f}-"
              f"{max(fids['fp32']):.2f}" if done else "no candidate scored within the budget")


PARTS = [("sampling", 150, sampling_rows), ("fid", 45, fid_rows), ("ant", 45, ant_rows), ("deme", 40, deme_row),
         ("merge", 10, merge_row), ("distributed", 45, distributed_rows), ("families", 70, family_rows),
         ("precision", 90, precision_row), ("compile", 120, compile_row)]


def main(argv: list[str] | None = None) -> list[list[str]]:
    """Print the table; return its rows (a row whose first cell starts with FAILED is a part that raised)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="every row on the CPU at toy sizes (no figures)")
    parser.add_argument("--out", type=Path, help="also write the table to OUT/gpu_check.md")
    parser.add_argument("--parts", default=",".join(name for name, _, _ in PARTS),
                        help="comma-separated parts to run (default: all)")
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
    check = Check(device, sizes, name)
    print(f"gpu_check on {name}, torch {torch.__version__}, CUDA {torch.version.cuda}, {time.strftime('%Y-%m-%d')}, "
          f"{os.cpu_count()} CPUs", flush=True)
    wanted = set(args.parts.split(","))
    for part_name, budget, part in PARTS:
        if part_name in wanted:
            check.run_part(part_name, budget, part)
    table = check.table()
    print(f"\n{table}\n\n(whole check: {time.perf_counter() - check.started:.0f} s)", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.md").write_text(table + "\n")
    return check.rows


if __name__ == "__main__":
    main()
