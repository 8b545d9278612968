"""ANT clustered-MTL training (Go et al. 2023, Sec. 4.2), run by each Ray Train worker.

The timesteps 0..T-1 are split into k intervals (clusters); each batch's per-sample (weighted) losses are grouped by
cluster and an MTL method balances the k cluster tasks. Two kinds of method, two kinds of step:

* Loss balancing (LS, RLW, UW) and Nash-MTL between its weight refreshes: the update is a linear combination
  sum_i c_i g_i of the per-cluster mean gradients, so one forward and one backward over the batch suffice
  (``_combined_backward``).
* Gradient manipulation (PCGrad, Nash-MTL refresh steps, GradNorm, IMTL-G, CAGrad, UW+PCGrad): one forward and
  backward per cluster's sub-batch gives that cluster's gradient (``_per_cluster_gradients``). GroupNorm makes each
  sample's output independent of the rest of the batch, so the k sub-batch passes cost about one pass over the batch
  plus k small-batch overheads, instead of k full backward passes.

Data parallelism. Every rank draws the *global* batch's timesteps and noise from (seed, step) and keeps its slice, so
every rank knows the global per-cluster counts N_i without communicating. Cluster i's loss is the mean over the
global batch, L_i = sum_r S_i^r / N_i (S_i^r: rank r's sum of cluster-i per-sample losses). Hence:

* gradient methods: each rank accumulates the gradients of S_i^r into row i of a [k, P] buffer, the buffer and the
  loss sums are all-reduced (summed) with torch.distributed and divided by N_i, so every rank holds exactly the
  single-process per-cluster gradients and losses, and ``combine`` runs identically everywhere. DDP is bypassed
  (the unwrapped module is used), so no per-cluster all-reduce happens behind our back.
* linear combinations: the coefficients c_i = d objective / d L_i are computed from the all-reduced L (so the
  method's own parameters, e.g. UW's log-variances, get identical gradients on every rank), then each rank
  backpropagates sum_i c_i * W * S_i^r / N_i through DDP, whose averaging over the W ranks yields
  sum_i c_i sum_r dS_i^r / N_i = sum_i c_i g_i: the single-process gradient.

Mixed precision: bf16/fp16 autocast; with fp16 a GradScaler, under one convention: before ``scaler.unscale_`` every
``.grad`` in the optimizer (model and MTL method) holds scale x the true gradient. Per-cluster gradients are unscaled
before ``combine`` (methods see true magnitudes); a non-finite result is handed to the scaler as is, so it skips the
step and backs off exactly as in plain training. Gradient clipping acts on the model's final update direction.

Resume is exact: model, EMA, optimizer (with the method's parameters), the MTL method's state_dict (parameters,
buffers, generator state), the grad scaler and the step are checkpointed; all other randomness is a function of
(seed, step, rank).
"""

from __future__ import annotations

import copy
import itertools
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ant_ray.ant.clustering import cluster_of_timestep
from ant_ray.config import ANTConfig, PipelineConfig
from ant_ray.data import iterate_batches, load_dataset
from ant_ray.diffusion import (NoiseSchedule, build_model, build_weighting, diffusion_loss, load_model,
                               model_denoiser, model_is_complete, save_model)
from ant_ray.mtl import MTLMethod, build_mtl_method, flat_grad, flatten_grads, write_flat_grad
from ant_ray.evaluation import score_merged_states
from ant_ray.evaluation_plan import EvaluationPlan
from ant_ray.training import (AUTOCAST_DTYPES, DivergenceGuard, TrainingDiverged, any_rank_diverged,
                              current_session, load_training_state, progress_line, save_training_state, show_progress,
                              step_generator, step_seed, update_ema)

TIMESTEP_SAMPLING = ("uniform", "stratified")
_MTL_PREFIX = "mtl."  # key prefix of the MTL method's tensors in the checkpoint's extra.safetensors


# ------------------------------------------------------------------------------------------------ pure helpers


def cluster_sums(per_sample: Tensor, cluster_ids: Tensor, k: int) -> Tensor:
    """[k] sums of ``per_sample`` over the samples of each cluster (differentiable; 0 for empty clusters)."""
    if per_sample.dim() != 1 or cluster_ids.shape != per_sample.shape:
        raise ValueError(f"per_sample and cluster_ids must be 1-D of equal length, got {tuple(per_sample.shape)} "
                         f"and {tuple(cluster_ids.shape)}")
    if cluster_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"cluster_ids must be an integer tensor, got {cluster_ids.dtype}")
    return torch.zeros(k, dtype=per_sample.dtype, device=per_sample.device).index_add(0, cluster_ids, per_sample)


def cluster_counts(cluster_ids: Tensor, k: int) -> Tensor:
    """[k] int64 number of samples of each cluster; raises if an id lies outside [0, k)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if cluster_ids.numel() and int(cluster_ids.min()) < 0:
        raise ValueError(f"cluster_ids must lie in [0, {k}), got a negative id")
    counts = torch.bincount(cluster_ids.long(), minlength=k)
    if counts.numel() != k:
        raise ValueError(f"cluster_ids must lie in [0, {k}), got id {counts.numel() - 1}")
    return counts


def cluster_losses(per_sample: Tensor, cluster_ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(losses[k], counts[k]): the mean per-sample loss of each cluster and its sample count.

    A cluster absent from the batch gets loss 0 and count 0 (never NaN); use ``counts > 0`` as the MTL methods'
    ``present`` mask. Differentiable in ``per_sample``."""
    counts = cluster_counts(cluster_ids, k)
    sums = cluster_sums(per_sample, cluster_ids, k)
    return sums / counts.clamp_min(1).to(sums.dtype), counts


def sample_cluster_timesteps(batch: int, intervals: Sequence[tuple[int, int]], mode: str,
                             generator: torch.Generator) -> Tensor:
    """[batch] int64 timesteps in [0, T) for one global batch.

    ``uniform``: i.i.d. uniform over [0, T) (clusters get samples in proportion to their sizes).
    ``stratified``: every cluster gets batch // k samples, the batch % k left over go to clusters chosen at random;
    within its cluster a timestep is uniform; the batch is then shuffled so that each rank's slice mixes clusters.
    With equal-size clusters this is uniform over [0, T) in distribution but with no empty cluster once batch >= k;
    with unequal clusters (SNR/gradient clustering) it samples each cluster equally often."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    cluster_of_timestep(list(intervals))  # validates contiguity
    T, k = int(intervals[-1][1]), len(intervals)
    if mode == "uniform":
        return torch.randint(0, T, (batch,), generator=generator)
    if mode != "stratified":
        raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLING}, got {mode!r}")
    base, extra = divmod(batch, k)
    sizes = torch.full((k,), base, dtype=torch.int64)
    sizes[torch.randperm(k, generator=generator)[:extra]] += 1
    cluster = torch.repeat_interleave(torch.arange(k), sizes)
    starts = torch.tensor([s for s, _ in intervals], dtype=torch.int64)
    widths = torch.tensor([e - s for s, e in intervals], dtype=torch.int64)
    # float64 uniforms: u * width stays strictly below width after rounding.
    offset = (torch.rand(batch, generator=generator, dtype=torch.float64) * widths[cluster]).long()
    t = starts[cluster] + torch.minimum(offset, widths[cluster] - 1)
    return t[torch.randperm(batch, generator=generator)]


# ------------------------------------------------------------------------------------------------ one step


@dataclass
class StepStats:
    """What one step measured, as tensors (converted to floats only when logged, to avoid device syncs)."""
    losses: Tensor  # [k] global per-cluster mean losses (0 where absent)
    counts: Tensor  # [k] global per-cluster sample counts
    objective: Tensor  # the MTL objective (loss methods) or sum_i c_i L_i (combinations); NaN when not defined
    mean_loss: Tensor  # the plain mean per-sample loss over the global batch (comparable with vanilla training)
    per_cluster_grads: bool  # True when the step computed k per-cluster gradients


class ClusteredStep:
    """One optimizer step of clustered-MTL training on this rank's slice of the global batch (see module doc)."""

    def __init__(self, *, model: torch.nn.Module, ddp_model: torch.nn.Module, method: MTLMethod,
                 optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, schedule: NoiseSchedule,
                 loss_fn: Callable[..., Tensor], intervals: Sequence[tuple[int, int]], micro_batch: int,
                 grad_clip: float | None, world_size: int, autocast_dtype: torch.dtype | None):
        self.model, self.ddp_model, self.method = model, ddp_model, method
        self.optimizer, self.scaler, self.schedule = optimizer, scaler, schedule
        self.loss_fn = loss_fn  # (denoiser, x0, t, noise) -> [n] weighted per-sample losses
        self.k = len(intervals)
        self.micro_batch, self.grad_clip, self.world = micro_batch, grad_clip, world_size
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.denoise = model_denoiser(model, autocast_dtype=autocast_dtype)  # bypasses DDP
        self.ddp_denoise = model_denoiser(ddp_model, autocast_dtype=autocast_dtype)
        self._cluster_of = {}  # device -> [T] cluster id lookup
        self._lookup = torch.as_tensor(cluster_of_timestep(list(intervals)), dtype=torch.int64)

    def cluster_ids(self, t: Tensor) -> Tensor:
        if t.device not in self._cluster_of:
            self._cluster_of[t.device] = self._lookup.to(t.device)
        return self._cluster_of[t.device][t]

    def __call__(self, x0: Tensor, t: Tensor, noise: Tensor, global_counts: Tensor, step: int) -> StepStats:
        """x0, t, noise: this rank's slice; global_counts: [k] counts of the whole global batch (every rank knows
        them: the global timesteps come from the shared step generator)."""
        counts = global_counts.to(x0.device)
        present = counts > 0
        clusters = self.cluster_ids(t)
        self.optimizer.zero_grad(set_to_none=True)
        # The current loss scale (1.0 unless fp16); scale() also creates the scaler's state on first use.
        scale = float(self.scaler.scale(torch.ones((), device=x0.device)))

        fixed = None
        fixed_weights = getattr(self.method, "fixed_weights", None)
        if self.method.needs_grads and fixed_weights is not None:
            fixed = fixed_weights(step, present)  # Nash-MTL between refreshes: no per-cluster gradients needed
        if self.method.needs_grads and fixed is None:
            losses, objective = self._gradient_method_update(x0, t, noise, clusters, counts, present, step, scale)
        else:
            losses, objective = self._combined_backward(x0, t, noise, clusters, counts, present, scale, fixed)
            if fixed is not None:
                self._finish_fixed_direction(scale)

        self.scaler.unscale_(self.optimizer)  # a no-op unless fp16
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.scaler.step(self.optimizer)  # skipped by the scaler when a gradient is not finite
        self.scaler.update()
        mean_loss = (losses * counts).sum() / counts.sum()
        return StepStats(losses.detach(), counts, objective.detach(), mean_loss.detach(),
                         per_cluster_grads=self.method.needs_grads and fixed is None)

    # -- gradient manipulation: k per-cluster gradients, all-reduced, combined ------------------------------------

    def _per_cluster_gradients(self, x0, t, noise, clusters, scale) -> tuple[Tensor, Tensor]:
        """This rank's [k, P] gradient sums (of scale x per-sample losses) and [k] loss sums, one forward and
        backward per cluster sub-batch (split into micro-batches of at most ``micro_batch``)."""
        numel = sum(p.numel() for p in self.params)
        rows = torch.zeros(self.k, numel, dtype=torch.float32, device=x0.device)
        sums = torch.zeros(self.k, dtype=torch.float32, device=x0.device)
        local_counts = cluster_counts(clusters, self.k).tolist()
        for i in (i for i, n in enumerate(local_counts) if n > 0):
            members = torch.nonzero(clusters == i).flatten()
            for chunk in members.split(self.micro_batch):
                per_sample = self.loss_fn(self.denoise, x0[chunk], t[chunk], noise[chunk])
                sums[i] += per_sample.detach().sum()
                rows[i] += flat_grad(per_sample.sum() * scale, self.params, retain_graph=False).float()
        return rows, sums

    def _gradient_method_update(self, x0, t, noise, clusters, counts, present, step, scale):
        rows, sums = self._per_cluster_gradients(x0, t, noise, clusters, scale)
        self._all_reduce(rows)
        self._all_reduce(sums)
        denominators = counts.clamp_min(1).to(rows.dtype)
        losses = sums / denominators
        if not bool(torch.isfinite(rows).all()):
            if not self.scaler.is_enabled():
                raise TrainingDiverged(f"ant diverged: non-finite per-cluster gradients at step {step}; lower "
                                       "ant.lr (or the loss weighting's scale)")
            # Hand the overflow to the scaler: it skips this step and lowers the scale, as in plain training.
            write_flat_grad(self.params, rows.sum(0))
            return losses, torch.tensor(float("nan"), device=rows.device)
        grads = rows.div_(denominators[:, None] * scale)  # in place: the [k, P] buffer is the largest tensor here
        direction = self.method.combine(grads, losses, present, step)
        for p in self.method.parameters():  # combine wrote true gradients; the convention wants them scaled
            if p.grad is not None:
                p.grad.mul_(scale)
        write_flat_grad(self.params, direction * scale)
        return losses, torch.tensor(float("nan"), device=rows.device)

    # -- linear combinations: one backward through DDP ------------------------------------------------------------

    def _combined_backward(self, x0, t, noise, clusters, counts, present, scale, fixed: Tensor | None):
        accumulate = self.micro_batch < x0.shape[0]
        chunks = list(zip(x0.split(self.micro_batch), t.split(self.micro_batch), noise.split(self.micro_batch),
                          clusters.split(self.micro_batch)))
        # 1. this rank's per-cluster loss sums; with gradient accumulation a no-grad pre-pass, because the
        #    coefficients depend on the global losses, which are known only after every micro-batch
        if not accumulate:
            local_sums = cluster_sums(self.loss_fn(self.ddp_denoise, x0, t, noise), clusters, self.k)
        else:
            with torch.no_grad():
                local_sums = sum(cluster_sums(self.loss_fn(self.denoise, *c[:3]), c[3], self.k) for c in chunks)
        # 2. the global per-cluster mean losses, identical on every rank
        denominators = counts.clamp_min(1).to(local_sums.dtype)
        losses = self._all_reduce(local_sums.detach().clone()) / denominators
        # 3. coefficients c_i = d objective / d L_i (x scale); the method's own parameters get their gradients here
        if fixed is None:
            leaf = losses.clone().requires_grad_(True)
            objective = self.method.weighted_loss(leaf, present)
            (objective * scale).backward()
            coefficients = leaf.grad
        else:
            objective = (fixed.to(losses.dtype) * torch.where(present, losses, torch.zeros_like(losses))).sum()
            coefficients = fixed.to(losses.dtype) * scale
        # 4. sum_i c_i W S_i^r / N_i through DDP: its average over ranks is sum_i c_i g_i
        factors = (coefficients * self.world / denominators).detach()
        if not accumulate:
            (factors * local_sums).sum().backward()
        else:
            for n, (x0_c, t_c, noise_c, clusters_c) in enumerate(chunks):
                last = n == len(chunks) - 1
                with self.ddp_model.no_sync() if self.world > 1 and not last else nullcontext():
                    per_sample = self.loss_fn(self.ddp_denoise, x0_c, t_c, noise_c)
                    (factors * cluster_sums(per_sample, clusters_c, self.k)).sum().backward()
        return losses, objective.detach()

    def _finish_fixed_direction(self, scale: float) -> None:
        """Nash-MTL's fast path: apply its max-norm clip to the (all-reduced) combined gradient."""
        flat = flatten_grads(self.params)
        if bool(torch.isfinite(flat).all()):
            write_flat_grad(self.params, self.method.finish_direction(flat / scale) * scale)

    def _all_reduce(self, tensor: Tensor) -> Tensor:
        if self.world > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor


# ------------------------------------------------------------------------------------------------ the worker loop


def _step_metrics(stats: StepStats, method: MTLMethod) -> dict[str, float]:
    metrics = {"loss": float(stats.mean_loss)}
    if torch.isfinite(stats.objective):
        metrics["objective"] = float(stats.objective)
    for i, (loss, count) in enumerate(zip(stats.losses.tolist(), stats.counts.tolist())):
        if count > 0:  # an absent cluster has no loss this step: log nothing rather than a fake 0
            metrics[f"loss_cluster_{i}"] = loss
        metrics[f"count_cluster_{i}"] = float(count)
    metrics.update({f"mtl_{name}": value for name, value in method.log_values().items()})
    return metrics


def train_ant(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """The ANT loop of one worker: a Ray Train worker's entry point, or run in-process without Ray
    (``ant_ray.training.run_in_process``). ``loop_config`` keys: pipeline (PipelineConfig dump; the ``ant`` section is
    used), intervals (the k [start, end) clusters), init_model (diffusers folder or None: build model.base),
    output_dir (rank 0 writes checkpoint/, model/ and ema/ there), tracking (TrackedRun handle or None), seed, name,
    resume_from (a checkpoint folder to continue from when Ray restores none; optional), evaluation (an
    EvaluationPlan dump: rank 0 scores the EMA model's FID at fixed steps and reports it; optional).
    Returns (rank 0) a summary: steps, last per-cluster losses, mean images/s, the model folders, the last FID."""
    cfg = PipelineConfig.model_validate(loop_config["pipeline"])
    ant: ANTConfig = cfg.ant
    intervals = [(int(a), int(b)) for a, b in loop_config["intervals"]]
    if len(intervals) != ant.k or intervals[-1][1] != cfg.diffusion.T:
        raise ValueError(f"intervals must be ant.k={ant.k} contiguous ranges covering [0, {cfg.diffusion.T}), got "
                         f"{intervals}")
    session = current_session()
    rank, world = session.rank, session.world_size
    device = session.device(cfg.device)
    seed = int(loop_config.get("seed", cfg.seed))
    if ant.batch_size % (world * ant.grad_accumulation):
        raise ValueError(f"ant.batch_size ({ant.batch_size}) must be divisible by num_workers x grad_accumulation "
                         f"({world} x {ant.grad_accumulation})")
    output_dir = Path(loop_config["output_dir"])

    # --- setup ---------------------------------------------------------------------------------------------
    data = load_dataset(cfg.data.dataset, path=cfg.data.path, resolution=cfg.data.resolution,
                        channels=cfg.data.channels, limit=cfg.data.limit)
    schedule = NoiseSchedule.create(cfg.diffusion.schedule, cfg.diffusion.T)
    weighting = build_weighting(ant.weighting.name, **ant.weighting.options)
    if loop_config.get("init_model"):
        model = load_model(loop_config["init_model"], resolution=cfg.data.resolution, channels=cfg.data.channels)
    else:
        model = build_model(cfg.model.base, resolution=cfg.data.resolution, channels=cfg.data.channels, seed=seed)
    model.to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    method = build_mtl_method(ant.method, ant.k, ant.method_options).to(device)
    # The method's parameters (UW log-variances, GradNorm weights) train with the model but never decay.
    optimizer = torch.optim.AdamW([{"params": list(model.parameters()), "weight_decay": ant.weight_decay},
                                   {"params": list(method.parameters()), "weight_decay": 0.0}], lr=ant.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=ant.mixed_precision == "fp16")

    start_step, history = 0, []
    with session.latest_checkpoint() as checkpoint:
        folder = checkpoint or loop_config.get("resume_from")
        state = (load_training_state(folder, model=model, ema=ema, optimizer=optimizer, device=device)
                 if folder else None)
    if state is not None:
        method.load_state_dict({key[len(_MTL_PREFIX):]: value for key, value in state["extra_tensors"].items()
                                if key.startswith(_MTL_PREFIX)})
        if state["extra"].get("scaler"):
            scaler.load_state_dict(state["extra"]["scaler"])
        start_step, history = state["step"], state["extra"].get("history", [])
    ddp_model = session.prepare_model(model)
    run = None
    if loop_config.get("tracking") and rank == 0:
        from ant_ray.tracking import TrackedRun  # MLflow only where a run logs: the loop runs without it

        run = TrackedRun(**loop_config["tracking"])

    per_rank = ant.batch_size // world
    guard = DivergenceGuard("ant", tolerate_skipped_steps=scaler.is_enabled())
    diverged: str | None = None
    plan = EvaluationPlan.from_dump(loop_config.get("evaluation"))
    scorer = plan.scorer(cfg, device) if plan is not None and rank == 0 else None
    last_fid: float | None = None

    def evaluate(done: int) -> dict[str, float]:
        """Rank 0 scores the EMA model (the other ranks wait at the next report)."""
        nonlocal last_fid
        if rank != 0:
            return {}
        outcome = score_merged_states(plan, scorer, [ema.state_dict()], copy.deepcopy(ema), cfg)
        last_fid = outcome.fid
        return outcome.metrics()

    def loss_fn(denoise, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return diffusion_loss(denoise, x0, t, noise, schedule, target=cfg.diffusion.prediction, weighting=weighting)

    step_fn = ClusteredStep(model=model, ddp_model=ddp_model, method=method, optimizer=optimizer, scaler=scaler,
                            schedule=schedule, loss_fn=loss_fn, intervals=intervals,
                            micro_batch=per_rank // ant.grad_accumulation, grad_clip=ant.grad_clip,
                            world_size=world, autocast_dtype=AUTOCAST_DTYPES[ant.mixed_precision])

    # --- the step loop --------------------------------------------------------------------------------------
    steps_per_epoch = len(data) // ant.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"ant.batch_size ({ant.batch_size}) exceeds the dataset size ({len(data)})")
    batches = None
    tick, images_seen, run_images, run_seconds = time.perf_counter(), 0, 0, 0.0
    # The step losses since the last log, whose mean is logged as `loss` (one batch's loss is too noisy to read a
    # curve from); summed on the device, read at log steps only. Checkpoints are written at log steps, so a resume
    # starts empty.
    loss_sum, loss_steps = 0.0, 0
    started = tick
    metrics: dict[str, float] = {}
    for step in range(start_step, ant.steps):
        epoch, offset = divmod(step, steps_per_epoch)
        if batches is None or offset == 0:
            batches = iterate_batches(len(data), ant.batch_size, seed=seed, epoch=epoch, rank=rank, world_size=world)
            batches = itertools.islice(batches, offset, None)
        idx = next(batches)
        torch.manual_seed(step_seed(seed, step, rank))
        gen = step_generator(seed, step)
        t_all = sample_cluster_timesteps(ant.batch_size, intervals, ant.timestep_sampling, gen)
        noise_all = torch.randn((ant.batch_size, *data.images.shape[1:]), generator=gen)
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        try:
            stats = step_fn(data.images[idx].to(device), t_all[mine].to(device), noise_all[mine].to(device),
                            cluster_counts(step_fn.cluster_ids(t_all), ant.k), step)
        except TrainingDiverged as err:  # non-finite per-cluster gradients (the same on every rank: all-reduced)
            diverged = str(err)
        else:
            loss_sum, loss_steps = loss_sum + stats.mean_loss, loss_steps + 1
        update_ema(ema, model, ant.ema_decay)
        images_seen += ant.batch_size
        done = step + 1
        last = done == ant.steps
        # Periodic (a float() syncs the device), and before every checkpoint (never save a diverged state); at once
        # after non-finite gradients, which every rank saw alike.
        if diverged or done % 10 == 0 or last or done % ant.checkpoint_every == 0:
            diverged = diverged or guard.check(float(stats.mean_loss), done)
            if any_rank_diverged(diverged, world, device):  # every rank stops at the same step, nothing is saved
                session.report({"step": done, "diverged": 1})
                return {"diverged": diverged or "another worker's loss diverged"} if rank == 0 else None

        if last and rank == 0:
            # Saved before the final report: a scheduler may stop the trial as soon as it sees that result.
            save_model(ema, output_dir / "ema")
            save_model(model, output_dir / "model")
        due = plan is not None and plan.due(done, ant.steps)
        if done % ant.log_every == 0 or last or due:
            elapsed = time.perf_counter() - tick
            metrics = {**_step_metrics(stats, method), "loss": float(loss_sum) / loss_steps,
                       "images_per_s": images_seen / max(elapsed, 1e-9)}
            run_images, run_seconds = run_images + images_seen, run_seconds + elapsed
            history.append((done, metrics["loss"]))
            if run is not None:
                run.log_metrics(metrics, step=done)
                seconds_per_step = (time.perf_counter() - started) / max(done - start_step, 1)
                show_progress(progress_line(loop_config.get("name", "ant"), done, ant.steps, metrics["loss"],
                                            metrics["images_per_s"], seconds_per_step * (ant.steps - done)))
            report = {**metrics, "step": done, **(evaluate(done) if due else {})}
            if done % ant.checkpoint_every == 0 or last:
                _report_with_checkpoint(session, report, output_dir / "checkpoint", model=model, ema=ema,
                                        optimizer=optimizer, method=method, scaler=scaler, step=done,
                                        history=history)
            else:
                session.report(report)
            tick, images_seen, loss_sum, loss_steps = time.perf_counter(), 0, 0.0, 0

    if start_step >= ant.steps and plan is not None:
        # Restored from the final checkpoint (the run had finished, its result was lost): report the final score.
        session.report({"step": ant.steps, **evaluate(ant.steps)})

    # --- after the loop (rank 0): the loss curve; the models were saved at the last step ----------------------
    if rank != 0:
        return None
    ema_dir, model_dir = output_dir / "ema", output_dir / "model"
    if start_step >= ant.steps and not model_is_complete(ema_dir):
        save_model(ema, ema_dir)
        save_model(model, model_dir)
    if run is not None and history:
        from ant_ray.tracking import loss_curve_figure

        run.log_figure(loss_curve_figure(*zip(*history), title=loop_config.get("name", "ANT loss")),
                       "loss_curve.png")
    return {"steps": ant.steps, "start_step": start_step, "ema_model": str(ema_dir), "model": str(model_dir),
            "cluster_losses": {k: v for k, v in metrics.items() if k.startswith("loss_cluster_")},
            "images_per_s": run_images / run_seconds if run_seconds > 0 else None, "fid": last_fid}


def _report_with_checkpoint(session, metrics: dict, folder: Path, *, model, ema, optimizer, method, scaler,
                            step: int, history: list) -> None:
    """Every rank reports (Train V2's report is a barrier); rank 0 writes the state into the run directory (so a
    run can also be continued outside Ray with ``resume_from``) and attaches it, which Ray copies to its storage."""
    if session.rank != 0:
        session.report(metrics)
        return
    save_training_state(folder, model=model, ema=ema, optimizer=optimizer, step=step,
                        extra={"history": history, "scaler": scaler.state_dict()},
                        extra_tensors={f"{_MTL_PREFIX}{k}": v for k, v in method.state_dict().items()})
    session.report(metrics, checkpoint=folder)
