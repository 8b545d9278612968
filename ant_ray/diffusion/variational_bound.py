"""IDDPM's variational-bound term for learned sigma (Nichol & Dhariwal 2021, Sec. 3.1), per sample.

A learned-sigma model outputs [mean half; v half]. The v half interpolates the reverse-process variance between
its two natural bounds: log Sigma_t = f log beta_t + (1 - f) log beta~_t, with f = (v + 1) / 2, i.e. the network's
raw output in [-1, 1] spans [beta~_t, beta_t] (the paper writes the interpolation weight v directly; IDDPM's,
ADM's and DiT's code feed it the raw output this way, so we do too and their checkpoints mean the same thing).

L_t = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, and the discretized Gaussian decoder's negative
log-likelihood of x_0 at t = 0 (DDPM Sec. 3.3: 256 bins of width 2/255 over [-1, 1], the outer bins open-ended).
Both are averaged over dimensions and reported in bits, as the reference code does. The mean half enters
stop-gradient: the term trains the variance only ("don't let it affect our mean prediction"), while L_simple trains
the mean.

The hybrid loss is L_simple + vb_weight(schedule) * L_t. The paper's L_hybrid = L_simple + lambda L_vlb with
lambda = 0.001 and L_vlb = sum over the T terms; with t drawn uniformly that is T / 1000 times one term, the
`num_timesteps / 1000` of IDDPM's and ADM's code (DiT's code uses 1, the same at DiT's T = 1000).

Reference-code differences: the decoder here uses the exact normal CDF (torch.special.ndtr), where the reference
code uses a tanh approximation of it; the two differ by about 1e-4 in probability. As in the reference code, the
model's log-variance at t = 0 uses beta~_1 in place of beta~_0 = 0 (log 0 is undefined).
"""

from __future__ import annotations

import math

import torch

from .parameterization import predict_x0_eps
from .schedules import NoiseSchedule

BIN = 1.0 / 255.0  # half the width of one of the 256 intensity levels of data in [-1, 1]


def vb_weight(schedule: NoiseSchedule) -> float:
    """The weight of the per-sample term in the hybrid loss: lambda * T with IDDPM's lambda = 0.001."""
    return schedule.T / 1000.0


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(bin of x) under N(mean, e^(2 log_scale)), elementwise in nats; x on the 256-level grid in [-1, 1]."""
    inv_std = torch.exp(-log_scale)
    upper, lower = inv_std * (x - mean + BIN), inv_std * (x - mean - BIN)
    # Phi(upper) - Phi(lower), taken in the tail where it does not cancel: above the mean, 1-Phi(l) - (1-Phi(u)).
    mass = torch.where(lower > 0, torch.special.ndtr(-lower) - torch.special.ndtr(-upper),
                       torch.special.ndtr(upper) - torch.special.ndtr(lower))
    return torch.where(x < -0.999, torch.special.log_ndtr(upper),           # the lowest bin reaches -inf
                       torch.where(x > 0.999, torch.special.log_ndtr(-lower),  # the highest bin reaches +inf
                                   torch.log(mass.clamp_min(1e-12))))


def _at(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] (float64 schedule quantities) as float32, shaped to broadcast against `like`."""
    return values.to(like.device)[t.to(like.device)].float().view((-1,) + (1,) * (like.dim() - 1))


def posterior_log_variance_clipped(schedule: NoiseSchedule) -> torch.Tensor:
    """log beta~_t with beta~_0 (= 0) replaced by beta~_1."""
    variance = schedule.posterior_variance
    return torch.log(torch.cat([variance[1:2], variance[1:]]))


def learned_log_variance(variance_output: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """log Sigma_t = f log beta_t + (1 - f) log beta~_t with f = (output + 1) / 2."""
    frac = (variance_output.float() + 1.0) / 2.0
    max_log = _at(torch.log(schedule.betas), t, variance_output)
    min_log = _at(posterior_log_variance_clipped(schedule), t, variance_output)
    return frac * max_log + (1.0 - frac) * min_log


def posterior_mean(x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """mu~_t(x_t, x_0) = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0
                      + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t."""
    abar, abar_prev, betas = schedule.alphas_cumprod, schedule.alphas_cumprod_prev, schedule.betas
    coef_x0 = _at(abar_prev.sqrt() * betas / (1.0 - abar), t, x_t)
    coef_xt = _at((1.0 - betas).sqrt() * (1.0 - abar_prev) / (1.0 - abar), t, x_t)
    return coef_x0 * x0 + coef_xt * x_t


def vb_terms(mean_output: torch.Tensor, variance_output: torch.Tensor, x0: torch.Tensor,
                      x_t: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule, *,
                      target: str = "epsilon") -> torch.Tensor:
    """The per-sample term L_t [B] in bits for x_t = add_noise(x0, noise, t): KL for t > 0, decoder NLL at t = 0.

    `mean_output` is the model's first C channels (its `target` prediction; gradient stopped here),
    `variance_output` the last C (the v that sets the variance; gradient flows)."""
    x0, x_t = x0.float(), x_t.float()
    a, s = schedule.coefficients(t, x_t)
    x0_hat, _ = predict_x0_eps(mean_output.detach().float(), x_t, a, s, target)  # no clipping, as in training
    model_mean = posterior_mean(x0_hat, x_t, t, schedule)
    model_log_variance = learned_log_variance(variance_output, t, schedule)

    true_mean = posterior_mean(x0, x_t, t, schedule)
    true_log_variance = _at(posterior_log_variance_clipped(schedule), t, x_t)
    kl = normal_kl(true_mean, true_log_variance, model_mean, model_log_variance).flatten(1).mean(1)
    decoder_nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance).flatten(1).mean(1)
    return torch.where(t.to(x_t.device) == 0, decoder_nll, kl) / math.log(2.0)
