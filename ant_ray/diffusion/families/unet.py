import torch
from torch import nn

from .base import MODEL_FAMILIES, ModelFamily


@MODEL_FAMILIES.register("unet")
class UNetFamily(ModelFamily):
    """diffusers UNet2DModel (DDPM / ADM-style pixel UNet). Class conditioning adds `num_class_embeds` =
    num_classes + 1 rows to the time embedding: diffusers gives no null row, so the last row is ours, the null
    label num_classes, and the labels are dropped by us (`drop_labels`)."""

    name = "unet"
    model_class_name = "UNet2DModel"
    feature_layout = "NCHW"

    def model_class(self) -> type:
        from diffusers import UNet2DModel

        return UNet2DModel

    def model_config(self, preset: dict, *, resolution: int, channels: int, num_classes: int,
                     learn_sigma: bool) -> dict:
        return dict(preset, sample_size=resolution, in_channels=channels,
                    out_channels=2 * channels if learn_sigma else channels,
                    num_class_embeds=num_classes + 1 if num_classes > 0 else None)

    def num_classes(self, model: nn.Module) -> int:
        rows = model.config.num_class_embeds
        return 0 if rows is None else rows - 1

    def forward(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return model(x_t, t, class_labels=cond).sample

    def projection_places(self, model: nn.Module) -> list[str]:
        from ant_ray.deme.projection import default_places  # the one list DeMe's reference code uses

        return default_places(model)
