"""A model family owns everything that depends on the denoiser's architecture, so that loops, samplers, FID and
merging never name a model class: how to build a model from a preset, load and save it in diffusers' own folder
format (safetensors), call it with conditioning, what its null condition and data shape are, whether it learns
sigma, and where DeMe's channel projections go.

Conditioning is one opaque tensor `cond` (class labels today), as DiT passes `model_kwargs`: `cond=None` is the
unconditional call, which a class-conditional model answers with its null label. Label dropout for classifier-free
guidance is ours (`drop_labels`), never the model's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ant_ray.diffusion.presets import FAMILY_PRESETS, check_preset_resolution
from ant_ray.plugin_options import check_family_options
from ant_ray.registry import Registry

MODEL_FAMILIES: Registry = Registry("model family")


def drop_labels(labels: torch.Tensor, p_uncond: float, generator: torch.Generator, null_label: int) -> torch.Tensor:
    """Classifier-free guidance's label dropout (Ho & Salimans 2022): each label becomes `null_label` with
    probability `p_uncond`. The draw comes from `generator` on the CPU, so a seeded run drops the same labels on
    any device (the models' own dropout uses the global RNG, which is why we switch it off)."""
    if not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond!r}")
    dropped = torch.rand(labels.shape[0], generator=generator) < p_uncond
    return torch.where(dropped.to(labels.device), torch.full_like(labels, null_label), labels)


def unwrap(model: nn.Module) -> nn.Module:
    """The diffusers model inside a DistributedDataParallel or torch.compile wrapper (whose config we read; the
    wrapper itself is what a training step calls, so that DDP synchronises gradients)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """n labels cycling through the classes, each class n // K or n // K + 1 times: the labels of a class-conditional
    model's FID samples (ADM / DiT sample classes uniformly; cycling removes the sampling noise of the counts)."""
    if num_classes < 1:
        raise ValueError(f"balanced labels need num_classes >= 1, got {num_classes}")
    return torch.arange(n) % num_classes


class ModelFamily:
    """One family of denoisers. Subclasses set the class attributes and implement the four methods marked below."""

    name: str = ""
    model_class_name: str = ""  # diffusers class, as config.json's "_class_name" records it
    # What DeMe's projections see at `projection_places`: "NCHW" feature maps (a 1x1 conv mixes channels) or "NLD"
    # token sequences (a linear map on the token channels).
    feature_layout: str = ""

    # ------------------------------------------------------------------------------------------ for subclasses
    def model_class(self) -> type:
        raise NotImplementedError

    def model_config(self, preset: dict, *, resolution: int, channels: int, num_classes: int,
                     learn_sigma: bool, **options) -> dict:
        """The diffusers constructor arguments for `preset` with the config's options on top."""
        raise NotImplementedError

    def forward(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """The raw output [B, C or 2C, H, W] for an already resolved condition (None only for unconditional)."""
        raise NotImplementedError

    def num_classes(self, model: nn.Module) -> int:
        """How many real classes the model knows; 0 for an unconditional model."""
        raise NotImplementedError

    def projection_places(self, model: nn.Module) -> list[str]:
        raise NotImplementedError

    def prepare(self, model: nn.Module) -> nn.Module:
        """Called on every built or loaded model (e.g. to switch off a model's own label dropout)."""
        return model

    # ------------------------------------------------------------------------------------------ shared
    def build(self, base: str, *, resolution: int, channels: int, seed: int = 0, **options) -> nn.Module:
        """A fresh model from preset `base`, its weights fixed by `seed`; options override the preset."""
        presets = FAMILY_PRESETS[self.name]
        if base not in presets:
            raise ValueError(f"unknown {self.name} preset {base!r}; choose one of: {', '.join(presets)}")
        options = check_family_options(self.name, options)
        check_preset_resolution(base, resolution)
        config = self.model_config(presets[base], resolution=resolution, channels=channels,
                                   num_classes=options.pop("num_classes", presets[base].get("num_classes", 0)),
                                   learn_sigma=options.pop("learn_sigma", presets[base].get("learn_sigma", False)),
                                   **options)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.model_class()(**config)
            self.initialize(model)
        return self.prepare(model)

    def initialize(self, model: nn.Module) -> None:
        """The architecture's own initialisation where diffusers' default differs (runs under the build seed)."""

    def load(self, folder: str | Path) -> nn.Module:
        """A diffusers folder of this family, with DeMe's channel projections when the folder has them."""
        from ant_ray.deme.projection import load_model_with_projections

        model = load_model_with_projections(folder, model_class=self.model_class(), use_safetensors=True,
                                            low_cpu_mem_usage=False)
        return self.prepare(model)

    def save(self, model: nn.Module, folder: str | Path) -> Path:
        """diffusers' save_pretrained (safetensors), projections beside it, published whole."""
        from ant_ray.deme.projection import save_model_with_projections

        save_model_with_projections(model, folder)
        return Path(folder)

    def denoise(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                cond: torch.Tensor | None = None) -> torch.Tensor:
        """The denoiser call (x_t, t, cond). cond=None is unconditional: the null label on a conditional model.
        `model` may be a DDP / compiled wrapper of this family's model."""
        if cond is None:
            cond = self.null_condition(unwrap(model), x_t.shape[0], x_t.device)
        elif self.num_classes(unwrap(model)) == 0:
            raise ValueError(f"this {self.name} model is unconditional (no class labels); call it with cond=None")
        return self.forward(model, x_t, t, cond)

    def null_label(self, model: nn.Module) -> int:
        """The extra, last row of the label table: index num_classes (never a hard-coded 1000)."""
        return self.num_classes(model)

    def null_condition(self, model: nn.Module, batch_size: int,
                       device: torch.device | str = "cpu") -> torch.Tensor | None:
        """The condition of an unconditional call: null labels, or None for a model without a label table."""
        if not self.has_label_table(model):
            return None
        return torch.full((batch_size,), self.null_label(model), dtype=torch.long, device=device)

    def has_label_table(self, model: nn.Module) -> bool:
        return self.num_classes(model) > 0

    def data_shape(self, model: nn.Module) -> tuple[int, int, int]:
        """(channels, height, width) of x_t: the image, or the latent for a latent model."""
        size = model.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (model.config.in_channels, height, width)

    def learns_sigma(self, model: nn.Module) -> bool:
        """IDDPM's learned variance: the output has twice the input channels, [eps-type half; variance half]."""
        return model.config.out_channels == 2 * model.config.in_channels
