"""Diffusion core against independent truths: numpy schedules and closed forms, the papers' x0-space loss weights,
exact DDIM reconstruction with an oracle, DDPM's posterior variance step by step, and the DDPM CIFAR-10 UNet."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ant_ray.diffusion import (
    LOSS_WEIGHTINGS,
    PRESETS,
    SAMPLERS,
    NoiseSchedule,
    build_model,
    build_weighting,
    count_parameters,
    diffusion_loss,
    load_model,
    model_denoiser,
    per_sample_loss,
    prediction_target,
    routed_denoiser,
    sample_images,
    save_model,
    timestep_grid,
    weighted_loss,
)
from ant_ray.diffusion.samplers import predict_x0_eps

T = 1000
TARGETS = ("epsilon", "v", "x0")


@pytest.fixture(scope="module")
def linear() -> NoiseSchedule:
    return NoiseSchedule.create("linear", T)


@pytest.fixture(scope="module")
def cosine() -> NoiseSchedule:
    return NoiseSchedule.create("cosine", T)


def numpy_linear_abar() -> np.ndarray:
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))


# ----------------------------------------------------------------------------------------------------------------
# schedules


def test_linear_betas_are_ddpm(linear):
    betas = linear.betas.numpy()
    assert linear.T == T and linear.betas.dtype == torch.float64
    assert betas[0] == pytest.approx(1e-4, abs=1e-15) and betas[-1] == pytest.approx(0.02, abs=1e-15)
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / (T - 1), rtol=1e-9)
    np.testing.assert_allclose(linear.alphas_cumprod.numpy(), numpy_linear_abar(), rtol=1e-12)


def test_cosine_abar_is_the_closed_form_where_not_clipped(cosine):
    s = 0.008

    def f(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = cosine.betas.numpy()
    clipped = np.flatnonzero(betas >= 0.999)
    # Only the last step(s), where f -> 0, are clipped; before them abar_t = f((t+1)/T) / f(0) (0-indexed t).
    assert len(clipped) >= 1 and clipped.min() >= T - 5
    unclipped = np.arange(clipped.min())
    closed = np.array([f((t + 1) / T) / f(0) for t in unclipped])
    np.testing.assert_allclose(cosine.alphas_cumprod.numpy()[unclipped], closed, rtol=1e-10)
    assert cosine.alphas_cumprod[-1] > 0  # clipping keeps the final SNR positive


@pytest.mark.parametrize("name, options, start, end", [("scaled_linear", {}, 0.00085, 0.012),
                                                        ("scaled_linear", {"beta_start": 0.0015, "beta_end": 0.0195},
                                                         0.0015, 0.0195)])
def test_scaled_linear_is_linear_in_sqrt_beta_and_diffusers_own(name, options, start, end):
    from diffusers import DDPMScheduler

    schedule = NoiseSchedule.create(name, T, **options)
    betas = schedule.betas.numpy()
    np.testing.assert_allclose(np.sqrt(betas), np.linspace(math.sqrt(start), math.sqrt(end), T), rtol=1e-12)
    reference = DDPMScheduler(num_train_timesteps=T, beta_schedule="scaled_linear", beta_start=start, beta_end=end)
    np.testing.assert_allclose(betas, reference.betas.double().numpy(), rtol=1e-6)  # diffusers keeps float32
    np.testing.assert_allclose(schedule.alphas_cumprod.numpy(), reference.alphas_cumprod.double().numpy(), rtol=1e-5)


def test_squaredcos_cap_v2_is_the_cosine_schedule_and_diffusers_own():
    from diffusers import DDPMScheduler

    schedule = NoiseSchedule.create("squaredcos_cap_v2", T)
    assert torch.equal(schedule.betas, NoiseSchedule.create("cosine", T).betas)
    reference = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2")
    np.testing.assert_allclose(schedule.betas.numpy(), reference.betas.double().numpy(), rtol=1e-6)


def test_posterior_variance_is_ddpm_beta_tilde(cosine):
    betas = cosine.betas.numpy()
    abar = np.cumprod(1 - betas)
    expected = betas[1:] * (1 - abar[:-1]) / (1 - abar[1:])
    np.testing.assert_allclose(cosine.posterior_variance.numpy()[1:], expected, rtol=1e-12)
    assert cosine.posterior_variance[0] == 0 and cosine.alphas_cumprod_prev[0] == 1


@pytest.mark.parametrize("name", ["linear", "cosine", "scaled_linear", "squaredcos_cap_v2"])
def test_snr_is_exact_and_strictly_decreasing(name):
    schedule = NoiseSchedule.create(name, T)
    abar = np.cumprod(1.0 - schedule.betas.numpy())
    snr = schedule.snr().numpy()
    np.testing.assert_allclose(snr, abar / (1 - abar), rtol=1e-12)
    assert np.all(np.diff(snr) < 0) and np.all(snr > 0)
    assert schedule.snr(7).item() == pytest.approx(snr[7], rel=1e-15)
    np.testing.assert_array_equal(schedule.snr(torch.tensor([3, 900])).numpy(), snr[[3, 900]])


def test_add_noise_is_a_x0_plus_s_eps(linear):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    t = torch.tensor([0, 250, 600, 999])
    abar = numpy_linear_abar()[t.numpy()]
    expected = (np.sqrt(abar)[:, None, None, None] * x0.double().numpy()
                + np.sqrt(1 - abar)[:, None, None, None] * eps.double().numpy())
    np.testing.assert_allclose(linear.add_noise(x0, eps, t).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_coefficients_keep_precision_in_half_dtypes(linear):
    # sqrt(1 - abar_0) = 0.01; computing 1 - abar in bf16 would round it to 0.
    a, s = linear.coefficients(torch.tensor([0]), torch.zeros(1, 2, dtype=torch.bfloat16))
    assert a.dtype == torch.bfloat16 and a.shape == (1, 1)
    assert s.float().item() == pytest.approx(0.01, rel=1e-2)


def test_schedule_errors():
    with pytest.raises(ValueError, match="diffusion.T"):
        NoiseSchedule.create("linear", 1)
    with pytest.raises(ValueError, match="cosine, linear"):
        NoiseSchedule.create("quadratic", T)


# ----------------------------------------------------------------------------------------------------------------
# loss weightings: every method is one x0-space weight (DeMe Sec. 7.1), whatever the model predicts

# The papers' x0-space weights, written out here independently of the package.
PAPER_X0_WEIGHTS = {
    ("min-snr", ()): lambda snr: np.minimum(snr, 5.0),
    ("min-snr", (("gamma", 1.0),)): lambda snr: np.minimum(snr, 1.0),
    ("snr+1", ()): lambda snr: snr + 1.0,
    ("truncated-snr", ()): lambda snr: np.maximum(snr, 1.0),
    ("p2", ()): lambda snr: snr / (1.0 + snr),
    ("p2", (("k", 2.0), ("gamma", 0.5))): lambda snr: snr / np.sqrt(2.0 + snr),
}
# 'uniform' is weight 1 on the predicted target: DDPM's L_simple, i.e. x0-weight SNR for epsilon (the paper's
# "standard"), SNR + 1 for v and 1 for x0.
UNIFORM_X0_WEIGHT = {"epsilon": lambda snr: snr, "v": lambda snr: snr + 1.0, "x0": lambda snr: np.ones_like(snr)}


def x0_from_prediction(prediction: np.ndarray, x_t: np.ndarray, a: np.ndarray, s: np.ndarray,
                       target: str) -> np.ndarray:
    """The standard conversions (Ho et al.; Salimans & Ho for v), in float64."""
    if target == "epsilon":
        return (x_t - s * prediction) / a
    if target == "v":
        return a * x_t - s * prediction
    return prediction


def weighting_cases():
    for (name, options), weight in PAPER_X0_WEIGHTS.items():
        for target in TARGETS:
            yield pytest.param(name, dict(options), target, weight, id=f"{name}{dict(options)}-{target}")
    for target in TARGETS:
        yield pytest.param("uniform", {}, target, UNIFORM_X0_WEIGHT[target], id=f"uniform-{target}")


@pytest.mark.parametrize("name, options, target, x0_weight", list(weighting_cases()))
def test_weighted_loss_is_x0_weight_times_x0_error(linear, name, options, target, x0_weight):
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([0, 10, 100, 300, 500, 700, 900, 999])
    x0 = torch.rand(len(t), 3, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    prediction = prediction_target(target, x0, noise, t, linear) + 0.3 * torch.randn(x0.shape, generator=g)

    loss = weighted_loss(prediction, x0, t, noise, linear, target=target, weighting=build_weighting(name, **options))

    abar = numpy_linear_abar()[t.numpy()]
    a, s = np.sqrt(abar)[:, None, None, None], np.sqrt(1 - abar)[:, None, None, None]
    x0_np, noise_np = x0.double().numpy(), noise.double().numpy()
    x_t = a * x0_np + s * noise_np
    x0_hat = x0_from_prediction(prediction.double().numpy(), x_t, a, s, target)
    snr = abar / (1 - abar)
    expected = x0_weight(snr) * ((x0_np - x0_hat) ** 2).reshape(len(t), -1).mean(axis=1)
    assert loss.shape == (len(t),) and loss.dtype == torch.float32
    np.testing.assert_allclose(loss.numpy(), expected, rtol=2e-4)


@pytest.mark.parametrize("name, options, snr, target, weight", [
    ("min-snr", {"gamma": 5.0}, 10.0, "epsilon", 0.5),
    ("min-snr", {"gamma": 5.0}, 10.0, "v", 5.0 / 11.0),
    ("min-snr", {"gamma": 5.0}, 10.0, "x0", 5.0),
    ("min-snr", {"gamma": 5.0}, 2.0, "epsilon", 1.0),
    ("p2", {"k": 1.0, "gamma": 1.0}, 1.0, "epsilon", 0.5),
    ("p2", {"k": 1.0, "gamma": 1.0}, 1.0, "x0", 0.5),
    ("truncated-snr", {}, 0.25, "epsilon", 4.0),
    ("truncated-snr", {}, 4.0, "epsilon", 1.0),
    ("snr+1", {}, 1.0, "epsilon", 2.0),
    ("snr+1", {}, 3.0, "v", 1.0),
    ("uniform", {}, 0.3, "v", 1.0),
])
def test_weighting_spot_values(name, options, snr, target, weight):
    value = build_weighting(name, **options)(torch.tensor([snr], dtype=torch.float64), target)
    assert value.item() == pytest.approx(weight, rel=1e-12)


@pytest.mark.parametrize("name", LOSS_WEIGHTINGS.names())
@pytest.mark.parametrize("target", TARGETS)
def test_zero_snr_gives_finite_weights(name, target):
    snr = torch.tensor([0.0, 1e-12, 1e-3, 1.0], dtype=torch.float64)
    assert torch.isfinite(build_weighting(name)(snr, target)).all()


def test_zero_snr_epsilon_weights_keep_their_limits():
    # w(SNR)/SNR -> 1 for min-SNR (SNR < gamma) and -> 1/k^gamma for P2 as SNR -> 0; the guard must not make it 0.
    snr = torch.tensor([0.0, 1e-12], dtype=torch.float64)
    torch.testing.assert_close(build_weighting("min-snr", gamma=5)(snr, "epsilon"), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(build_weighting("p2", k=2.0, gamma=1.0)(snr, "epsilon"),
                               torch.full((2,), 0.5, dtype=torch.float64))


@pytest.mark.parametrize("name, options, match", [
    ("min-snr", {"gamma": 0}, "weighting.gamma"),
    ("min-snr", {"gamma": float("nan")}, "weighting.gamma"),
    ("p2", {"k": -1.0}, "weighting.k"),
    ("p2", {"gamma": -0.5}, "weighting.gamma"),
    ("min-snr", {"beta": 1.0}, "beta"),
    ("uniform", {"gamma": 5.0}, "gamma"),
])
def test_bad_weighting_options_name_the_option(name, options, match):
    with pytest.raises(ValueError, match=match):
        build_weighting(name, **options)


def test_unknown_weighting_and_target_list_the_choices():
    with pytest.raises(ValueError, match="min-snr, p2, snr\\+1, truncated-snr, uniform"):
        build_weighting("lognormal")
    with pytest.raises(ValueError, match="diffusion.prediction"):
        build_weighting("min-snr")(torch.ones(1), "score")


def test_prediction_targets_and_diffusion_loss(linear):
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([5, 500, 995])
    abar = linear.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(prediction_target("v", x0, noise, t, linear),
                               abar.sqrt() * noise - (1 - abar).sqrt() * x0)
    assert prediction_target("epsilon", x0, noise, t, linear) is noise
    with pytest.raises(ValueError, match="diffusion.prediction"):
        prediction_target("score", x0, noise, t, linear)

    weighting = build_weighting("min-snr")
    oracle = lambda x_t, tt: noise  # noqa: E731
    assert diffusion_loss(oracle, x0, t, noise, linear, target="epsilon", weighting=weighting).abs().max() < 1e-12
    zero = lambda x_t, tt: torch.zeros_like(x_t)  # noqa: E731
    loss = diffusion_loss(zero, x0, t, noise, linear, target="epsilon", weighting=weighting)
    snr = linear.snr(t).float()
    torch.testing.assert_close(loss, torch.clamp(snr, max=5) / snr * per_sample_loss(torch.zeros_like(noise), noise))


# ----------------------------------------------------------------------------------------------------------------
# samplers


def toy_denoiser(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for a network: depends on both x_t and t."""
    return 0.5 * x_t + 1e-3 * t.to(x_t.dtype).view(-1, 1, 1, 1)


def draw(schedule, n=4, shape=(1, 4, 4), **kwargs) -> torch.Tensor:
    return torch.cat(list(sample_images(toy_denoiser, schedule, n, shape=shape, **kwargs)))


def test_timestep_grid():
    grid = timestep_grid(T, 50)
    assert len(grid) == 50 and grid[0] == T - 1 and grid[-1] == 0
    assert all(a > b for a, b in zip(grid, grid[1:]))
    assert timestep_grid(T, T) == list(range(T - 1, -1, -1))
    assert timestep_grid(T, 1) == [T - 1]  # one step starts from pure noise
    assert timestep_grid(T, 2) == [T - 1, 0]
    for steps in range(1, 38):  # rounding never merges two grid points
        assert len(set(timestep_grid(37, steps))) == steps
    for bad in (0, T + 1):
        with pytest.raises(ValueError, match="sampler.steps"):
            timestep_grid(T, bad)


@pytest.mark.parametrize("sampler, eta", [("ddim", 0.0), ("ddim", 0.7), ("ddpm", 1.0)])
def test_sampling_is_deterministic_under_a_seed(linear, sampler, eta):
    kwargs = dict(sampler=sampler, steps=20, eta=eta)
    first, again, other = draw(linear, seed=3, **kwargs), draw(linear, seed=3, **kwargs), draw(linear, seed=4, **kwargs)
    assert first.shape == (4, 1, 4, 4) and first.abs().max() <= 1
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_sampling_does_not_depend_on_how_the_cpu_device_is_named(linear):
    a = draw(linear, seed=5, sampler="ddpm", steps=10, device="cpu")
    b = draw(linear, seed=5, sampler="ddpm", steps=10, device=torch.device("cpu"))
    assert a.device.type == "cpu" and torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampling_on_cuda_matches_cpu(linear):
    # All noise comes from one CPU generator, so only float rounding may differ between devices.
    a = draw(linear, seed=5, sampler="ddpm", steps=10, device="cpu")
    b = draw(linear, seed=5, sampler="ddpm", steps=10, device="cuda")
    assert b.device.type == "cuda"
    torch.testing.assert_close(a, b.cpu(), atol=1e-4, rtol=1e-4)


def test_batch_split_is_reproducible_but_not_batch_size_invariant(linear):
    # Documented behaviour: one generator draws each batch's noise in turn, so (seed, n, batch_size) fixes the
    # images, and another batch_size hands the random numbers to other images (stochastic samplers differ).
    batches = list(sample_images(toy_denoiser, linear, 10, shape=(1, 3, 3), sampler="ddpm", steps=10, seed=0,
                                 batch_size=4))
    assert [b.shape[0] for b in batches] == [4, 4, 2]
    split = torch.cat(batches)
    assert torch.equal(split, draw(linear, n=10, shape=(1, 3, 3), sampler="ddpm", steps=10, seed=0, batch_size=4))
    whole = draw(linear, n=10, shape=(1, 3, 3), sampler="ddpm", steps=10, seed=0, batch_size=10)
    assert whole.shape == split.shape and not torch.allclose(whole, split)


def oracle_for(x0: torch.Tensor, schedule: NoiseSchedule, target: str, calls: list | None = None):
    """Returns exactly the target that a perfect model would give for the known x0."""
    abar = schedule.alphas_cumprod

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = abar[t].sqrt().view(-1, 1, 1, 1), (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
        eps = (x_t.double() - a * x0.double()) / s
        if calls is not None:
            calls.append(eps)
        prediction = {"epsilon": eps, "x0": x0.double().expand_as(eps), "v": a * eps - s * x0.double()}[target]
        return prediction.to(x_t.dtype)

    return denoise


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
def test_ddim_eta0_with_an_oracle_reconstructs_x0(target, schedule_name):
    schedule = NoiseSchedule.create(schedule_name, T)
    x0 = torch.tensor([0.3, -0.7, 0.9]).view(1, 3, 1, 1).expand(1, 3, 4, 4)  # a constant image
    calls: list = []
    images = torch.cat(list(sample_images(oracle_for(x0, schedule, target, calls), schedule, 3, shape=(3, 4, 4),
                                          sampler="ddim", steps=25, eta=0.0, target=target, seed=11)))
    torch.testing.assert_close(images, x0.expand(3, 3, 4, 4), atol=2e-5, rtol=0)
    # Deterministic DDIM stays on the oracle's line x_t = a_t x0 + s_t eps: the implied eps never changes.
    assert len(calls) == 25
    for eps in calls[1:]:
        torch.testing.assert_close(eps, calls[0], atol=1e-3, rtol=0)


def test_ddpm_with_T_steps_uses_the_posterior_mean_and_variance(linear):
    """Replays the documented noise order (initial noise, then one draw per step) and checks every step against
    DDPM's closed form: x_{t-1} = mu~_t(x0_hat, x_t) + sqrt(beta~_t) z, beta~_t = (1-abar_{t-1})/(1-abar_t) beta_t."""
    seen: list[torch.Tensor] = []

    def recording(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(x_t.clone())
        return 0.5 * x_t  # an epsilon prediction whose x0 is clipped at high noise and free at low noise

    shape, seed = (2, 1, 4, 4), 7
    final = next(sample_images(recording, linear, 2, shape=shape[1:], sampler="ddpm", steps=T, eta=0.0,  # eta ignored
                               seed=seed, batch_size=2))
    assert len(seen) == T

    betas = linear.betas.numpy()
    abar = numpy_linear_abar()
    replay = torch.Generator().manual_seed(seed)
    assert torch.equal(seen[0], torch.randn(shape, generator=replay))

    def x0_hat(x: np.ndarray, t: int) -> np.ndarray:
        return np.clip((x - np.sqrt(1 - abar[t]) * 0.5 * x) / np.sqrt(abar[t]), -1, 1)

    for i, t in enumerate(range(T - 1, 0, -1)):
        x_t = seen[i].double().numpy()
        mean = (np.sqrt(abar[t - 1]) * betas[t] / (1 - abar[t]) * x0_hat(x_t, t)
                + np.sqrt(1 - betas[t]) * (1 - abar[t - 1]) / (1 - abar[t]) * x_t)
        variance = (1 - abar[t - 1]) / (1 - abar[t]) * betas[t]
        z = torch.randn(shape, generator=replay).double().numpy()
        np.testing.assert_allclose(seen[i + 1].double().numpy(), mean + np.sqrt(variance) * z, atol=2e-5, rtol=0)
    # The last step (t = 0) adds no noise: the output is the clipped x0 prediction.
    np.testing.assert_allclose(final.double().numpy(), x0_hat(seen[-1].double().numpy(), 0), atol=1e-5, rtol=0)
    # beta~ really differs from beta at small t (there the two DDPM variance choices are far apart).
    assert (1 - abar[0]) / (1 - abar[1]) < 0.6


@pytest.mark.parametrize("target", TARGETS)
def test_predict_x0_eps_round_trips(linear, target):
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0, 400, 999])
    a, s = linear.coefficients(t, x0)
    prediction = prediction_target(target, x0, eps, t, linear)
    x0_back, eps_back = predict_x0_eps(prediction, a * x0 + s * eps, a, s, target)
    tol = dict(atol=1e-3, rtol=1e-3)  # epsilon -> x0 divides by sqrt(abar_999) = 0.006
    torch.testing.assert_close(x0_back, x0, **tol)
    torch.testing.assert_close(eps_back, eps, **tol)
    with pytest.raises(ValueError, match="diffusion.prediction"):
        predict_x0_eps(prediction, x0, a, s, "score")


def test_routed_denoiser_sends_each_timestep_to_its_specialist():
    got: dict[int, list[int]] = {0: [], 1: []}

    def specialist(index: int):
        def denoise(x_t, t):
            got[index].extend(t.tolist())
            return torch.full_like(x_t, float(index + 1))
        return denoise

    routed = routed_denoiser([(500, 1000), (0, 500)], [specialist(0), specialist(1)])
    t = torch.tensor([0, 999, 499, 500])
    out = routed(torch.zeros(4, 1, 2, 2), t)
    assert out[:, 0, 0, 0].tolist() == [2.0, 1.0, 2.0, 1.0]
    assert sorted(got[0]) == [500, 999] and sorted(got[1]) == [0, 499]

    with pytest.raises(ValueError, match=r"do not cover timesteps \[700\]"):
        routed_denoiser([(0, 500), (500, 700)], [specialist(0), specialist(1)])(torch.zeros(2, 1, 2, 2),
                                                                                 torch.tensor([10, 700]))
    with pytest.raises(ValueError, match="overlap"):
        routed_denoiser([(0, 600), (400, 900)], [specialist(0), specialist(1)])
    with pytest.raises(ValueError, match="start < end"):
        routed_denoiser([(5, 5)], [specialist(0)])
    with pytest.raises(ValueError, match="one denoiser per range"):
        routed_denoiser([(0, 1000)], [specialist(0), specialist(1)])


def test_sampling_errors(linear):
    with pytest.raises(ValueError, match="n >= 1"):
        next(sample_images(toy_denoiser, linear, 0, shape=(1, 2, 2)))
    with pytest.raises(ValueError, match="ddim, ddpm"):
        next(sample_images(toy_denoiser, linear, 1, shape=(1, 2, 2), sampler="euler"))
    assert SAMPLERS.names() == ["ddim", "ddpm"]


# ----------------------------------------------------------------------------------------------------------------
# models


def test_ddpm_cifar10_preset_is_google_ddpm_cifar10_32():
    model = build_model("ddpm-cifar10", resolution=32, channels=3)
    # The 35.7M of Ho et al.; diffusers counts 35,746,307 for google/ddpm-cifar10-32's config.
    assert count_parameters(model) == 35_746_307
    config = model.config
    assert list(config.block_out_channels) == [128, 256, 256, 256] and config.layers_per_block == 2
    assert list(config.down_block_types) == ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"]
    assert list(config.up_block_types) == ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]
    assert (config.norm_eps, config.norm_num_groups, config.downsample_padding) == (1e-6, 32, 0)
    assert (config.flip_sin_to_cos, config.freq_shift, config.time_embedding_type) == (False, 1, "positional")
    assert (config.act_fn, config.sample_size, config.attention_head_dim) == ("silu", 32, None)
    assert config.dropout == 0.1  # DDPM's CIFAR-10 training dropout
    # Attention at 16x16 (second down block, third up block), one head over all 256 channels as in DDPM.
    assert model.down_blocks[1].attentions[0].heads == 1 and model.up_blocks[2].attentions[0].heads == 1


def test_presets_build_seeded_and_check_resolution():
    assert {"tiny", "ddpm-cifar10"} <= set(PRESETS)
    a, b = build_model("tiny", resolution=8, channels=1, seed=0), build_model("tiny", resolution=8, channels=1, seed=0)
    c = build_model("tiny", resolution=8, channels=1, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), c.state_dict().values()))
    out = model_denoiser(a.eval())(torch.zeros(2, 1, 8, 8), torch.tensor([0, 999]))
    assert out.shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="divisible by 8"):
        build_model("ddpm-cifar10", resolution=30, channels=3)
    with pytest.raises(ValueError, match="divisible by 2"):
        build_model("tiny", resolution=9, channels=3)


def test_save_load_round_trip_is_safetensors_only(tmp_path):
    model = build_model("tiny", resolution=8, channels=3, seed=3).eval()
    folder = save_model(model, tmp_path / "unet")
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert not list(tmp_path.rglob("*.bin"))

    loaded = load_model(folder, resolution=8, channels=3).eval()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x, t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 900])
    torch.testing.assert_close(loaded(x, t).sample, model(x, t).sample, rtol=0, atol=0)
    assert count_parameters(build_model(str(folder), resolution=8, channels=3)) == count_parameters(model)

    with pytest.raises(ValueError, match="data.channels"):
        load_model(folder, channels=1)
    with pytest.raises(ValueError, match="data.resolution"):
        load_model(folder, resolution=16)


def test_load_model_errors_name_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        build_model(str(tmp_path / "nowhere"), resolution=8, channels=3)
    save_model(build_model("tiny", resolution=8, channels=3), tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").rename(tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(tmp_path)
