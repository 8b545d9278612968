"""The diffusion training loop run by each Ray Train worker: pretraining and DeMe range-specialist finetuning.

One Ray Train run trains G models side by side: G = 1 for pretraining, G = N for DeMe's N range specialists. The
run's workers are split into G groups of W workers each (ranks g*W .. g*W + W - 1 train model g, data parallel with
DDP over their own process group). One run instead of N halves the start-up cost of the finetune stage, while each
specialist keeps its own seed, checkpoint files and MLflow run.

Pretraining is the special case of a specialist whose range is all of [0, T), with no teacher. A specialist
(DeMe Sec. 3.2) starts from the pretrained weights and, per batch, draws its timesteps from the whole [0, T) with
probability p and from its own range otherwise (Eq. 6); the consistency loss lambda * ||eps_i - eps_pre||^2
keeps it close to the frozen pretrained model (Eq. 4-5).

With an `evaluation` plan, rank 0 scores FID at fixed steps: the merged model of the G specialists (DeMe Eq. 8, task
arithmetic or the best of a few weight vectors), or the single model. That is what a search trial reports to Tune.

Read top to bottom: setup, resume, the step loop, the final save. Randomness comes from (seed, step, rank) so a
resumed run reproduces the uninterrupted one exactly.
"""

from __future__ import annotations

import copy
import itertools
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import ray.train
import torch
import torch.distributed as dist

from ant_ray.config import PipelineConfig, TrainConfig
from ant_ray.data import iterate_batches, load_dataset, save_image_grid
from ant_ray.diffusion import (NoiseSchedule, build_model, build_weighting, load_model, model_denoiser,
                               per_sample_loss, sample_images, save_model, weighted_loss)
from ant_ray.evaluation import score_merged_states
from ant_ray.evaluation_plan import EvaluationPlan
from ant_ray.tracking import TrackedRun, loss_curve_figure
from ant_ray.training import (AUTOCAST_DTYPES, DivergenceGuard, any_rank_diverged, load_training_state, progress_line,
                              save_training_state, show_progress, step_generator, step_seed, update_ema, worker_device)


def sample_timesteps(batch: int, T: int, time_range: tuple[int, int], p: float,
                     generator: torch.Generator) -> torch.Tensor:
    """DeMe Eq. 6: with probability p the whole batch is drawn from [0, T), otherwise from [start, end)."""
    start, end = (0, T) if torch.rand((), generator=generator).item() < p else time_range
    return torch.randint(start, end, (batch,), generator=generator)


def train_diffusion(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train worker entry point. ``loop_config`` keys:

    - pipeline: PipelineConfig dump; section: "pretrain" or "finetune" (its steps, lr, ... are used); name
    - models: one entry per model trained side by side, each {range: [start, end) or None, init_model: folder or
      None (build model.base), teacher_model: folder or None, output_model: folder for the final EMA weights,
      tracking: TrackedRun handle or None, seed}
    - evaluation: None, or an ``EvaluationPlan`` dump (FID at fixed steps, see ant_ray.evaluation)

    Returns (rank 0) a summary: the last FID and, for an inner merge-weight search, the best weights.
    """
    cfg = PipelineConfig.model_validate(loop_config["pipeline"])
    section = loop_config["section"]
    train: TrainConfig = getattr(cfg, section)
    models_spec = loop_config["models"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    groups = len(models_spec)
    if world % groups:
        raise ValueError(f"{world} workers cannot be split evenly over {groups} models")
    per_model = world // groups
    group, local_rank = divmod(rank, per_model)
    spec = models_spec[group]
    device = worker_device(cfg.device)
    seed = int(spec["seed"])
    if train.batch_size % (per_model * train.grad_accumulation):
        raise ValueError(f"{section}.batch_size ({train.batch_size}) must be divisible by num_workers x "
                         f"grad_accumulation ({per_model} x {train.grad_accumulation})")
    # Every rank creates every group's process group, in the same order (a torch.distributed requirement).
    process_groups = ([dist.new_group(list(range(g * per_model, (g + 1) * per_model))) for g in range(groups)]
                      if per_model > 1 else [])

    # --- setup ---------------------------------------------------------------------------------------------
    data = load_dataset(cfg.data.dataset, path=cfg.data.path, resolution=cfg.data.resolution,
                        channels=cfg.data.channels, limit=cfg.data.limit)
    schedule = NoiseSchedule.create(cfg.diffusion.schedule, cfg.diffusion.T)
    weighting = build_weighting(train.weighting.name, **train.weighting.options)
    time_range = tuple(spec.get("range") or (0, cfg.diffusion.T))
    p = cfg.finetune.p if section == "finetune" else 0.0
    lam = cfg.finetune.consistency_weight if spec.get("teacher_model") else 0.0

    if spec.get("init_model"):
        model = load_model(spec["init_model"])
    else:
        model = build_model(cfg.model.base, resolution=cfg.data.resolution, channels=cfg.data.channels, seed=seed)
    model.to(device)
    teacher = None
    if lam > 0:
        teacher = load_model(spec["teacher_model"]).to(device).eval().requires_grad_(False)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    autocast_dtype = AUTOCAST_DTYPES[train.mixed_precision]
    scaler = torch.amp.GradScaler(device.type, enabled=train.mixed_precision == "fp16")
    guard = DivergenceGuard(section, tolerate_skipped_steps=scaler.is_enabled())
    diverged: str | None = None

    start_step, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_training_state(Path(folder) / f"model_{group}", model=model, ema=ema, optimizer=optimizer,
                                        device=device)
        start_step = state["step"]
        history = state["extra"].get("history", [])
        if "scale" in state["extra"]:
            scaler.load_state_dict({**scaler.state_dict(), "scale": state["extra"]["scale"]})
    ddp_model = model
    if per_model > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, process_group=process_groups[group], device_ids=[device.index] if device.type == "cuda" else None)
    leader = local_rank == 0  # the group's rank 0: logs, checkpoints and saves its model
    run = TrackedRun(**spec["tracking"]) if spec.get("tracking") and leader else None
    plan = EvaluationPlan.from_dump(loop_config.get("evaluation"))
    scorer = plan.scorer(cfg, device) if plan is not None and rank == 0 else None
    template = None  # rank 0's scratch model for scoring (merged) weights

    # --- the step loop --------------------------------------------------------------------------------------
    per_rank = train.batch_size // per_model
    micro = per_rank // train.grad_accumulation
    steps_per_epoch = len(data) // train.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{section}.batch_size ({train.batch_size}) exceeds the dataset size ({len(data)})")
    denoise = model_denoiser(ddp_model, autocast_dtype=autocast_dtype)
    teacher_denoise = model_denoiser(teacher, autocast_dtype=autocast_dtype) if teacher is not None else None
    batches = None
    # Since the last log: images for the throughput, and the step losses whose mean is logged as `loss` (one batch's
    # loss is too noisy to read a curve from). Checkpoints are written at log steps only, so a resume starts empty.
    tick, images_seen, loss_sum, loss_steps = time.perf_counter(), 0, 0.0, 0
    started = tick
    summary: dict[str, Any] = {}
    for step in range(start_step, train.steps):
        epoch, offset = divmod(step, steps_per_epoch)
        if batches is None or offset == 0:
            batches = iterate_batches(len(data), train.batch_size, seed=seed, epoch=epoch, rank=local_rank,
                                      world_size=per_model)
            batches = itertools.islice(batches, offset, None)
        idx = next(batches)
        torch.manual_seed(step_seed(seed, step, local_rank))  # dropout masks: a resumed run redraws the same ones
        gen = step_generator(seed, step)
        mine = slice(local_rank * per_rank, (local_rank + 1) * per_rank)
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
            with (ddp_model.no_sync() if per_model > 1 and k < train.grad_accumulation - 1 else nullcontext()):
                scaler.scale(loss / train.grad_accumulation).backward()
            step_loss += loss.item() / train.grad_accumulation
        diverged = diverged or guard.check(step_loss, step + 1)  # a non-finite loss the scaler cannot absorb
        if (step + 1) % 10 == 0 or step + 1 == train.steps:
            if any_rank_diverged(diverged, world, device):  # every rank stops at the same step, nothing is saved
                ray.train.report({"step": step + 1, "diverged": 1})
                return {"diverged": diverged or "another worker group's loss diverged"} if rank == 0 else None
        if train.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        update_ema(ema, model, train.ema_decay)
        images_seen += per_rank
        loss_sum, loss_steps = loss_sum + step_loss, loss_steps + 1
        done = step + 1
        last = done == train.steps

        if last and leader:
            # Saved before the final report: a scheduler may stop the trial as soon as it sees that result.
            save_model(ema, Path(spec["output_model"]))
        evaluate = plan is not None and plan.due(done, train.steps)
        if done % train.log_every and not last and not evaluate:
            continue
        elapsed = time.perf_counter() - tick
        mean_loss = loss_sum / loss_steps
        metrics: dict[str, Any] = {"loss": mean_loss, "images_per_s": images_seen * per_model / max(elapsed, 1e-9),
                                   "step": done}
        if teacher_denoise is not None:
            metrics["consistency"] = step_consistency
        history.append((done, mean_loss))
        if run is not None:
            run.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step=done)
            seconds_per_step = (time.perf_counter() - started) / max(done - start_step, 1)
            show_progress(progress_line(spec.get("name") or loop_config.get("name", "train"), done, train.steps,
                                        mean_loss, metrics["images_per_s"], seconds_per_step * (train.steps - done)))
        tick, images_seen, loss_sum, loss_steps = time.perf_counter(), 0, 0.0, 0
        if evaluate:
            states = _gather_ema_states(ema, rank, groups, per_model, device)
            if rank == 0:
                template = template if template is not None else copy.deepcopy(ema)
                outcome = score_merged_states(plan, scorer, states, template, cfg)
                metrics.update(outcome.metrics())
                summary = {"fid": outcome.fid, "weights": outcome.weights, "step": done}
        if done % train.checkpoint_every == 0 or last:
            _report_with_checkpoint(metrics, leader, group, model, ema, optimizer, done, history, scaler)
        else:
            ray.train.report(metrics)

    if start_step >= train.steps and plan is not None:
        # Restored from the final checkpoint (the run had finished, its result was lost): report the final score.
        states = _gather_ema_states(ema, rank, groups, per_model, device)
        metrics = {"step": train.steps}
        if rank == 0:
            outcome = score_merged_states(plan, scorer, states, copy.deepcopy(ema), cfg)
            metrics.update(outcome.metrics())
            summary = {"fid": outcome.fid, "weights": outcome.weights, "step": train.steps}
        ray.train.report(metrics)

    # --- after the loop (each group's leader): the loss curve and a sample grid into its MLflow run -----------
    if leader and run is not None and history:
        run.log_figure(loss_curve_figure(*zip(*history), title=spec.get("name") or loop_config.get("name", "loss")),
                       "loss_curve.png")
        grid = next(sample_images(model_denoiser(ema), schedule, 64, shape=tuple(data.images.shape[1:]),
                                  sampler=cfg.sampler.name, steps=cfg.sampler.steps, eta=cfg.sampler.eta,
                                  target=cfg.diffusion.prediction, seed=seed, batch_size=64, device=device))
        with tempfile.TemporaryDirectory() as tmp:
            run.log_artifact(save_image_grid(grid, Path(tmp) / "samples.png"))
    return summary if rank == 0 else None


def _gather_ema_states(ema: torch.nn.Module, rank: int, groups: int, per_model: int,
                       device: torch.device) -> list[dict[str, torch.Tensor]] | None:
    """Rank 0 receives every group leader's EMA weights (point to point; works with gloo and NCCL) and returns
    them in group order; other ranks return None."""
    own = {k: v.detach() for k, v in ema.state_dict().items()}
    if groups == 1:
        return [own] if rank == 0 else None
    keys = [k for k, v in own.items() if v.is_floating_point()]
    numel = sum(own[k].numel() for k in keys)
    if rank == 0:
        states = [own]
        for g in range(1, groups):
            flat = torch.empty(numel, dtype=torch.float32, device=device)
            dist.recv(flat, src=g * per_model)
            state, offset = dict(own), 0
            for k in keys:
                n = own[k].numel()
                state[k] = flat[offset:offset + n].view_as(own[k]).to(own[k].dtype)
                offset += n
            states.append(state)
        return states
    if rank % per_model == 0:
        dist.send(torch.cat([own[k].reshape(-1).float() for k in keys]).to(device), dst=0)
    return None


def _report_with_checkpoint(metrics, leader, group, model, ema, optimizer, step, history, scaler) -> None:
    """Every rank reports (Train V2's report is a barrier); each group's leader attaches its model's state under
    model_<group>/, and Ray gathers the ranks' files into one checkpoint folder."""
    if not leader:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_training_state(Path(tmp) / f"model_{group}", model=model, ema=ema, optimizer=optimizer, step=step,
                            extra={"history": history, "scale": scaler.get_scale() if scaler.is_enabled() else 1.0})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
