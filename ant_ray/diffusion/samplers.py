"""DDIM (Song et al. 2021) and DDPM ancestral sampling over a respaced timestep grid.

Deterministic under a seed: all noise is drawn on the CPU from one torch.Generator, so the same seed gives the
same images on any device. Batched: `sample_images(n, batch_size=...)` streams batches.

Conditioning, as DiT's model_kwargs: `cond` (one row per image) goes to a denoiser (x_t, t, cond), with
classifier-free guidance at `guidance_scale` against `null_cond` (guidance.py). A learned-sigma model's output has
2C channels: both samplers use the first C (the eps-type half); DDPM also uses the last C, the learned variance.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch

from ant_ray.registry import Registry

from .guidance import ConditionalDenoiser, conditioned_denoiser
from .loss import Denoiser
from .parameterization import predict_x0_eps
from .schedules import NoiseSchedule

SAMPLERS: Registry = Registry("sampler")


def timestep_grid(T: int, steps: int) -> list[int]:
    """`steps` evenly spaced timesteps from T-1 down to 0 (both ends included; rounding keeps them distinct because
    the spacing (T-1)/(steps-1) is >= 1). One step starts from pure noise, so it is [T-1], not [0]."""
    if not 1 <= steps <= T:
        raise ValueError(f"sampler.steps must be in [1, {T}], got {steps}")
    if steps == 1:
        return [T - 1]
    grid = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long().unique().flip(0)
    return grid.tolist()


@torch.no_grad()
def _respaced_loop(denoiser: Denoiser, schedule: NoiseSchedule, noise: torch.Tensor, *, steps: int, eta: float,
                   target: str, generator: torch.Generator, clip: bool,
                   learned_variance: bool = False) -> torch.Tensor:
    abar_all = schedule.alphas_cumprod
    x = noise
    channels = x.shape[1]
    grid = timestep_grid(schedule.T, steps)
    for i, t in enumerate(grid):
        abar_t = abar_all[t]
        abar_prev = abar_all[grid[i + 1]] if i + 1 < len(grid) else torch.tensor(1.0, dtype=torch.float64)
        a_t, s_t = abar_t.sqrt().item(), (1 - abar_t).sqrt().item()
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        output = denoiser(x, t_batch).float()
        prediction = output[:, :channels]  # learned sigma: the eps-type half
        x0, eps = predict_x0_eps(prediction, x, torch.tensor(a_t), torch.tensor(s_t), target)
        if clip:
            x0 = x0.clamp(-1, 1)
            eps = (x - a_t * x0) / s_t
        if learned_variance and output.shape[1] == 2 * channels:
            x = _learned_variance_step(x, x0, output[:, channels:], abar_t, abar_prev, generator,
                                       last=i + 1 == len(grid))
            continue
        # DDIM Eq. 12/16: sigma interpolates between deterministic DDIM (eta=0) and DDPM ancestral (eta=1).
        sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).clamp_min(0).sqrt().item()
        direction = (1 - abar_prev - sigma**2).clamp_min(0).sqrt().item()
        x = abar_prev.sqrt().item() * x0 + direction * eps
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator).to(x.device)
    return x


def _learned_variance_step(x: torch.Tensor, x0: torch.Tensor, variance_output: torch.Tensor, abar_t: torch.Tensor,
                           abar_prev: torch.Tensor, generator: torch.Generator, *, last: bool) -> torch.Tensor:
    """One ancestral step of the respaced chain with IDDPM's learned variance (as DiT / ANT sample): the posterior
    mean mu~(x0_hat, x_t) and log Sigma = f log beta' + (1 - f) log beta~', f = (v + 1) / 2, where beta' =
    1 - abar_t / abar_prev is the respaced step's beta (IDDPM's respacing). The last step returns the mean."""
    beta = (1 - abar_t / abar_prev).item()
    mean = (abar_prev.sqrt().item() * beta / (1 - abar_t).item() * x0
            + math.sqrt(1 - beta) * (1 - abar_prev).item() / (1 - abar_t).item() * x)
    if last:  # abar_prev = 1: beta~' = 0 and the mean is x0_hat; no noise, as in DDPM
        return mean
    beta_tilde = (1 - abar_prev).item() / (1 - abar_t).item() * beta
    frac = (variance_output + 1) / 2
    log_variance = frac * math.log(beta) + (1 - frac) * math.log(beta_tilde)
    return mean + torch.exp(0.5 * log_variance) * torch.randn(x.shape, generator=generator).to(x.device)


@SAMPLERS.register("ddim")
def ddim(denoiser: ConditionalDenoiser, schedule: NoiseSchedule, noise: torch.Tensor, *, steps: int = 50,
         eta: float = 0.0, target: str = "epsilon", generator: torch.Generator, clip: bool = True,
         cond: torch.Tensor | None = None, null_cond: torch.Tensor | None = None,
         guidance_scale: float = 1.0) -> torch.Tensor:
    """`cond` / `null_cond` hold one row per image of `noise`; without cond the denoiser is called as (x_t, t)."""
    return _respaced_loop(conditioned_denoiser(denoiser, cond, null_cond, guidance_scale), schedule, noise,
                          steps=steps, eta=eta, target=target, generator=generator, clip=clip)


@SAMPLERS.register("ddpm")
def ddpm(denoiser: ConditionalDenoiser, schedule: NoiseSchedule, noise: torch.Tensor, *, steps: int | None = None,
         eta: float = 1.0, target: str = "epsilon", generator: torch.Generator, clip: bool = True,
         cond: torch.Tensor | None = None, null_cond: torch.Tensor | None = None,
         guidance_scale: float = 1.0) -> torch.Tensor:
    """Ancestral sampling with the posterior variance beta~_t (exact DDPM when steps = T; respaced otherwise), or,
    for a learned-sigma model (2C output channels), with the variance it learned (IDDPM / DiT sampling).
    `eta` is accepted for a uniform sampler signature and ignored: DDPM is DDIM's eta = 1."""
    return _respaced_loop(conditioned_denoiser(denoiser, cond, null_cond, guidance_scale), schedule, noise,
                          steps=steps or schedule.T, eta=1.0, target=target, generator=generator, clip=clip,
                          learned_variance=True)


def sample_images(denoiser: ConditionalDenoiser, schedule: NoiseSchedule, n: int, *, shape: tuple[int, int, int],
                  sampler: str = "ddim", steps: int = 50, eta: float = 0.0, target: str = "epsilon",
                  seed: int = 0, batch_size: int = 256, device: torch.device | str = "cpu",
                  clip: bool = True, cond: torch.Tensor | None = None, null_cond: torch.Tensor | None = None,
                  guidance_scale: float = 1.0) -> Iterator[torch.Tensor]:
    """Yield batches of n images in [-1, 1] (on `device`). One CPU generator drives the initial noise and the
    sampler's noise in a fixed order, so (seed, n, batch_size) fixes the result on any device.

    `cond` (and `null_cond` for guidance_scale != 1) hold n rows, image i getting row i; the draws of the
    generator do not depend on them, so the same seed gives the same noise with or without a condition.

    The images are NOT invariant to batch_size: batch by batch, the generator draws a batch's initial noise and
    then its per-step noise, so another split hands the same random numbers to other images and steps (stochastic
    samplers differ; deterministic DDIM differs too whenever torch's randn does not split evenly). Callers that
    compare scores keep batch_size fixed (FID already seeds each of its batches separately)."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"sampling needs n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    for name, rows in (("cond", cond), ("null_cond", null_cond)):
        if rows is not None and rows.shape[0] != n:
            raise ValueError(f"{name} needs one row per image ({n}), got {rows.shape[0]}")
    sample_fn = SAMPLERS.get(sampler)
    generator = torch.Generator().manual_seed(seed)
    done = 0
    while done < n:
        b = min(batch_size, n - done)
        noise = torch.randn((b, *shape), generator=generator).to(device)
        rows = slice(done, done + b)
        images = sample_fn(denoiser, schedule, noise, steps=steps, eta=eta, target=target, generator=generator,
                           clip=clip, cond=None if cond is None else cond[rows].to(device),
                           null_cond=None if null_cond is None else null_cond[rows].to(device),
                           guidance_scale=guidance_scale)
        done += b
        yield images.clamp(-1, 1)


def model_denoiser(model: torch.nn.Module, *, autocast_dtype: torch.dtype | None = None) -> ConditionalDenoiser:
    """Wrap a model of any family (or its DDP wrapper) as a denoiser (x_t, t, cond=None), optionally under
    autocast (bf16/fp16 on GPU). cond=None is the unconditional call (the null label on a conditional model), so
    today's (x_t, t) callers are unchanged. The raw output: 2C channels for a learned-sigma model."""
    from .families import family_of

    family = family_of(model)

    def denoise(x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if autocast_dtype is None:  # no autocast(enabled=False) here: it would switch off a caller's autocast
            return family.denoise(model, x_t, t, cond)
        with torch.autocast(x_t.device.type, dtype=autocast_dtype):
            return family.denoise(model, x_t, t, cond)

    return denoise


def routed_denoiser(ranges: list[tuple[int, int]], denoisers: list[ConditionalDenoiser]) -> ConditionalDenoiser:
    """DeMe's ensemble ('before merge'): each timestep goes to the denoiser whose [start, end) range holds it,
    with its rows of the condition when there is one."""
    if len(ranges) != len(denoisers):
        raise ValueError("routed_denoiser needs one denoiser per range")
    # Overlapping ranges would send a timestep to two specialists (the later silently winning); reject them.
    ordered = sorted(ranges)
    for (start, end) in ordered:
        if not start < end:
            raise ValueError(f"routed_denoiser range [{start}, {end}) is empty; each range needs start < end")
    for (_, end), (start, _) in zip(ordered, ordered[1:]):
        if start < end:
            raise ValueError(f"routed_denoiser ranges {ranges} overlap; give each timestep to one specialist")

    def denoise(x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        out = None
        covered = torch.zeros_like(t, dtype=torch.bool)
        for (start, end), fn in zip(ranges, denoisers):
            mask = (t >= start) & (t < end)
            if mask.any():
                pred = fn(x_t[mask], t[mask]) if cond is None else fn(x_t[mask], t[mask], cond[mask])
                if out is None:
                    out = torch.empty((x_t.shape[0], *pred.shape[1:]), dtype=pred.dtype, device=pred.device)
                out[mask] = pred
                covered |= mask
        if not bool(covered.all()):
            missing = t[~covered].unique().tolist()
            raise ValueError(f"the specialists' ranges {ranges} do not cover timesteps {missing}")
        return out

    return denoise


SampleFn = Callable[[int, int], torch.Tensor]
