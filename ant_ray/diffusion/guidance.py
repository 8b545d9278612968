"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser transform: guided = u + w (c - u).

w = 1 is the conditional model, w = 0 the unconditional one; DiT / ANT sample ImageNet at w = 1.5. The combination
acts on the first C output channels, the eps-type half (epsilon, v or x0: each is affine in the prediction with
the same x_t, so guiding any of them is the same guidance); a learned-sigma model keeps its conditional variance
half, as DiT's forward_with_cfg does. (DiT's code guides only 3 of the 4 latent channels "for reproducibility";
we guide all C, the standard form its own comment gives.)
"""

from __future__ import annotations

from typing import Callable

import torch

ConditionalDenoiser = Callable[..., torch.Tensor]  # (x_t, t) or (x_t, t, cond) -> [B, C or 2C, H, W]


def combine_guidance(conditional: torch.Tensor, unconditional: torch.Tensor, scale: float,
                     channels: int) -> torch.Tensor:
    """u + w (c - u) on the first `channels` channels; the rest (learned variance) is the conditional output's."""
    c, u = conditional[:, :channels], unconditional[:, :channels]
    return torch.cat([u + scale * (c - u), conditional[:, channels:]], dim=1)


def conditioned_denoiser(denoiser: ConditionalDenoiser, cond: torch.Tensor | None,
                         null_cond: torch.Tensor | None = None, guidance_scale: float = 1.0):
    """A plain (x_t, t) denoiser for one batch of conditions. With cond=None it is `denoiser` itself (today's
    unconditional call); at guidance_scale 1 one conditional forward; otherwise ONE forward over the batch
    [cond; null_cond] (twice the rows), split and combined."""
    if cond is None:
        if guidance_scale != 1.0:
            raise ValueError("classifier-free guidance needs a condition (class labels) to guide towards")
        return denoiser
    if guidance_scale == 1.0:
        return lambda x_t, t: denoiser(x_t, t, cond)
    if null_cond is None or null_cond.shape[0] != cond.shape[0]:
        raise ValueError("guidance needs the null condition, one row per condition row (the family's "
                         "null_condition)")

    def guided(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        both = denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, null_cond]))
        conditional, unconditional = both.chunk(2)
        return combine_guidance(conditional, unconditional, guidance_scale, x_t.shape[1])

    return guided
