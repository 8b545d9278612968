"""Noise schedules: betas -> cumulative alphas -> exact SNR(t) = abar_t / (1 - abar_t).

Timesteps are 0-indexed, t in [0, T). Quantities are kept in float64 so SNR is exact to the schedule's own
definition; `to(device)` hands out float32 copies for the training and sampling hot paths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ant_ray.registry import Registry

SCHEDULES: Registry = Registry("noise schedule")


@SCHEDULES.register("linear")
def linear_betas(T: int) -> torch.Tensor:
    # DDPM (Ho et al. 2020): betas linear from 1e-4 to 0.02 at T=1000, rescaled for other T as in improved DDPM.
    scale = 1000.0 / T
    return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)


@SCHEDULES.register("scaled_linear")
def scaled_linear_betas(T: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    # Latent diffusion / Stable Diffusion: sqrt(beta) linear, beta = linspace(sqrt(start), sqrt(end), T)^2, with
    # SD v1's 0.00085 -> 0.012 (diffusers' "scaled_linear"; not rescaled for T != 1000, as diffusers does not).
    return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2


# "squaredcos_cap_v2" is diffusers' and DiT's name for IDDPM's cosine schedule (ANT's DiT code uses it).
@SCHEDULES.register("squaredcos_cap_v2")
@SCHEDULES.register("cosine")
def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    # Nichol & Dhariwal 2021: abar(t) = f(t)/f(0), f(t) = cos^2(((t/T)+s)/(1+s) * pi/2); betas clipped at 0.999
    # so the last step keeps a (tiny) positive SNR.
    def f(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float64)


@dataclass(frozen=True)
class NoiseSchedule:
    name: str
    betas: torch.Tensor  # float64 [T]

    @classmethod
    def create(cls, name: str = "linear", T: int = 1000, **options: float) -> "NoiseSchedule":
        """`options` go to the schedule (scaled_linear's beta_start / beta_end, e.g. LDM FFHQ's 0.0015 / 0.0195)."""
        if not isinstance(T, int) or T < 2:
            raise ValueError(f"diffusion.T must be an integer >= 2, got {T!r}")
        return cls(name=name, betas=SCHEDULES.get(name)(T, **options))

    @property
    def alphas_cumprod_prev(self) -> torch.Tensor:
        """abar_{t-1}, with abar_{-1} = 1 (x_{-1} is the data)."""
        abar = self.alphas_cumprod
        return torch.cat([abar.new_ones(1), abar[:-1]])

    @property
    def posterior_variance(self) -> torch.Tensor:
        """beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t), the variance of q(x_{t-1} | x_t, x_0); 0 at t = 0."""
        return self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @property
    def T(self) -> int:
        return self.betas.shape[0]

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.cumprod(1.0 - self.betas, dim=0)

    def snr(self, t: torch.Tensor | int | None = None) -> torch.Tensor:
        """Exact SNR(t) = abar_t / (1 - abar_t) in float64; all T values when t is None."""
        abar = self.alphas_cumprod
        snr = abar / (1.0 - abar)
        if t is None:
            return snr
        index = torch.as_tensor(t, dtype=torch.long)
        return snr.to(index.device)[index]

    def coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(abar_t) and sqrt(1 - abar_t) for a batch of timesteps, shaped to broadcast against `like`."""
        # Square roots in float64, cast last: in bf16/fp16 abar_0 = 0.9999 rounds to 1 and sqrt(1 - abar) to 0.
        abar = self.alphas_cumprod.to(like.device)[t.to(like.device)]
        shape = (-1,) + (1,) * (like.dim() - 1)
        return abar.sqrt().to(like.dtype).view(shape), (1.0 - abar).sqrt().to(like.dtype).view(shape)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self.coefficients(t, x0)
        return a * x0 + s * noise
