"""The diffusion training loop run by each Ray Train worker: pretraining and DeMe range-specialist finetuning.

One Ray Train run trains several models side by side: one for pretraining, N for DeMe's N range specialists. The
run's workers are split into groups of W workers each (ranks g*W .. g*W + W - 1 train group g's models, data parallel
with DDP over their own process group). A group trains one model, or, with ``models_per_worker`` above 1, is one
worker that trains several models in turn. One run instead of N halves the start-up cost of the finetune stage, and
packing the models into fewer workers saves a process start-up per model where workers are scarce; either way each
specialist keeps its own seed, data order, checkpoint files and MLflow run, and trains exactly as it would alone.

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
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ant_ray.config import PipelineConfig, TrainConfig
from ant_ray.data import iterate_batches, load_dataset, save_image_grid
from ant_ray.diffusion import (NoiseSchedule, build_model, build_weighting, load_model, model_denoiser,
                               per_sample_loss, sample_images, save_model, weighted_loss)
from ant_ray.evaluation import score_merged_states
from ant_ray.evaluation_plan import EvaluationPlan
from ant_ray.training import (AUTOCAST_DTYPES, DivergenceGuard, any_rank_diverged, current_session, group_members,
                              load_training_state, progress_line, save_training_state, show_progress, step_generator,
                              step_seed, update_ema)


def sample_timesteps(batch: int, T: int, time_range: tuple[int, int], p: float,
                     generator: torch.Generator) -> torch.Tensor:
    """DeMe Eq. 6: with probability p the whole batch is drawn from [0, T), otherwise from [start, end)."""
    start, end = (0, T) if torch.rand((), generator=generator).item() < p else time_range
    return torch.randint(start, end, (batch,), generator=generator)


def train_diffusion(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """The training loop of one worker: a Ray Train worker's entry point, or run in-process without Ray
    (``ant_ray.training.run_in_process``). ``loop_config`` keys:

    - pipeline: PipelineConfig dump; section: "pretrain" or "finetune" (its steps, lr, ... are used); name
    - models: one entry per model trained side by side, each {range: [start, end) or None, init_model: folder or
      None (build model.base), teacher_model: folder or None, output_model: folder for the final EMA weights,
      tracking: TrackedRun handle or None, seed}
    - models_per_worker: how many models one worker group trains in turn (default 1); above 1 a group is one worker.
      It saves the start-up of a worker process per model where workers are scarce (CPU); the models train exactly
      as they would apart.
    - evaluation: None, or an ``EvaluationPlan`` dump (FID at fixed steps, see ant_ray.evaluation)

    Returns (rank 0) a summary: the last FID and, for an inner merge-weight search, the best weights.
    """
    cfg = PipelineConfig.model_validate(loop_config["pipeline"])
    section = loop_config["section"]
    train: TrainConfig = getattr(cfg, section)
    models_spec = loop_config["models"]
    packed = int(loop_config.get("models_per_worker") or 1)
    session = current_session()
    rank, world = session.rank, session.world_size
    members = group_members(len(models_spec), packed)
    groups = len(members)
    if world % groups:
        raise ValueError(f"{world} workers cannot be split evenly over {groups} worker groups")
    per_model = world // groups
    if packed > 1 and per_model > 1:
        raise ValueError("models trained in turn by one worker cannot also be data parallel: set num_workers 1")
    group, local_rank = divmod(rank, per_model)
    group_sizes, mine = [len(m) for m in members], members[group]
    device = session.device(cfg.device)
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
    autocast_dtype = AUTOCAST_DTYPES[train.mixed_precision]
    leader = local_rank == 0  # the group's rank 0: logs, checkpoints and saves its models
    folders = _ModelFolders(device)
    specialists = [_Specialist.create(index, models_spec[index], loop_config.get("name", "train"), cfg, section,
                                      device, autocast_dtype, process_groups[group] if per_model > 1 else None,
                                      leader, folders)
                   for index in mine]
    del folders  # the teachers live on in the specialists; the weights as read are not needed any more

    start_step = 0
    with session.latest_checkpoint() as folder:
        if folder is not None:
            start_step = min(s.restore(folder) for s in specialists)
    plan = EvaluationPlan.from_dump(loop_config.get("evaluation"))
    scorer = plan.scorer(cfg, device) if plan is not None and rank == 0 else None
    template = None  # rank 0's scratch model for scoring (merged) weights

    # --- the step loop --------------------------------------------------------------------------------------
    per_rank = train.batch_size // per_model
    steps_per_epoch = len(data) // train.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{section}.batch_size ({train.batch_size}) exceeds the dataset size ({len(data)})")
    # Since the last log: images for the throughput; each model keeps its step losses, whose mean is logged as
    # `loss` (one batch's loss is too noisy to read a curve from). Checkpoints are written at log steps only.
    tick, images_seen = time.perf_counter(), 0
    started = tick
    summary: dict[str, Any] = {}
    diverged: str | None = None
    for step in range(start_step, train.steps):
        for specialist in specialists:
            step_loss = specialist.train_step(step, data, schedule, weighting, cfg, train, per_model, local_rank,
                                              steps_per_epoch)
            diverged = diverged or specialist.guard.check(step_loss, step + 1)  # a loss the scaler cannot absorb
        if (step + 1) % 10 == 0 or step + 1 == train.steps:
            if any_rank_diverged(diverged, world, device):  # every rank stops at the same step, nothing is saved
                session.report({"step": step + 1, "diverged": 1})
                return {"diverged": diverged or "another worker group's loss diverged"} if rank == 0 else None
        for specialist in specialists:
            specialist.optimizer_step(train)
        images_seen += per_rank * len(specialists)
        done = step + 1
        last = done == train.steps

        if last and leader:
            for specialist in specialists:
                # Saved before the final report: a scheduler may stop the trial as soon as it sees that result.
                save_model(specialist.ema, Path(specialist.spec["output_model"]))
        evaluate = plan is not None and plan.due(done, train.steps)
        if done % train.log_every and not last and not evaluate:
            continue
        elapsed = time.perf_counter() - tick
        throughput = images_seen * per_model / max(elapsed, 1e-9)
        seconds_per_step = (time.perf_counter() - started) / max(done - start_step, 1)
        logged = [s.log(done, train.steps, throughput / len(specialists), seconds_per_step * (train.steps - done))
                  for s in specialists]
        # What this worker reports to Ray Train (rank 0's reaches Tune): its first model's loss, all its images/s.
        metrics: dict[str, Any] = {**logged[0], "images_per_s": throughput, "step": done}
        tick, images_seen = time.perf_counter(), 0
        if evaluate:
            states = _gather_ema_states(specialists, rank, group_sizes, per_model, device)
            if rank == 0:
                template = template if template is not None else copy.deepcopy(specialists[0].ema)
                outcome = score_merged_states(plan, scorer, states, template, cfg)
                metrics.update(outcome.metrics())
                summary = {"fid": outcome.fid, "weights": outcome.weights, "step": done}
        if done % train.checkpoint_every == 0 or last:
            # The ranks agree on divergence every 10 steps only, and a checkpoint may fall between: never save a
            # diverged state (a NaN loss seen since, or weights made non-finite by this step's update).
            diverged = diverged or _non_finite_weights(specialists, section)
            if any_rank_diverged(diverged, world, device):
                session.report({"step": done, "diverged": 1})
                return {"diverged": diverged or "another worker group's loss diverged"} if rank == 0 else None
            _report_with_checkpoint(session, metrics, leader, specialists, done)
        else:
            session.report(metrics)

    if start_step >= train.steps and plan is not None:
        # Restored from the final checkpoint (the run had finished, its result was lost): report the final score.
        states = _gather_ema_states(specialists, rank, group_sizes, per_model, device)
        metrics = {"step": train.steps}
        if rank == 0:
            outcome = score_merged_states(plan, scorer, states, copy.deepcopy(specialists[0].ema), cfg)
            metrics.update(outcome.metrics())
            summary = {"fid": outcome.fid, "weights": outcome.weights, "step": train.steps}
        session.report(metrics)

    # --- after the loop (each group's leader): the loss curve and a sample grid into each model's MLflow run -----
    for specialist in specialists:
        specialist.log_curve_and_samples(schedule, data, cfg)
    return summary if rank == 0 else None


@dataclass
class _Specialist:
    """One model trained by this worker: its weights, EMA, optimizer, teacher, data order and MLflow run. Every
    random draw comes from (its seed, step, rank), so models trained in turn by one worker train exactly as they
    would apart."""

    index: int  # in the run's models: its checkpoint folder is model_<index>
    name: str  # of its progress lines and loss curve
    spec: dict
    device: torch.device
    seed: int
    time_range: tuple[int, int]
    p: float
    lam: float
    model: torch.nn.Module
    ddp_model: torch.nn.Module  # the model, or its DDP wrapper when its group is data parallel
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    guard: DivergenceGuard
    denoise: Callable
    teacher_denoise: Callable | None
    run: Any  # its MLflow run (ant_ray.tracking.TrackedRun), or None
    history: list = field(default_factory=list)  # (step, mean loss) at each log step
    batches: Iterator | None = None
    loss_sum: float = 0.0  # since the last log
    loss_steps: int = 0
    consistency: float = 0.0  # the last step's

    @classmethod
    def create(cls, index: int, spec: dict, run_name: str, cfg: PipelineConfig, section: str, device: torch.device,
               autocast_dtype, process_group, leader: bool, folders: "_ModelFolders") -> "_Specialist":
        train: TrainConfig = getattr(cfg, section)
        lam = cfg.finetune.consistency_weight if spec.get("teacher_model") else 0.0
        if spec.get("init_model"):
            model = folders.trainable(spec["init_model"])
        else:
            model = build_model(cfg.model.base, resolution=cfg.data.resolution, channels=cfg.data.channels,
                                seed=int(spec["seed"])).to(device)
        teacher = folders.frozen(spec["teacher_model"]) if lam > 0 else None
        ddp_model = model
        if process_group is not None:
            ddp_model = torch.nn.parallel.DistributedDataParallel(
                model, process_group=process_group, device_ids=[device.index] if device.type == "cuda" else None)
        scaler = torch.amp.GradScaler(device.type, enabled=train.mixed_precision == "fp16")
        return cls(
            index=index, name=spec.get("name") or run_name, spec=spec, device=device, seed=int(spec["seed"]),
            time_range=tuple(spec.get("range") or (0, cfg.diffusion.T)),
            p=cfg.finetune.p if section == "finetune" else 0.0, lam=lam, model=model, ddp_model=ddp_model,
            ema=copy.deepcopy(model).eval().requires_grad_(False),
            optimizer=torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay),
            scaler=scaler, guard=DivergenceGuard(section, tolerate_skipped_steps=scaler.is_enabled()),
            denoise=model_denoiser(ddp_model, autocast_dtype=autocast_dtype),
            teacher_denoise=model_denoiser(teacher, autocast_dtype=autocast_dtype) if teacher is not None else None,
            run=_tracked_run(spec.get("tracking")) if leader else None)

    def restore(self, folder: Path) -> int:
        """Load this model's part of the run's checkpoint; returns its step."""
        state = load_training_state(folder / f"model_{self.index}", model=self.model, ema=self.ema,
                                    optimizer=self.optimizer, device=self.device)
        self.history = state["extra"].get("history", [])
        if "scale" in state["extra"]:
            self.scaler.load_state_dict({**self.scaler.state_dict(), "scale": state["extra"]["scale"]})
        return state["step"]

    def train_step(self, step: int, data, schedule, weighting, cfg: PipelineConfig, train: TrainConfig,
                   per_model: int, local_rank: int, steps_per_epoch: int) -> float:
        """Forward and backward of one step (gradient accumulation included); returns the step's loss."""
        epoch, offset = divmod(step, steps_per_epoch)
        if self.batches is None or offset == 0:
            self.batches = itertools.islice(iterate_batches(len(data), train.batch_size, seed=self.seed, epoch=epoch,
                                                            rank=local_rank, world_size=per_model), offset, None)
        idx = next(self.batches)
        torch.manual_seed(step_seed(self.seed, step, local_rank))  # dropout masks: a resumed run redraws the same
        gen = step_generator(self.seed, step)
        per_rank = train.batch_size // per_model
        micro = per_rank // train.grad_accumulation
        mine = slice(local_rank * per_rank, (local_rank + 1) * per_rank)
        t_all = sample_timesteps(train.batch_size, cfg.diffusion.T, self.time_range, self.p, gen)[mine]
        noise_all = torch.randn((train.batch_size, *data.images.shape[1:]), generator=gen)[mine]
        self.optimizer.zero_grad(set_to_none=True)
        step_loss = step_consistency = 0.0
        for k in range(train.grad_accumulation):
            sl = slice(k * micro, (k + 1) * micro)
            x0 = data.images[idx[sl]].to(self.device)
            t = t_all[sl].to(self.device)
            noise = noise_all[sl].to(self.device)
            x_t = schedule.add_noise(x0, noise, t)
            prediction = self.denoise(x_t, t)
            loss = weighted_loss(prediction, x0, t, noise, schedule, target=cfg.diffusion.prediction,
                                 weighting=weighting).mean()
            if self.teacher_denoise is not None:
                with torch.no_grad():
                    reference = self.teacher_denoise(x_t, t)
                consistency = per_sample_loss(prediction, reference).mean()
                loss = loss + self.lam * consistency
                step_consistency += consistency.item() / train.grad_accumulation
            # Gradients are all-reduced once per step, on the last micro-batch.
            last_micro = k == train.grad_accumulation - 1
            with (self.ddp_model.no_sync() if per_model > 1 and not last_micro else nullcontext()):
                self.scaler.scale(loss / train.grad_accumulation).backward()
            step_loss += loss.item() / train.grad_accumulation
        self.loss_sum += step_loss
        self.loss_steps += 1
        self.consistency = step_consistency
        return step_loss

    def optimizer_step(self, train: TrainConfig) -> None:
        if train.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        update_ema(self.ema, self.model, train.ema_decay)

    def log(self, done: int, total_steps: int, images_per_s: float, seconds_left: float) -> dict[str, float]:
        """The metrics since the last log, into this model's MLflow run and progress line; returns them."""
        metrics = {"loss": self.loss_sum / self.loss_steps, "images_per_s": images_per_s}
        if self.teacher_denoise is not None:
            metrics["consistency"] = self.consistency
        self.history.append((done, metrics["loss"]))
        if self.run is not None:
            self.run.log_metrics(metrics, step=done)
            show_progress(progress_line(self.name, done, total_steps, metrics["loss"], images_per_s, seconds_left))
        self.loss_sum, self.loss_steps = 0.0, 0
        return metrics

    def log_curve_and_samples(self, schedule, data, cfg: PipelineConfig) -> None:
        if self.run is None or not self.history:
            return
        from ant_ray.tracking import loss_curve_figure  # MLflow and matplotlib only where a run logs

        self.run.log_figure(loss_curve_figure(*zip(*self.history), title=self.name), "loss_curve.png")
        grid = next(sample_images(model_denoiser(self.ema), schedule, 64, shape=tuple(data.images.shape[1:]),
                                  sampler=cfg.sampler.name, steps=cfg.sampler.steps, eta=cfg.sampler.eta,
                                  target=cfg.diffusion.prediction, seed=self.seed, batch_size=64, device=self.device))
        with tempfile.TemporaryDirectory() as tmp:
            self.run.log_artifact(save_image_grid(grid, Path(tmp) / "samples.png"))


class _ModelFolders:
    """The model folders a worker's models start from or are taught by, each read once: specialists trained in turn
    start from copies of one read of the pretrained weights and share one frozen teacher on the device."""

    def __init__(self, device: torch.device):
        self.device = device
        self._read: dict[str, torch.nn.Module] = {}
        self._frozen: dict[str, torch.nn.Module] = {}

    def trainable(self, folder: str) -> torch.nn.Module:
        return copy.deepcopy(self._load(folder)).to(self.device)

    def frozen(self, folder: str) -> torch.nn.Module:
        if folder not in self._frozen:
            self._frozen[folder] = copy.deepcopy(self._load(folder)).to(self.device).eval().requires_grad_(False)
        return self._frozen[folder]

    def _load(self, folder: str) -> torch.nn.Module:
        if folder not in self._read:
            self._read[folder] = load_model(folder)
        return self._read[folder]


def _gather_ema_states(specialists: list[_Specialist], rank: int, group_sizes: list[int], per_model: int,
                       device: torch.device) -> list[dict[str, torch.Tensor]] | None:
    """Rank 0 receives the EMA weights of every group leader's models (``group_sizes[g]`` from group g; point to
    point, which works with gloo and NCCL) and returns them in model order; other ranks return None."""
    own = [{k: v.detach() for k, v in s.ema.state_dict().items()} for s in specialists]
    if len(group_sizes) == 1:
        return own if rank == 0 else None
    template = own[0]
    keys = [k for k, v in template.items() if v.is_floating_point()]
    numel = sum(template[k].numel() for k in keys)
    if rank == 0:
        states = list(own)
        for g in range(1, len(group_sizes)):
            for _ in range(group_sizes[g]):
                flat = torch.empty(numel, dtype=torch.float32, device=device)
                dist.recv(flat, src=g * per_model)
                state, offset = dict(template), 0
                for k in keys:
                    n = template[k].numel()
                    state[k] = flat[offset:offset + n].view_as(template[k]).to(template[k].dtype)
                    offset += n
                states.append(state)
        return states
    if rank % per_model == 0:
        for state in own:
            dist.send(torch.cat([state[k].reshape(-1).float() for k in keys]).to(device), dst=0)
    return None


def _tracked_run(handle: dict | None):
    """The MLflow run a model logs to, or None. MLflow is imported only when there is one: a loop runs without it."""
    if not handle:
        return None
    from ant_ray.tracking import TrackedRun

    return TrackedRun(**handle)


def _non_finite_weights(specialists: list[_Specialist], section: str) -> str | None:
    """The one-line reason to stop if a specialist's weights are no longer finite, else None."""
    from ant_ray.training.divergence import TrainingDiverged, check_finite_weights

    for s in specialists:
        try:
            check_finite_weights(s.model.state_dict(), f"{section} specialist {s.index}")
        except TrainingDiverged as err:
            return str(err)
    return None


def _report_with_checkpoint(session, metrics: dict, leader: bool, specialists: list[_Specialist], step: int) -> None:
    """Every rank reports (Train V2's report is a barrier); each group's leader attaches its models' states under
    model_<index>/, and Ray gathers the ranks' files into one checkpoint folder."""
    if not leader:
        session.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for s in specialists:
            save_training_state(Path(tmp) / f"model_{s.index}", model=s.model, ema=s.ema, optimizer=s.optimizer,
                                step=step, extra={"history": s.history,
                                                  "scale": s.scaler.get_scale() if s.scaler.is_enabled() else 1.0})
        session.report(metrics, checkpoint=Path(tmp))
