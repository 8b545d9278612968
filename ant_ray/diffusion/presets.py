"""The model presets by family, as plain data (no torch), so that a config's resolution is checked against its
preset when the config is loaded.

`PRESETS` holds the `unet` family's diffusers UNet2DModel configurations (the names every config accepts today);
`DIT_PRESETS` the `dit` family's architectures in DiT's own terms (patch size, depth, width, heads), which
`families/dit.py` turns into a diffusers DiTTransformer2DModel configuration."""

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


# DiT (Peebles & Xie 2023, Table 1): S/B/L/XL at patch 2; learned sigma and 1000 classes as in DiT's ImageNet
# models. `dit-tiny` is the CPU-test model: a pixel DiT on 8x8 digits (patch 2 -> 16 tokens) with 10 classes.
DIT_PRESETS: dict[str, dict] = {
    "dit-tiny": dict(patch_size=2, depth=2, width=64, heads=4, num_classes=10, learn_sigma=True),
    "dit-s2": dict(patch_size=2, depth=12, width=384, heads=6, num_classes=1000, learn_sigma=True),
    "dit-b2": dict(patch_size=2, depth=12, width=768, heads=12, num_classes=1000, learn_sigma=True),
    "dit-l2": dict(patch_size=2, depth=24, width=1024, heads=16, num_classes=1000, learn_sigma=True),
    "dit-xl2": dict(patch_size=2, depth=28, width=1152, heads=16, num_classes=1000, learn_sigma=True),
}

FAMILY_PRESETS: dict[str, dict[str, dict]] = {"unet": PRESETS, "dit": DIT_PRESETS}


def preset_family(base: str) -> str | None:
    """The family whose preset `base` is, or None when `base` is no preset (then it is a model folder)."""
    return next((family for family, presets in FAMILY_PRESETS.items() if base in presets), None)


def check_preset_resolution(base: str, resolution: int) -> None:
    """A UNet preset halves the resolution once per level below its top, so each level needs an even size; a DiT
    cuts the image into patch x patch tiles."""
    if base in DIT_PRESETS:
        patch = DIT_PRESETS[base]["patch_size"]
        if resolution % patch != 0:
            raise ValueError(f"data.resolution ({resolution}) must be divisible by {patch}, the patch size of "
                             f"model.base {base!r}: set data.resolution to a multiple of {patch}")
        return
    levels = len(PRESETS[base]["block_out_channels"]) - 1
    if resolution % (2**levels) != 0:
        raise ValueError(f"data.resolution ({resolution}) must be divisible by {2**levels}, as model.base {base!r} "
                         f"downsamples by {2**levels}: set data.resolution to a multiple of {2**levels}")
