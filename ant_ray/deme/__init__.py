"""DeMe (decouple-then-merge): range-specialist finetuning pieces; channel-wise projection lives in projection.py."""

from .projection import (
    ChannelProjection,
    ChannelProjections,
    add_channel_projections,
    channel_projection_places,
    default_places,
    discover_channels,
    has_channel_projections,
    load_model_with_projections,
    save_model_with_projections,
)

__all__ = [
    "ChannelProjection", "ChannelProjections", "add_channel_projections", "channel_projection_places",
    "default_places", "discover_channels", "has_channel_projections", "load_model_with_projections",
    "save_model_with_projections",
]
