"""DeMe channel-wise projection (Sec. 3.2): P(F) = W F with a learnable C x C matrix W, initialised to identity,
applied to intermediate feature maps F (C x H x W) of a diffusers UNet2DModel.

Each projection is a bias-free 1x1 convolution (the matrix W acting on the channel axis at every pixel). It is
applied by a forward hook on the module at each "place" (a submodule path such as "down_blocks.0") and stored
as a real submodule under `unet.channel_projections`, so it trains with the model's parameters and its weights
appear in `unet.state_dict()` as e.g. `channel_projections.down_blocks.0.weight`. The base modules and their
state-dict keys are untouched, which keeps the diffusers folder loadable by `UNet2DModel.from_pretrained`.

Default places: the hidden-state output of every down block, of the mid block and of every up block (as in the
DeMe reference code). A down block returns (hidden_states, res_samples); only hidden_states, the input of the
next block, is projected. The residual skips in res_samples go to the up path unprojected (the last skip is the
very tensor the block returned as hidden_states, before projection). We keep them so because that is how the
DeMe reference implementation places its adapters, because the identity initialisation then reproduces the
pretrained model exactly, and because it keeps one projection per block: the up blocks' own projections can
still adapt the features that the skips feed into.

Channel counts are discovered with one dry forward pass on a tiny input, so any UNet2DModel configuration (and
any place whose output is a feature map or a tuple starting with one) works without per-model code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence, Union

import torch
from safetensors.torch import save_file
from torch import nn

from ant_ray.files import CorruptFileError, check_safetensors, publishing_folder, read_json, read_safetensors

PROJECTIONS_ATTRIBUTE = "channel_projections"
PROJECTIONS_WEIGHTS_NAME = "channel_projections.safetensors"
PROJECTIONS_CONFIG_NAME = "channel_projections.json"
Places = Union[str, Sequence[str]]


class ChannelProjection(nn.Conv2d):
    """W in R^{C x C} as a bias-free 1x1 convolution, initialised to the identity."""

    def __init__(self, channels: int, *, device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__(channels, channels, kernel_size=1, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            self.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))

    def project_output(self, module: nn.Module, args: tuple, output: object) -> object:
        """Forward hook: project a feature-map output, or the first element (the hidden state) of a tuple."""
        if isinstance(output, torch.Tensor):
            return self(output)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return (self(output[0]),) + output[1:]  # down blocks: res_samples (skips) pass through unchanged
        raise TypeError(f"channel projection expects a feature map or a tuple starting with one; got {type(output)}")


class ChannelProjections(nn.Module):
    """Container of the projections, nested along each place's path so state-dict keys mirror the places."""

    def __init__(self, channels: dict[str, int], *, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.channels = dict(channels)
        for place, count in channels.items():
            *parents, leaf = place.split(".")
            node: nn.Module = self
            for part in parents:
                if part not in node._modules:
                    node.add_module(part, nn.Module())
                node = node._modules[part]
            node.add_module(leaf, ChannelProjection(count, device=device, dtype=dtype))

    @property
    def places(self) -> list[str]:
        return list(self.channels)

    def projection(self, place: str) -> ChannelProjection:
        return self.get_submodule(place)


def default_places(unet: nn.Module) -> list[str]:
    """The output of every down block, the mid block and every up block."""
    places = [f"down_blocks.{index}" for index in range(len(unet.down_blocks))]
    if getattr(unet, "mid_block", None) is not None:
        places.append("mid_block")
    places += [f"up_blocks.{index}" for index in range(len(unet.up_blocks))]
    return places


def add_channel_projections(unet: nn.Module, places: Places = "default") -> nn.Module:
    """Insert identity-initialised projections at `places` ("default" or a list of submodule paths); returns unet.

    The projections take the device and dtype of the unet's parameters. Adding twice is an error."""
    if has_channel_projections(unet):
        raise ValueError(f"the model already has channel projections at {channel_projection_places(unet)}; "
                         "add them once (load_model_with_projections restores saved ones)")
    place_list = _check_places(unet, places)
    channels = discover_channels(unet, place_list)
    reference = next(unet.parameters())
    projections = ChannelProjections(channels, device=reference.device, dtype=reference.dtype)
    for place in place_list:
        unet.get_submodule(place).register_forward_hook(projections.projection(place).project_output)
    unet.add_module(PROJECTIONS_ATTRIBUTE, projections)
    return unet


def has_channel_projections(unet: nn.Module) -> bool:
    return isinstance(getattr(unet, PROJECTIONS_ATTRIBUTE, None), ChannelProjections)


def channel_projection_places(unet: nn.Module) -> list[str]:
    return unet.get_submodule(PROJECTIONS_ATTRIBUTE).places if has_channel_projections(unet) else []


def discover_channels(unet: nn.Module, places: Sequence[str]) -> dict[str, int]:
    """Output channel count at each place, read from one dry forward pass on a zero input of 2^levels pixels."""
    seen: dict[str, int] = {}
    handles = []

    def recorder(place: str):
        def record(module: nn.Module, args: tuple, output: object) -> None:
            feature = output[0] if isinstance(output, tuple) and output else output
            if not isinstance(feature, torch.Tensor) or feature.dim() != 4:
                raise ValueError(f"place {place!r} outputs {type(feature).__name__}, not an N x C x H x W feature "
                                 "map; choose block outputs such as 'down_blocks.0', 'mid_block', 'up_blocks.0'")
            if seen.setdefault(place, feature.shape[1]) != feature.shape[1]:
                raise ValueError(f"place {place!r} runs more than once with different channel counts")
        return record

    reference = next(unet.parameters())
    size = max(8, 2 ** len(getattr(unet, "down_blocks", ())))
    sample = torch.zeros(1, unet.config.in_channels, size, size, device=reference.device, dtype=reference.dtype)
    timestep = torch.ones(1, device=reference.device, dtype=torch.long)  # 1, not 0: fourier embeddings divide by t
    extra = {}
    if getattr(unet, "class_embedding", None) is not None:
        extra["class_labels"] = torch.zeros(1, device=reference.device, dtype=torch.long)
    # eval mode so dropout draws no random numbers (the caller's RNG stream stays as it was); each module's own
    # mode is restored afterwards
    training_modes = [(module, module.training) for module in unet.modules()]
    try:
        for place in places:
            handles.append(unet.get_submodule(place).register_forward_hook(recorder(place)))
        unet.eval()
        with torch.no_grad():
            unet(sample, timestep, **extra)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in training_modes:
            module.training = training
    not_run = [place for place in places if place not in seen]
    if not_run:
        raise ValueError(f"places {not_run} did not run in a forward pass of this model; choose modules on its path")
    return {place: seen[place] for place in places}


def _check_places(unet: nn.Module, places: Places) -> list[str]:
    if isinstance(places, str):
        if places != "default":
            raise ValueError(f"places must be 'default' or a list of submodule paths; got {places!r}")
        return default_places(unet)
    place_list = list(places)
    if not place_list:
        raise ValueError("places is empty; give 'default' or submodule paths such as ['mid_block']")
    if len(set(place_list)) != len(place_list):
        raise ValueError(f"places has duplicates: {place_list}")
    for place in place_list:
        if not isinstance(place, str) or not place or place.split(".")[0] == PROJECTIONS_ATTRIBUTE:
            raise ValueError(f"place {place!r} must name a submodule of the model, e.g. {default_places(unet)}")
        try:
            unet.get_submodule(place)
        except AttributeError:
            raise ValueError(f"place {place!r} is not a submodule of the model; e.g. {default_places(unet)}") from None
        nested = [other for other in place_list if other.startswith(place + ".")]
        if nested:
            raise ValueError(f"place {place!r} contains place {nested[0]!r}; nested places are not supported")
    return place_list


# ------------------------------------------------------------------------------------------------ save / load
def save_model_with_projections(unet: nn.Module, folder: str | os.PathLike) -> None:
    """diffusers `save_pretrained` (safetensors) of the base weights, plus the projections in their own files.

    `UNet2DModel.from_pretrained(folder)` still loads the model without projections; `load_model_with_projections`
    restores them. A model without projections is saved plainly. The folder is written beside `folder` and
    published whole (`ant_ray.files.publishing_folder`): `folder` never holds a partial model, and a previous
    model there (with its projection files) is replaced as a unit."""
    with publishing_folder(folder) as temporary:
        if not has_channel_projections(unet):
            unet.save_pretrained(str(temporary), safe_serialization=True)
            return
        projections = unet._modules.pop(PROJECTIONS_ATTRIBUTE)  # keep the base file free of projection keys
        try:
            unet.save_pretrained(str(temporary), safe_serialization=True)
        finally:
            unet._modules[PROJECTIONS_ATTRIBUTE] = projections
        tensors = {f"{PROJECTIONS_ATTRIBUTE}.{key}": tensor.detach().contiguous().cpu()
                   for key, tensor in projections.state_dict().items()}
        save_file(tensors, str(temporary / PROJECTIONS_WEIGHTS_NAME))
        config = {"format_version": 1, "places": projections.places, "channels": projections.channels}
        (temporary / PROJECTIONS_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def load_model_with_projections(folder: str | os.PathLike, *, model_class: type | None = None,
                                **from_pretrained_options: object) -> nn.Module:
    """Load a folder written by `save_model_with_projections` (a plain diffusers folder loads without projections).

    `model_class` defaults to diffusers' UNet2DModel; `from_pretrained_options` go to its `from_pretrained`.
    A garbage or truncated file is a one-line CorruptFileError naming it."""
    if model_class is None:
        from diffusers import UNet2DModel  # imported here: the rest of this module needs only torch
        model_class = UNet2DModel
    folder = Path(folder)
    fix = "delete the folder and re-run the step that writes it"
    read_json(folder / "config.json", fix=fix)  # diffusers' own error for a bad config.json is a long traceback
    if (folder / "diffusion_pytorch_model.safetensors").is_file():
        check_safetensors(folder / "diffusion_pytorch_model.safetensors", fix=fix)
    unet = model_class.from_pretrained(str(folder), **from_pretrained_options)
    config_path = folder / PROJECTIONS_CONFIG_NAME
    if not config_path.is_file():
        return unet
    config = read_json(config_path, fix=fix)
    if not isinstance(config.get("places"), list) or not isinstance(config.get("channels"), dict):
        raise CorruptFileError(config_path, "lacks 'places' (a list) and 'channels' (a mapping)", fix)
    add_channel_projections(unet, places=config["places"])
    found = unet.get_submodule(PROJECTIONS_ATTRIBUTE).channels
    if found != config["channels"]:
        raise ValueError(f"{config_path} records channels {config['channels']} but the model has {found}")
    state = read_safetensors(folder / PROJECTIONS_WEIGHTS_NAME, device=str(next(unet.parameters()).device), fix=fix)
    prefix = PROJECTIONS_ATTRIBUTE + "."
    unet.get_submodule(PROJECTIONS_ATTRIBUTE).load_state_dict(
        {key[len(prefix):]: tensor for key, tensor in state.items()}, strict=True)
    return unet
