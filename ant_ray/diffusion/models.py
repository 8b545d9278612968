"""Model presets (diffusers UNet2DModel) and saving/loading in diffusers' folder format (safetensors only)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DModel

# `tiny` fits the CPU test budget; `ddpm-cifar10` is google/ddpm-cifar10-32's 35.7M-parameter configuration.
PRESETS: dict[str, dict] = {
    "tiny": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=None,
    ),
    "small": dict(
        block_out_channels=(64, 128, 128),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
    ),
    "ddpm-cifar10": dict(
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
        attention_head_dim=None,  # one attention head over all channels, as in the original DDPM and the hub config
        dropout=0.1,  # DDPM's CIFAR-10 training dropout; the hub config omits it (0.0), parameter count is the same
        flip_sin_to_cos=False,
        freq_shift=1,
        resnet_time_scale_shift="default",
        norm_eps=1e-6,
        downsample_padding=0,
    ),
}


def build_model(base: str, *, resolution: int, channels: int, seed: int = 0) -> UNet2DModel:
    """A preset name builds a fresh model (seeded); anything else is a local diffusers UNet2DModel folder."""
    if base in PRESETS:
        config = dict(PRESETS[base], sample_size=resolution, in_channels=channels, out_channels=channels)
        levels = len(config["block_out_channels"]) - 1
        if resolution % (2**levels) != 0:
            raise ValueError(f"model.base {base!r} downsamples {levels} times; data.resolution {resolution} must be "
                             f"divisible by {2**levels}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return UNet2DModel(**config)
    return load_model(base, resolution=resolution, channels=channels)


def load_model(folder: str | Path, *, resolution: int | None = None, channels: int | None = None) -> UNet2DModel:
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"model.base {str(folder)!r} is neither a preset ({', '.join(PRESETS)}) nor a diffusers UNet2DModel "
            "folder (expected config.json and diffusion_pytorch_model.safetensors inside)")
    if not (folder / "diffusion_pytorch_model.safetensors").is_file():
        raise FileNotFoundError(f"{folder} has no diffusion_pytorch_model.safetensors; only safetensors weights are "
                                "loaded (convert a .bin checkpoint with save_pretrained(safe_serialization=True))")
    from ant_ray.deme.projection import load_model_with_projections

    model = (load_model_with_projections(folder) if (folder / "channel_projections.safetensors").is_file()
             else UNet2DModel.from_pretrained(folder, use_safetensors=True, low_cpu_mem_usage=False))
    if channels is not None and model.config.in_channels != channels:
        raise ValueError(f"model {folder} takes {model.config.in_channels} channels but data.channels is {channels}")
    if resolution is not None and model.config.sample_size != resolution:
        raise ValueError(f"model {folder} was built for {model.config.sample_size}px but data.resolution is "
                         f"{resolution}")
    return model


def save_model(model: UNet2DModel, folder: str | Path) -> Path:
    from ant_ray.deme.projection import has_channel_projections, save_model_with_projections

    folder = Path(folder)
    if has_channel_projections(model):
        save_model_with_projections(model, folder)
    else:
        model.save_pretrained(folder, safe_serialization=True)
    return folder


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
