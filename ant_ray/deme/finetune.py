"""The diffusion training loop run by each Ray Train worker: pretraining and DeMe range-specialist finetuning.

Pretraining is the special case of a specialist whose range is all of [0, T), with no teacher. A specialist
(DeMe Sec. 3.2) starts from the pretrained weights and, per batch, draws its timesteps from the whole [0, T) with
probability p and from its own range otherwise (Eq. 6); the consistency loss lambda * ||eps_i - eps_pre||^2
keeps it close to the frozen pretrained model (Eq. 4-5).

Read top to bottom: setup, resume, the step loop, the final save. Randomness comes from (seed, step, rank) so a
resumed run reproduces the uninterrupted one exactly.
"""

from __future__ import annotations

import copy
import itertools
from contextlib import nullcontext
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from ant_ray.config import PipelineConfig, TrainConfig
from ant_ray.data import iterate_batches, load_dataset, save_image_grid
from ant_ray.diffusion import (NoiseSchedule, build_model, build_weighting, load_model, model_denoiser,
                               per_sample_loss, sample_images, save_model, weighted_loss)
from ant_ray.tracking import TrackedRun, loss_curve_figure
from ant_ray.training import (AUTOCAST_DTYPES, load_training_state, save_training_state, step_generator, step_seed,
                              update_ema)

def sample_timesteps(batch: int, T: int, time_range: tuple[int, int], p: float,
                     generator: torch.Generator) -> torch.Tensor:
    """DeMe Eq. 6: with probability p the whole batch is drawn from [0, T), otherwise from [start, end)."""
    start, end = (0, T) if torch.rand((), generator=generator).item() < p else time_range
    return torch.randint(start, end, (batch,), generator=generator)


def train_diffusion(loop_config: dict[str, Any]) -> None:
    """Ray Train worker entry point. `loop_config` keys: pipeline (PipelineConfig dump), section ("pretrain" or
    "finetune"), range [start, end), init_model (folder or None), teacher_model (folder or None), output_model
    (folder for the final EMA weights), tracking (TrackedRun handle or None), seed, name."""
    cfg = PipelineConfig.model_validate(loop_config["pipeline"])
    train: TrainConfig = getattr(cfg, loop_config["section"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.device != "cpu" else torch.device("cpu")
    seed = int(loop_config["seed"])
    if train.batch_size % (world * train.grad_accumulation):
        raise ValueError(f"{loop_config['section']}.batch_size ({train.batch_size}) must be divisible by "
                         f"num_workers x grad_accumulation ({world} x {train.grad_accumulation})")

    # --- setup ---------------------------------------------------------------------------------------------
    data = load_dataset(cfg.data.dataset, path=cfg.data.path, resolution=cfg.data.resolution,
                        channels=cfg.data.channels, limit=cfg.data.limit)
    schedule = NoiseSchedule.create(cfg.diffusion.schedule, cfg.diffusion.T)
    weighting = build_weighting(train.weighting.name, **train.weighting.options)
    time_range = tuple(loop_config.get("range") or (0, cfg.diffusion.T))
    p = cfg.finetune.p if loop_config["section"] == "finetune" else 0.0
    lam = cfg.finetune.consistency_weight if loop_config.get("teacher_model") else 0.0

    if loop_config.get("init_model"):
        model = load_model(loop_config["init_model"])
    else:
        model = build_model(cfg.model.base, resolution=cfg.data.resolution, channels=cfg.data.channels, seed=seed)
    model.to(device)
    teacher = None
    if lam > 0:
        teacher = load_model(loop_config["teacher_model"]).to(device).eval().requires_grad_(False)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    autocast_dtype = AUTOCAST_DTYPES[train.mixed_precision]
    scaler = torch.amp.GradScaler(device.type, enabled=train.mixed_precision == "fp16")

    start_step, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_training_state(folder, model=model, ema=ema, optimizer=optimizer, device=device)
        start_step = state["step"]
        history = state["extra"].get("history", [])
        if "scale" in state["extra"]:
            scaler.load_state_dict({**scaler.state_dict(), "scale": state["extra"]["scale"]})
    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model
    run = TrackedRun(**loop_config["tracking"]) if loop_config.get("tracking") and rank == 0 else None

    # --- the step loop --------------------------------------------------------------------------------------
    per_rank = train.batch_size // world
    micro = per_rank // train.grad_accumulation
    steps_per_epoch = len(data) // train.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{loop_config['section']}.batch_size ({train.batch_size}) exceeds the dataset size "
                         f"({len(data)})")
    denoise = model_denoiser(ddp_model, autocast_dtype=autocast_dtype)
    teacher_denoise = model_denoiser(teacher, autocast_dtype=autocast_dtype) if teacher is not None else None
    batches = None
    tick, images_seen = time.perf_counter(), 0
    for step in range(start_step, train.steps):
        epoch, offset = divmod(step, steps_per_epoch)
        if batches is None or offset == 0:
            batches = iterate_batches(len(data), train.batch_size, seed=seed, epoch=epoch, rank=rank,
                                      world_size=world)
            batches = itertools.islice(batches, offset, None)
        idx = next(batches)
        torch.manual_seed(step_seed(seed, step, rank))  # dropout masks: a resumed run redraws the same ones
        gen = step_generator(seed, step)
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        t_all = sample_timesteps(train.batch_size, cfg.diffusion.T, time_range, p, gen)[mine]
        noise_all = torch.randn((train.batch_size, *data.images.shape[1:]), generator=gen)[mine]
        optimizer.zero_grad(set_to_none=True)
        step_loss = step_consistency = 0.0
        for k in range(train.grad_accumulation):
            sl = slice(k * micro, (k + 1) * micro)
            x0 = data.images[idx[sl]].to(device)
            t = t_all[sl].to(device)
            noise = noise_all[sl].to(device)
            x_t = schedule.add_noise(x0, noise, t)
            prediction = denoise(x_t, t)
            loss = weighted_loss(prediction, x0, t, noise, schedule, target=cfg.diffusion.prediction,
                                 weighting=weighting).mean()
            if teacher_denoise is not None:
                with torch.no_grad():
                    reference = teacher_denoise(x_t, t)
                consistency = per_sample_loss(prediction, reference).mean()
                loss = loss + lam * consistency
                step_consistency += consistency.item() / train.grad_accumulation
            # Gradients are all-reduced once per step, on the last micro-batch.
            with (ddp_model.no_sync() if world > 1 and k < train.grad_accumulation - 1 else nullcontext()):
                scaler.scale(loss / train.grad_accumulation).backward()
            step_loss += loss.item() / train.grad_accumulation
        if train.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        update_ema(ema, model, train.ema_decay)
        images_seen += per_rank
        done = step + 1

        if done % train.log_every == 0 or done == train.steps:
            elapsed = time.perf_counter() - tick
            metrics = {"loss": step_loss, "images_per_s": images_seen * world / max(elapsed, 1e-9),
                       "step": done}
            if teacher_denoise is not None:
                metrics["consistency"] = step_consistency
            history.append((done, step_loss))
            if run is not None:
                run.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step=done)
                print(f"[{loop_config.get('name', 'train')}] step {done}/{train.steps} loss {step_loss:.4f} "
                      f"{metrics['images_per_s']:.0f} img/s", flush=True)
            tick, images_seen = time.perf_counter(), 0
            if done % train.checkpoint_every == 0 or done == train.steps:
                _report_with_checkpoint(metrics, rank, model, ema, optimizer, done, history, scaler)
            else:
                ray.train.report(metrics)

    # --- the final save (rank 0): EMA weights in diffusers format, a sample grid and the loss curve -----------
    if rank == 0:
        out = Path(loop_config["output_model"])
        save_model(ema, out)
        if run is not None and history:
            run.log_figure(loss_curve_figure(*zip(*history), title=loop_config.get("name", "loss")),
                           "loss_curve.png")
            grid = next(sample_images(model_denoiser(ema), schedule, 64, shape=tuple(data.images.shape[1:]),
                                      sampler=cfg.sampler.name, steps=cfg.sampler.steps, eta=cfg.sampler.eta,
                                      target=cfg.diffusion.prediction, seed=seed, batch_size=64, device=device))
            with tempfile.TemporaryDirectory() as tmp:
                run.log_artifact(save_image_grid(grid, Path(tmp) / "samples.png"))


def _report_with_checkpoint(metrics, rank, model, ema, optimizer, step, history, scaler) -> None:
    """Every rank reports (Train V2's report is a barrier); only rank 0 attaches the checkpoint."""
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_training_state(Path(tmp) / "state", model=model, ema=ema, optimizer=optimizer, step=step,
                                     extra={"history": history, "scale": scaler.get_scale()
                                            if scaler.is_enabled() else 1.0})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
