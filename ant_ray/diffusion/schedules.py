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
    def create(cls, name: str = "linear", T: int = 1000) -> "NoiseSchedule":
        if not isinstance(T, int) or T < 2:
            raise ValueError(f"diffusion.T must be an integer >= 2, got {T!r}")
        return cls(name=name, betas=SCHEDULES.get(name)(T))

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
