"""DeMe channel-wise projection on tiny diffusers UNet2DModels: identity at init, discovered channel sizes,
state-dict keys, save/load round trips and merging projected models."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DModel

from ant_ray.deme.projection import (
    PROJECTIONS_CONFIG_NAME,
    PROJECTIONS_WEIGHTS_NAME,
    add_channel_projections,
    channel_projection_places,
    has_channel_projections,
    load_model_with_projections,
    save_model_with_projections,
)
from ant_ray.merge import merge_task_vectors

TINY = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
            norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"))
THREE_LEVELS = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16, 24), layers_per_block=1,
                    norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None)


def tiny_unet(config=TINY, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(**config).eval()


def inputs(config=TINY):
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(2, config["in_channels"], 8, 8, generator=generator)
    return sample, torch.tensor([3, 700])


def predict(unet, config=TINY):
    with torch.no_grad():
        return unet(*inputs(config)).sample


def perturb_projections(unet, seed: int, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if name.startswith("channel_projections."):
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


def expected_channels(config) -> dict[str, int]:
    """What the UNet2DModel config says: down block i outputs block_out_channels[i], the mid block the last
    one, up block i the reversed list's i-th entry."""
    channels = list(config["block_out_channels"])
    expected = {f"down_blocks.{i}": c for i, c in enumerate(channels)}
    expected["mid_block"] = channels[-1]
    expected.update({f"up_blocks.{i}": c for i, c in enumerate(reversed(channels))})
    return expected


@pytest.mark.parametrize("config", [TINY, THREE_LEVELS], ids=["two-levels", "three-levels-attention"])
def test_default_places_and_channels_are_discovered(config):
    unet = add_channel_projections(tiny_unet(config))
    expected = expected_channels(config)
    assert channel_projection_places(unet) == list(expected)
    assert unet.channel_projections.channels == expected
    keys = [key for key in unet.state_dict() if key.startswith("channel_projections.")]
    assert keys == [f"channel_projections.{place}.weight" for place in expected]
    for place, count in expected.items():
        assert unet.state_dict()[f"channel_projections.{place}.weight"].shape == (count, count, 1, 1)
    projection_parameters = {name for name, _ in unet.named_parameters() if name.startswith("channel_projections.")}
    assert projection_parameters == set(keys)  # real parameters: the optimizer sees them


@pytest.mark.parametrize("config", [TINY, THREE_LEVELS], ids=["two-levels", "three-levels-attention"])
def test_identity_projections_leave_the_output_unchanged(config):
    unet = tiny_unet(config)
    before = predict(unet, config)
    add_channel_projections(unet)
    torch.testing.assert_close(predict(unet, config), before, atol=1e-6, rtol=0)


def test_perturbed_projection_changes_the_output_and_matches_a_manual_projection():
    unet = tiny_unet()
    before = predict(unet)
    add_channel_projections(unet, places=["mid_block"])
    matrix = torch.eye(32) + 0.1 * torch.randn(32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        unet.channel_projections.mid_block.weight.copy_(matrix.view(32, 32, 1, 1))
    after = predict(unet)
    assert (after - before).abs().max() > 1e-3

    # independent check: the same projection written by hand as a forward hook on a fresh copy of the model
    reference = tiny_unet()
    reference.mid_block.register_forward_hook(lambda module, args, out: torch.einsum("dc,nchw->ndhw", matrix, out))
    torch.testing.assert_close(after, predict(reference), atol=1e-5, rtol=1e-5)


def test_down_block_projection_leaves_the_skips_unprojected():
    unet = add_channel_projections(tiny_unet(), places=["down_blocks.0"])
    seen = {}
    unet.down_blocks[0].register_forward_hook(lambda module, args, out: seen.update(hidden=out[0], skips=out[1]))
    with torch.no_grad():
        unet.channel_projections.projection("down_blocks.0").weight.mul_(2.0)
        unet(*inputs())
    # the projection hook runs first: the next block gets 2x the block's output, the last skip is the raw output
    torch.testing.assert_close(seen["hidden"], 2.0 * seen["skips"][-1])


def test_adding_twice_and_bad_places_are_refused():
    unet = add_channel_projections(tiny_unet())
    assert has_channel_projections(unet) and not has_channel_projections(tiny_unet())
    with pytest.raises(ValueError, match="already has channel projections"):
        add_channel_projections(unet)
    with pytest.raises(ValueError, match="not a submodule"):
        add_channel_projections(tiny_unet(), places=["down_blocks.7"])
    with pytest.raises(ValueError, match="contains place"):
        add_channel_projections(tiny_unet(), places=["down_blocks.0", "down_blocks.0.resnets.0"])
    with pytest.raises(ValueError, match="feature map"):
        add_channel_projections(tiny_unet(), places=["time_embedding"])
    with pytest.raises(ValueError, match="'default'"):
        add_channel_projections(tiny_unet(), places="all")


def test_deepcopy_keeps_an_independent_working_projection():
    unet = add_channel_projections(tiny_unet())
    clone = copy.deepcopy(unet)
    perturb_projections(clone, seed=5)
    torch.testing.assert_close(predict(unet), predict(tiny_unet()), atol=1e-6, rtol=0)
    assert (predict(clone) - predict(unet)).abs().max() > 1e-4


def test_save_and_load_round_trip(tmp_path):
    unet = add_channel_projections(tiny_unet())
    perturb_projections(unet, seed=1)
    save_model_with_projections(unet, tmp_path)
    assert (tmp_path / PROJECTIONS_WEIGHTS_NAME).is_file() and (tmp_path / PROJECTIONS_CONFIG_NAME).is_file()
    assert has_channel_projections(unet)  # saving leaves the model as it was

    loaded = load_model_with_projections(tmp_path).eval()
    assert channel_projection_places(loaded) == channel_projection_places(unet)
    assert torch.equal(predict(loaded), predict(unet))

    # the diffusers folder alone still loads the base weights, without projection keys
    plain = UNet2DModel.from_pretrained(str(tmp_path)).eval()
    assert not any(key.startswith("channel_projections") for key in plain.state_dict())
    torch.testing.assert_close(predict(plain), predict(tiny_unet()), atol=0, rtol=0)

    # a model saved without projections loads without them, and stale projection files are removed
    save_model_with_projections(tiny_unet(), tmp_path)
    assert not (tmp_path / PROJECTIONS_CONFIG_NAME).exists()
    assert not has_channel_projections(load_model_with_projections(tmp_path))


def test_merged_state_dict_of_projected_models_loads_back():
    # DeMe: every range specialist starts from the pretrained model with identity projections, so the base of the
    # task vectors carries identity projections too and tau = W_i - I for the projection weights
    base = add_channel_projections(tiny_unet())
    specialists = []
    for seed in (11, 12):
        model = copy.deepcopy(base)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
        specialists.append(model)
    states = [model.state_dict() for model in specialists]

    merged = merge_task_vectors(base.state_dict(), states, [0.0, 1.0])
    target = add_channel_projections(tiny_unet(seed=99))
    target.load_state_dict(merged, strict=True)
    torch.testing.assert_close(predict(target), predict(specialists[1]), atol=1e-5, rtol=1e-5)

    halfway = merge_task_vectors(base.state_dict(), states, [0.5, 0.5])
    target.load_state_dict(halfway, strict=True)
    key = "channel_projections.mid_block.weight"
    torch.testing.assert_close(target.state_dict()[key], (states[0][key] + states[1][key]) / 2)
