"""The model presets: diffusers UNet2DModel configurations by name, as plain data (no torch), so that a config's
resolution is checked against its preset when the config is loaded."""

from __future__ import annotations

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


def check_preset_resolution(base: str, resolution: int) -> None:
    """A preset halves the resolution once per level below its top; each level needs an even size."""
    levels = len(PRESETS[base]["block_out_channels"]) - 1
    if resolution % (2**levels) != 0:
        raise ValueError(f"data.resolution ({resolution}) must be divisible by {2**levels}, as model.base {base!r} "
                         f"downsamples by {2**levels}: set data.resolution to a multiple of {2**levels}")
