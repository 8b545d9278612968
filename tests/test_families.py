"""Model families, classifier-free guidance and IDDPM's variational bound against independent truths: diffusers'
own classes called directly, DiT's adaLN-Zero initialisation (a fresh DiT predicts 0), the guidance formula by
hand, and the bound re-derived here in float64 numpy / scipy from the IDDPM and DDPM formulas."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from ant_ray.diffusion import (
    MODEL_FAMILIES,
    NoiseSchedule,
    balanced_labels,
    build_model,
    build_weighting,
    combine_guidance,
    conditioned_denoiser,
    diffusion_loss,
    drop_labels,
    family_of,
    family_of_folder,
    get_family,
    load_model,
    model_denoiser,
    per_sample_loss,
    prediction_target,
    routed_denoiser,
    sample_images,
    save_model,
    vb_terms,
    weighted_loss,
)
from ant_ray.plugin_options import MODEL_FAMILY_OPTIONS, check_family_options

T = 1000
K = 10  # classes of the digits presets


def perturbed(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Random weights on top of the build, so that outputs depend on every input (a fresh DiT predicts 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def dit() -> torch.nn.Module:
    return perturbed(build_model("dit-tiny", resolution=8, channels=1, seed=0)).eval()


@pytest.fixture(scope="module")
def cond_unet() -> torch.nn.Module:
    return perturbed(build_model("tiny", resolution=8, channels=1, seed=0, num_classes=K)).eval()


def inputs(batch: int = 4, channels: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, 8, 8, generator=g), torch.tensor([0, 250, 600, 999][:batch])


# ----------------------------------------------------------------------------------------------------------------
# the catalogue and the registry


def test_the_catalogue_lists_every_family_with_the_options_its_config_takes():
    assert sorted(MODEL_FAMILY_OPTIONS) == MODEL_FAMILIES.names() == ["dit", "unet"]
    for name in MODEL_FAMILIES.names():
        signature = inspect.signature(MODEL_FAMILIES.get(name).model_config)
        options = [p for p in signature.parameters if p not in ("self", "preset", "resolution", "channels")]
        assert sorted(options) == sorted(MODEL_FAMILY_OPTIONS[name]), name
    assert check_family_options("dit", {"num_classes": 0, "learn_sigma": False}) == {"num_classes": 0,
                                                                                     "learn_sigma": False}
    with pytest.raises(ValueError, match="model.patch_size must be an integer >= 1"):
        check_family_options("dit", {"patch_size": 0})
    with pytest.raises(ValueError, match="model.learn_sigma must be true or false"):
        check_family_options("unet", {"learn_sigma": 1})
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['depth'\] for model family 'unet'"):
        build_model("tiny", resolution=8, channels=1, depth=3)
    with pytest.raises(ValueError, match="unknown model family 'vit'; choose one of: dit, unet"):
        check_family_options("vit")


# ----------------------------------------------------------------------------------------------------------------
# unet


def test_class_conditional_unet_has_a_null_row_and_calls_diffusers_with_labels(cond_unet):
    family = family_of(cond_unet)
    assert family.name == "unet" and family.feature_layout == "NCHW"
    assert cond_unet.config.num_class_embeds == K + 1 and cond_unet.class_embedding.weight.shape[0] == K + 1
    assert family.num_classes(cond_unet) == K and family.null_label(cond_unet) == K
    assert family.data_shape(cond_unet) == (1, 8, 8) and not family.learns_sigma(cond_unet)
    x, t = inputs()
    labels = torch.tensor([0, 3, 9, 3])
    denoise = model_denoiser(cond_unet)
    with torch.no_grad():
        torch.testing.assert_close(denoise(x, t, labels), cond_unet(x, t, class_labels=labels).sample, rtol=0, atol=0)
        null = cond_unet(x, t, class_labels=torch.full((4,), K)).sample
        torch.testing.assert_close(denoise(x, t), null, rtol=0, atol=0)  # cond=None: the null row
        assert not torch.allclose(denoise(x, t, labels), null)
    assert family.projection_places(cond_unet) == ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0",
                                                   "up_blocks.1"]


def test_unconditional_unet_is_todays_model_and_rejects_labels():
    model = build_model("tiny", resolution=8, channels=1, seed=0).eval()
    assert model.config.num_class_embeds is None and model.config.out_channels == 1
    family = family_of(model)
    assert family.num_classes(model) == 0 and family.null_condition(model, 3) is None
    x, t = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model_denoiser(model)(x, t), model(x, t).sample, rtol=0, atol=0)
    with pytest.raises(ValueError, match="unconditional"):
        model_denoiser(model)(x, t, torch.zeros(4, dtype=torch.long))
    sigma = build_model("tiny", resolution=8, channels=3, learn_sigma=True)
    assert sigma.config.out_channels == 6 and family_of(sigma).learns_sigma(sigma)


def test_a_ddp_style_wrapper_is_called_and_its_inner_model_read(cond_unet):
    wrapped = torch.nn.DataParallel(cond_unet)  # on CPU it calls the module; it has .module like DDP
    assert family_of(wrapped).name == "unet"
    x, t = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model_denoiser(wrapped)(x, t), model_denoiser(cond_unet)(x, t), rtol=0, atol=0)


def test_a_conditional_unet_with_deme_projections_round_trips(tmp_path):
    from ant_ray.deme.projection import add_channel_projections, channel_projection_places

    model = add_channel_projections(build_model("tiny", resolution=8, channels=1, seed=4, num_classes=K))
    perturbed(model, seed=5).eval()
    loaded = load_model(save_model(model, tmp_path / "unet"), resolution=8, channels=1).eval()
    assert channel_projection_places(loaded) == get_family("unet").projection_places(loaded)
    x, t = inputs()
    labels = torch.tensor([2, 4, K, 0])
    with torch.no_grad():
        torch.testing.assert_close(model_denoiser(loaded)(x, t, labels), model_denoiser(model)(x, t, labels),
                                   rtol=0, atol=0)


def test_drop_labels_replaces_a_seeded_fraction_by_the_null_label():
    labels = torch.arange(10_000) % K
    assert torch.equal(drop_labels(labels, 0.0, torch.Generator().manual_seed(0), K), labels)
    assert torch.equal(drop_labels(labels, 1.0, torch.Generator().manual_seed(0), K), torch.full_like(labels, K))
    dropped = drop_labels(labels, 0.1, torch.Generator().manual_seed(1), K)
    assert torch.equal(dropped, drop_labels(labels, 0.1, torch.Generator().manual_seed(1), K))
    is_null = dropped == K
    assert abs(is_null.float().mean().item() - 0.1) < 0.01  # binomial sd 0.003
    assert torch.equal(dropped[~is_null], labels[~is_null])
    with pytest.raises(ValueError, match="p_uncond"):
        drop_labels(labels, 1.5, torch.Generator(), K)


def test_balanced_labels_give_every_class_its_share():
    counts = torch.bincount(balanced_labels(1003, K), minlength=K)
    assert counts.sum() == 1003 and counts.max() - counts.min() <= 1 and counts.min() == 100


# ----------------------------------------------------------------------------------------------------------------
# dit


def test_dit_tiny_is_a_pixel_dit_on_digits_with_a_null_row():
    model = build_model("dit-tiny", resolution=8, channels=1, seed=0)
    config = model.config
    assert (config.patch_size, config.num_layers) == (2, 2)
    assert (config.num_attention_heads, config.attention_head_dim) == (4, 16)
    assert (config.in_channels, config.out_channels, config.sample_size) == (1, 2, 8)  # learned sigma: 2 x in
    assert config.num_embeds_ada_norm == K
    for block in model.transformer_blocks:
        assert block.norm1.emb.class_embedder.embedding_table.weight.shape == (K + 1, 64)
    family = family_of(model)
    assert family.name == "dit" and family.feature_layout == "NLD"
    assert family.null_label(model) == K and family.learns_sigma(model) and family.data_shape(model) == (1, 8, 8)
    # adaLN-Zero (DiT Sec. 3.2): gates and output layer start at zero, so a fresh DiT predicts exactly 0.
    x, t = inputs()
    assert torch.equal(model_denoiser(model)(x, t, torch.tensor([1, 2, 3, 4])), torch.zeros(4, 2, 8, 8))
    # Same seed, same weights; the per-block embedders start equal (DiT shares one).
    again = build_model("dit-tiny", resolution=8, channels=1, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    first, second = (block.norm1.emb.state_dict() for block in model.transformer_blocks)
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_dit_label_dropout_happens_once_and_is_ours():
    """diffusers' own LabelEmbedding drops 10% of labels in train mode (global RNG, in every block); the family
    switches it off, so train mode computes what eval mode does and only drop_labels drops."""
    from diffusers import DiTTransformer2DModel

    family = get_family("dit")
    config = family.model_config({"patch_size": 2, "depth": 2, "width": 64, "heads": 4}, resolution=8, channels=1,
                                 num_classes=K, learn_sigma=True)
    raw = perturbed(DiTTransformer2DModel(**config), seed=2)
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t, labels = torch.full((64,), 500), torch.arange(64) % K
    with torch.no_grad():
        expected = raw.eval()(x, t, class_labels=labels).sample
        torch.manual_seed(0)
        assert not torch.allclose(raw.train()(x, t, class_labels=labels).sample, expected)  # diffusers drops
        family.prepare(raw)
        torch.manual_seed(0)
        torch.testing.assert_close(raw.train()(x, t, class_labels=labels).sample, expected, rtol=0, atol=0)


def test_dit_null_path_and_conditioning(dit):
    x, t = inputs()
    labels = torch.tensor([0, 5, 9, 5])
    denoise = model_denoiser(dit)
    with torch.no_grad():
        torch.testing.assert_close(denoise(x, t, labels), dit(x, t, class_labels=labels).sample, rtol=0, atol=0)
        torch.testing.assert_close(denoise(x, t), dit(x, t, class_labels=torch.full((4,), K)).sample, rtol=0, atol=0)
        assert not torch.allclose(denoise(x, t, labels), denoise(x, t))


def test_unconditional_dit_has_only_the_null_row():
    model = perturbed(build_model("dit-tiny", resolution=8, channels=3, num_classes=0, learn_sigma=False)).eval()
    family = family_of(model)
    assert model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight.shape[0] == 1
    assert family.num_classes(model) == 0 and family.null_label(model) == 0
    x, t = inputs(channels=3)
    with torch.no_grad():
        out = model_denoiser(model)(x, t)
        torch.testing.assert_close(out, model(x, t, class_labels=torch.zeros(4, dtype=torch.long)).sample)
    assert out.shape == (4, 3, 8, 8)
    with pytest.raises(ValueError, match="unconditional"):
        model_denoiser(model)(x, t, torch.zeros(4, dtype=torch.long))


def test_dit_saves_as_a_diffusers_folder_and_loads_with_diffusers_own_class(dit, tmp_path):
    from diffusers import DiTTransformer2DModel

    folder = save_model(dit, tmp_path / "dit")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert family_of_folder(folder).name == "dit"
    plain = DiTTransformer2DModel.from_pretrained(folder, use_safetensors=True).eval()
    loaded = load_model(folder, resolution=8, channels=1)
    assert all(module.dropout_prob == 0.0 for module in loaded.modules() if type(module).__name__ == "LabelEmbedding")
    x, t = inputs()
    labels = torch.tensor([1, 2, 3, K])
    with torch.no_grad():
        reference = dit(x, t, class_labels=labels).sample
        torch.testing.assert_close(plain(x, t, class_labels=labels).sample, reference, rtol=0, atol=0)
        torch.testing.assert_close(loaded.train()(x, t, class_labels=labels).sample, reference, rtol=0, atol=0)
    with pytest.raises(ValueError, match="data.resolution"):
        load_model(folder, resolution=16)
    with pytest.raises(ValueError, match="divisible by 2"):
        build_model("dit-tiny", resolution=9, channels=1)
    with pytest.raises(ValueError, match="model.width .* divisible by model.heads"):
        build_model("dit-tiny", resolution=8, channels=1, heads=3)


def test_dit_projection_places_are_the_blocks_and_output_tokens(dit):
    family = family_of(dit)
    places = family.projection_places(dit)
    assert places == ["transformer_blocks.0", "transformer_blocks.1"]
    seen = {}

    def record(place):
        def hook(module, args, out):
            seen[place] = out.shape
        return hook

    handles = [dit.get_submodule(place).register_forward_hook(record(place)) for place in places]
    with torch.no_grad():
        model_denoiser(dit)(*inputs())
    for handle in handles:
        handle.remove()
    assert all(shape == (4, 16, 64) for shape in seen.values())  # [B, (8/2)^2 tokens, width]: "NLD"


# ----------------------------------------------------------------------------------------------------------------
# classifier-free guidance


def test_combine_guidance_by_hand():
    c = torch.tensor([[[[1.0]], [[2.0]], [[10.0]]]])  # 2 eps channels, then 1 variance channel
    u = torch.tensor([[[[3.0]], [[-1.0]], [[-7.0]]]])
    out = combine_guidance(c, u, 1.5, channels=2)
    # 3 + 1.5 (1 - 3) = 0; -1 + 1.5 (2 + 1) = 3.5; the variance channel is the conditional one.
    assert out.flatten().tolist() == [0.0, 3.5, 10.0]


def test_guidance_w1_is_conditional_w0_unconditional_in_one_batched_forward(dit):
    x, t = inputs()
    labels, null = torch.tensor([0, 5, 9, 5]), torch.full((4,), K)
    base = model_denoiser(dit)
    batches = []

    def counting(x_t, tt, cond):
        batches.append(x_t.shape[0])
        return base(x_t, tt, cond)

    with torch.no_grad():
        conditional, unconditional = base(x, t, labels), base(x, t)
        torch.testing.assert_close(conditioned_denoiser(counting, labels, null, 1.0)(x, t), conditional)
        assert batches == [4]
        w0 = conditioned_denoiser(counting, labels, null, 0.0)(x, t)
        assert batches == [4, 8]  # [cond; null] in one call
        torch.testing.assert_close(w0[:, :1], unconditional[:, :1], atol=1e-6, rtol=0)
        torch.testing.assert_close(w0[:, 1:], conditional[:, 1:], atol=1e-6, rtol=0)  # conditional variance
        w4 = conditioned_denoiser(base, labels, null, 4.0)(x, t)
        torch.testing.assert_close(w4[:, :1], unconditional[:, :1] + 4.0 * (conditional[:, :1] - unconditional[:, :1]),
                                   atol=1e-5, rtol=0)
    assert conditioned_denoiser(base, None) is base
    with pytest.raises(ValueError, match="needs a condition"):
        conditioned_denoiser(base, None, guidance_scale=2.0)
    with pytest.raises(ValueError, match="null condition"):
        conditioned_denoiser(base, labels, None, 2.0)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_guided_sampling_at_w1_and_w0_is_conditional_and_unconditional_sampling(dit, sampler):
    base = model_denoiser(dit)
    labels = torch.arange(6) % K
    null = get_family("dit").null_condition(dit, 6)
    kwargs = dict(shape=(1, 8, 8), sampler=sampler, steps=3, seed=3, batch_size=4)

    def draw(denoiser, **extra):
        return torch.cat(list(sample_images(denoiser, NoiseSchedule.create("squaredcos_cap_v2", T), 6, **kwargs,
                                            **extra)))

    # The reference bakes in each batch's own rows of the labels (a batch's first step is t = 999). w = 0 is the
    # unconditional eps with the conditional variance (which DDPM uses; DDIM ignores it).
    def reference(unconditional_eps: bool):
        rows, current = iter([labels[:4], labels[4:]]), [None]

        def denoise(x_t, t):
            if t[0] == 999:
                current[0] = next(rows)
            out = base(x_t, t, current[0])
            return torch.cat([base(x_t, t)[:, :1], out[:, 1:]], 1) if unconditional_eps else out
        return denoise

    by_hand = draw(reference(False))
    torch.testing.assert_close(draw(base, cond=labels, null_cond=null, guidance_scale=1.0), by_hand)
    torch.testing.assert_close(draw(base, cond=labels, null_cond=null, guidance_scale=0.0), draw(reference(True)),
                               atol=1e-5, rtol=0)
    if sampler == "ddim":
        torch.testing.assert_close(draw(base, cond=labels, null_cond=null, guidance_scale=0.0), draw(base),
                                   atol=1e-5, rtol=0)
    guided = draw(base, cond=labels, null_cond=null, guidance_scale=1.5)
    assert guided.shape == (6, 1, 8, 8) and not torch.allclose(guided, by_hand)
    with pytest.raises(ValueError, match="one row per image"):
        draw(base, cond=labels[:5])


def test_ddpm_samples_with_the_learned_variance():
    """v = -1 is beta~' (the fixed DDPM path); v = +1 is the respaced beta' = 1 - abar_t / abar_prev, replayed
    step by step from the documented noise order (initial noise, then one draw per step but the last)."""
    schedule = NoiseSchedule.create("linear", T)

    def eps(x_t, t):
        return 0.5 * x_t

    def with_v(value):
        return lambda x_t, t: torch.cat([eps(x_t, t), torch.full_like(x_t, value)], 1)

    kwargs = dict(shape=(1, 4, 4), sampler="ddpm", steps=20, seed=9, batch_size=3)
    fixed = next(sample_images(eps, schedule, 3, **kwargs))
    torch.testing.assert_close(next(sample_images(with_v(-1.0), schedule, 3, **kwargs)), fixed, atol=1e-5, rtol=0)

    seen = []

    def recording(x_t, t):
        seen.append(x_t.clone())
        return with_v(1.0)(x_t, t)

    final = next(sample_images(recording, schedule, 3, **kwargs))
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, T))
    grid = list(np.linspace(0, T - 1, 20).round().astype(int)[::-1])
    replay = torch.Generator().manual_seed(9)
    x = torch.randn(3, 1, 4, 4, generator=replay).double().numpy()
    for i, t in enumerate(grid):
        np.testing.assert_allclose(seen[i].double().numpy(), x, atol=1e-4, rtol=0)
        prev = abar[grid[i + 1]] if i + 1 < len(grid) else 1.0
        beta = 1 - abar[t] / prev
        x0 = np.clip((x - np.sqrt(1 - abar[t]) * 0.5 * x) / np.sqrt(abar[t]), -1, 1)
        mean = np.sqrt(prev) * beta / (1 - abar[t]) * x0 + np.sqrt(1 - beta) * (1 - prev) / (1 - abar[t]) * x
        if i + 1 < len(grid):
            mean = mean + np.sqrt(beta) * torch.randn(3, 1, 4, 4, generator=replay).double().numpy()
        x = mean
    np.testing.assert_allclose(final.double().numpy(), np.clip(x, -1, 1), atol=1e-4, rtol=0)
    assert not torch.allclose(final, fixed)


def test_routed_denoiser_hands_each_specialist_its_rows_of_the_condition():
    got = []

    def specialist(x_t, t, cond=None):
        got.append(cond.tolist())
        return torch.zeros_like(x_t)

    routed = routed_denoiser([(0, 500), (500, 1000)], [specialist, specialist])
    routed(torch.zeros(3, 1, 2, 2), torch.tensor([10, 900, 20]), torch.tensor([7, 8, 9]))
    assert got == [[7, 9], [8]]


# ----------------------------------------------------------------------------------------------------------------
# IDDPM's variational bound, re-derived in float64 numpy / scipy


def reference_bound(mean_output, variance_output, x0, x_t, t, betas, target):
    """L_t in bits from Nichol & Dhariwal (2021) Sec. 3.1 and Ho et al. (2020) Eq. 13, written independently."""
    mean_output, v = mean_output.double().numpy(), variance_output.double().numpy()
    x0, x_t, t = x0.double().numpy(), x_t.double().numpy(), t.numpy()
    abar = np.cumprod(1 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    beta_tilde = betas * (1 - abar_prev) / (1 - abar)
    beta_tilde[0] = beta_tilde[1]  # log 0 at t = 0: IDDPM's code uses beta~_1 there
    out = []
    for i, step in enumerate(t):
        a, s = math.sqrt(abar[step]), math.sqrt(1 - abar[step])
        pred = mean_output[i]
        x0_hat = {"epsilon": (x_t[i] - s * pred) / a, "x0": pred, "v": a * x_t[i] - s * pred}[target]

        def mu(start):
            return (math.sqrt(abar_prev[step]) * betas[step] / (1 - abar[step]) * start
                    + math.sqrt(1 - betas[step]) * (1 - abar_prev[step]) / (1 - abar[step]) * x_t[i])

        f = (v[i] + 1) / 2
        model_var = np.exp(f * np.log(betas[step]) + (1 - f) * np.log(beta_tilde[step]))
        if step > 0:
            kl = torch.distributions.kl_divergence(
                torch.distributions.Normal(torch.from_numpy(mu(x0[i])), math.sqrt(beta_tilde[step])),
                torch.distributions.Normal(torch.from_numpy(mu(x0_hat)), torch.from_numpy(np.sqrt(model_var))))
            out.append(kl.mean().item() / math.log(2))
        else:
            m, sd = mu(x0_hat), np.sqrt(model_var)
            upper, lower = (x0[i] + 1 / 255 - m) / sd, (x0[i] - 1 / 255 - m) / sd
            logp = np.where(x0[i] < -0.999, norm.logcdf(upper),
                            np.where(x0[i] > 0.999, norm.logsf(lower), np.log(norm.cdf(upper) - norm.cdf(lower))))
            out.append(-logp.mean() / math.log(2))
    return np.array(out)


def bound_case(schedule, target, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor([0, 0, 1, 7, 250, 600, 998, 999])
    levels = torch.randint(0, 256, (len(t), 2, 4, 4), generator=g)
    levels[:, 0, 0, 0], levels[:, 0, 0, 1] = 0, 255  # both open-ended bins
    x0 = levels.float() / 127.5 - 1
    noise = torch.randn(x0.shape, generator=g)
    x_t = schedule.add_noise(x0, noise, t)
    # An error of 0.1 in eps or v is ~0.001 in x0 at t = 0; as large an x0 error would put x0 ~10 sd outside
    # the decoder's bin (probability below the 1e-12 floor), so the x0 target gets a comparable error.
    error = 0.003 if target == "x0" else 0.1
    mean_output = prediction_target(target, x0, noise, t, schedule) + error * torch.randn(x0.shape, generator=g)
    variance_output = torch.rand(x0.shape, generator=g) * 2 - 1
    return mean_output, variance_output, x0, x_t, t


@pytest.mark.parametrize("target", ["epsilon", "v", "x0"])
@pytest.mark.parametrize("name", ["linear", "squaredcos_cap_v2"])
def test_variational_bound_matches_the_iddpm_formulas_per_sample(name, target):
    schedule = NoiseSchedule.create(name, T)
    case = bound_case(schedule, target)
    got = vb_terms(*case, schedule, target=target)
    expected = reference_bound(*case, schedule.betas.numpy(), target)
    assert got.shape == (8,) and np.all(np.isfinite(expected))
    np.testing.assert_allclose(got.numpy(), expected, rtol=2e-4, atol=1e-5)


def test_the_bound_trains_the_variance_only_and_vanishes_for_the_true_posterior():
    schedule = NoiseSchedule.create("linear", T)
    mean_output, variance_output, x0, x_t, t = bound_case(schedule, "epsilon")
    mean_output.requires_grad_(True)
    variance_output.requires_grad_(True)
    vb_terms(mean_output, variance_output, x0, x_t, t, schedule).sum().backward()
    assert mean_output.grad is None and variance_output.grad.abs().sum() > 0  # stop-gradient on the mean

    # The exact eps and v = -1 (variance beta~_t) is the true posterior: KL 0 for t > 0.
    noise = (x_t - schedule.coefficients(t, x0)[0] * x0) / schedule.coefficients(t, x0)[1]
    exact = vb_terms(noise, -torch.ones_like(x0), x0, x_t, t, schedule)
    assert exact[t > 0].abs().max() < 1e-4 and (exact[t == 0] > 0).all()


@pytest.mark.parametrize("base, target", [("dit-tiny", "epsilon"), ("dit-tiny", "v"), ("dit-tiny", "x0"),
                                          ("tiny", "epsilon"), ("tiny", "v")])
def test_learned_sigma_loss_is_weighted_mse_plus_t_over_1000_bound_through_a_family(base, target):
    schedule = NoiseSchedule.create("squaredcos_cap_v2", T)
    weighting = build_weighting("min-snr")
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    noise, t, labels = torch.randn(x0.shape, generator=g), torch.tensor([0, 10, 500, 990]), torch.tensor([1, 2, K, 3])
    model = perturbed(build_model(base, resolution=8, channels=1, seed=1, num_classes=K, learn_sigma=True), seed=3)
    loss = diffusion_loss(model_denoiser(model), x0, t, noise, schedule, target=target, weighting=weighting,
                          cond=labels)
    with torch.no_grad():
        x_t = schedule.add_noise(x0, noise, t)
        out = model(x_t, t, class_labels=labels).sample
        snr = schedule.snr(t).float()
        mse = weighting(snr, target).float() * per_sample_loss(out[:, :1], prediction_target(target, x0, noise, t,
                                                                                              schedule))
        expected = mse + vb_terms(out[:, :1], out[:, 1:], x0, x_t, t, schedule, target=target)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)  # T / 1000 = 1
    half = weighted_loss(out, x0, t, noise, schedule, target=target, weighting=weighting, vb_weight=0.5)
    torch.testing.assert_close(half, mse + 0.5 * (expected - mse), rtol=1e-5, atol=1e-6)
    assert loss.requires_grad and torch.isfinite(loss).all()
    with pytest.raises(ValueError, match="learned sigma"):
        weighted_loss(torch.zeros(4, 3, 8, 8), x0, t, noise, schedule, target=target, weighting=weighting)
