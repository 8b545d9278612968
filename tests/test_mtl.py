"""MTL methods against independent truths: hand-computed PCGrad projections, the defining optimality
conditions of Nash-MTL / IMTL-G / CAGrad, autograd for UW and GradNorm, and the dropped-rows equivalence
for absent clusters."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from ant_ray.mtl import (
    MTL_METHODS,
    build_mtl_method,
    flat_grad,
    flatten_grads,
    write_flat_grad,
)
from ant_ray.mtl.cagrad import cagrad_dual_weights
from ant_ray.mtl.imtl_g import imtl_g_weights
from ant_ray.mtl.nash_mtl import solve_nash_weights

ALL_NAMES = ["cagrad", "gradnorm", "imtl_g", "ls", "nash_mtl", "pcgrad", "rlw", "uw", "uw_pcgrad"]
GRADIENT_NAMES = ["cagrad", "gradnorm", "imtl_g", "nash_mtl", "pcgrad", "uw_pcgrad"]
LOSS_NAMES = ["ls", "rlw", "uw"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make(name: str, k: int, **options):
    return MTL_METHODS.get(name)(num_tasks=k, **options)


def all_present(k: int) -> torch.Tensor:
    return torch.ones(k, dtype=torch.bool)


def random_problem(k: int, p: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(k, p, generator=g, dtype=torch.float64)
    losses = torch.rand(k, generator=g, dtype=torch.float64) + 0.5
    return grads, losses


def pcgrad_reference(grads: torch.Tensor, orders: list[list[int]]) -> torch.Tensor:
    """Yu et al. Algorithm 1 written on the vectors themselves."""
    projected = []
    for i, order in enumerate(orders):
        g_pc = grads[i].clone()
        for j in order:
            dot = g_pc @ grads[j]
            if dot < 0:
                g_pc = g_pc - dot / (grads[j] @ grads[j]) * grads[j]
        projected.append(g_pc)
    return torch.stack(projected).sum(0)


# ---------------------------------------------------------------- registry and validation


def test_registry_lists_all_methods_and_rejects_unknown_names():
    assert MTL_METHODS.names() == ALL_NAMES
    with pytest.raises(ValueError, match="unknown MTL method 'mgda'.*pcgrad"):
        MTL_METHODS.get("mgda")
    for name in ALL_NAMES:
        method = make(name, 3)
        assert method.needs_grads == (name in GRADIENT_NAMES)
        assert isinstance(method, nn.Module)


def test_options_are_validated_with_clear_errors():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['C'\].*accepted: \['c', 'rescale'\]"):
        build_mtl_method("cagrad", 3, {"C": 0.4})
    assert build_mtl_method("nash_mtl", 3, {"update_every": 5}).update_every == 5
    bad = [
        ("cagrad", {"c": -0.1}, "c must be >= 0"),
        ("cagrad", {"rescale": 3}, "rescale must be one of"),
        ("nash_mtl", {"update_every": 0}, "update_every must be an integer >= 1"),
        ("nash_mtl", {"max_norm": -1.0}, "max_norm must be >= 0"),
        ("ls", {"reduction": "max"}, "reduction must be one of"),
        ("pcgrad", {"seed": -1}, "seed must be an integer >= 0"),
        ("gradnorm", {"alpha": float("nan")}, "alpha must be finite"),
        ("uw", {"init_logvar": "0"}, "init_logvar must be a number"),
    ]
    for name, options, message in bad:
        with pytest.raises(ValueError, match=message):
            make(name, 3, **options)
    with pytest.raises(ValueError, match="num_tasks must be an integer >= 1"):
        make("ls", 0)


def test_inputs_are_validated_and_families_are_not_mixed():
    pcgrad, ls = make("pcgrad", 3), make("ls", 3)
    grads, losses = random_problem(3, 5, 0)
    with pytest.raises(ValueError, match=r"grads must be a tensor of shape \(3, P\)"):
        pcgrad.combine(grads[:2], losses, all_present(3), 0)
    with pytest.raises(ValueError, match=r"losses must be a tensor of shape \(3,\)"):
        ls.weighted_loss(losses[:2], all_present(2))
    with pytest.raises(ValueError, match="present must have dtype torch.bool"):
        ls.weighted_loss(losses, torch.ones(3))
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        pcgrad.combine(grads, losses, all_present(3), -1)
    nan_grads = grads.clone()
    nan_grads[1, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite values in the rows of present clusters"):
        pcgrad.combine(nan_grads, losses, all_present(3), 0)
    with pytest.raises(TypeError, match="call combine"):
        pcgrad.weighted_loss(losses, all_present(3))
    with pytest.raises(TypeError, match="call weighted_loss"):
        ls.combine(grads, losses, all_present(3), 0)


# ---------------------------------------------------------------- PCGrad


def test_pcgrad_matches_hand_computed_projection_in_2d():
    # g1 = (1, 0), g2 = (-1, 1) conflict (g1.g2 = -1):
    #   g1_pc = g1 - (-1 / ||g2||^2) g2 = (1, 0) + 0.5 (-1, 1) = (0.5, 0.5)
    #   g2_pc = g2 - (-1 / ||g1||^2) g1 = (-1, 1) + (1, 0)    = (0, 1)
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    method = make("pcgrad", 2)
    direction = method.combine(grads, torch.ones(2), all_present(2), 0)
    torch.testing.assert_close(direction, torch.tensor([0.5, 1.5]))
    assert method.log_values() == {"pcgrad_conflict_rate": 1.0}

    mean = make("pcgrad", 2, reduction="mean").combine(grads, torch.ones(2), all_present(2), 0)
    torch.testing.assert_close(mean, torch.tensor([0.25, 0.75]))

    # no conflict: plain sum
    agreeing = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(method.combine(agreeing, torch.ones(2), None, 1), torch.tensor([2.0, 1.0]))
    assert method.log_values()["pcgrad_conflict_rate"] == 0.0


def test_pcgrad_conflict_rate_counts_ordered_pairs_with_negative_cosine():
    # pairs: (1,2) negative, (1,3) orthogonal (not a conflict), (2,3) positive -> 2 of 6 ordered pairs
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.0, 1.0]])
    method = make("pcgrad", 3)
    method.combine(grads, torch.ones(3), all_present(3), 0)
    assert method.log_values()["pcgrad_conflict_rate"] == pytest.approx(1 / 3)
    # an absent cluster is not counted: only (1,3) remains, no conflict
    method.combine(grads, torch.ones(3), torch.tensor([True, False, True]), 1)
    assert method.log_values()["pcgrad_conflict_rate"] == 0.0


def test_pcgrad_equals_vector_algorithm_with_the_seeded_orders():
    k, seed = 4, 7
    grads, losses = random_problem(k, 30, 1)
    grads[1] = -0.8 * grads[0] + 0.3 * grads[1]  # make sure there are conflicts
    method = make("pcgrad", k, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    for step in range(3):
        orders = [torch.randperm(k, generator=generator).tolist() for _ in range(k)]
        expected = pcgrad_reference(grads, orders)
        torch.testing.assert_close(method.combine(grads, losses, all_present(k), step), expected)


def test_pcgrad_seeded_order_is_reproducible_and_seed_dependent():
    k = 3
    grads = torch.tensor([[1.0, 0.0, 0.2], [-0.6, 1.0, 0.0], [-0.5, -0.9, 0.4]], dtype=torch.float64)
    # this problem is order sensitive: not all orders give the same result
    outcomes = {
        tuple(pcgrad_reference(grads, [list(order)] * k).round(decimals=9).tolist())
        for order in itertools.permutations(range(k))
    }
    assert len(outcomes) > 1

    def run(seed: int) -> list[torch.Tensor]:
        method = make("pcgrad", k, seed=seed)
        return [method.combine(grads, torch.ones(k), all_present(k), s) for s in range(8)]

    first, second = run(3), run(3)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(run(3), run(4)))


# ---------------------------------------------------------------- IMTL-G


def test_imtl_g_gives_equal_projections_onto_every_unit_gradient():
    grads, losses = random_problem(4, 25, 2)
    grads[2] *= 10.0  # very different norms
    direction = make("imtl_g", 4).combine(grads, losses, all_present(4), 0)
    units = grads / grads.norm(dim=1, keepdim=True)
    projections = units @ direction
    torch.testing.assert_close(projections, projections[0].expand(4), rtol=1e-9, atol=1e-9)
    assert projections[0] > 0
    weights = imtl_g_weights((grads @ grads.T).numpy())
    assert weights.sum() == pytest.approx(1.0)
    torch.testing.assert_close(torch.as_tensor(weights) @ grads, direction)


def test_imtl_g_with_duplicate_gradients_stays_finite():
    grads, losses = random_problem(3, 10, 3)
    grads[2] = grads[1]  # singular D U^T
    direction = make("imtl_g", 3).combine(grads, losses, all_present(3), 0)
    assert torch.isfinite(direction).all()
    units = grads / grads.norm(dim=1, keepdim=True)
    projections = units @ direction
    torch.testing.assert_close(projections, projections[0].expand(3), rtol=1e-8, atol=1e-8)


# ---------------------------------------------------------------- Nash-MTL


@pytest.mark.parametrize("seed", range(4))
def test_nash_weights_satisfy_the_bargaining_condition(seed):
    rng = np.random.default_rng(seed)
    k = 2 + seed
    grads = rng.normal(size=(k, 40)) * rng.choice([1e-3, 1.0, 1e3], size=(k, 1))  # mixed scales
    grads[0] += -0.7 * grads[1] * np.linalg.norm(grads[0]) / np.linalg.norm(grads[1])  # a conflict
    gram = grads @ grads.T
    alpha = solve_nash_weights(gram)
    assert np.all(alpha > 0)
    np.testing.assert_allclose((gram @ alpha) * alpha, np.ones(k), rtol=0, atol=1e-6)


def test_nash_direction_has_utilities_one_over_alpha_and_is_clipped():
    grads, losses = random_problem(3, 20, 4)
    unclipped = make("nash_mtl", 3, max_norm=0.0)
    direction = unclipped.combine(grads, losses, all_present(3), 0)
    alpha = torch.tensor([unclipped.log_values()[f"nash_alpha_{i}"] for i in range(3)], dtype=torch.float64)
    torch.testing.assert_close(grads @ direction, 1.0 / alpha, rtol=1e-6, atol=0)
    assert direction.norm().item() == pytest.approx(np.sqrt(3.0), rel=1e-6)  # ||d||^2 = n
    clipped = make("nash_mtl", 3, max_norm=0.5).combine(grads, losses, all_present(3), 0)
    torch.testing.assert_close(clipped.norm(), torch.tensor(0.5, dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(clipped / clipped.norm(), direction / direction.norm())


def test_nash_exactly_cancelling_gradients_give_a_finite_near_zero_direction():
    g = torch.randn(16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    grads = torch.stack([g, -2.0 * g])
    direction = make("nash_mtl", 2, max_norm=0.0).combine(grads, torch.ones(2, dtype=torch.float64), None, 0)
    assert torch.isfinite(direction).all()
    assert direction.norm() < 1e-3 * g.norm()


def test_nash_refreshes_every_n_steps_and_reuses_weights_between():
    k = 3
    method = make("nash_mtl", k, update_every=3, max_norm=0.0)
    refreshed, alphas = [], []
    for step in range(7):
        grads, losses = random_problem(k, 12, 10 + step)
        direction = method.combine(grads, losses, all_present(k), step)
        logs = method.log_values()
        refreshed.append(logs["nash_refreshed"])
        alpha = torch.tensor([logs[f"nash_alpha_{i}"] for i in range(k)], dtype=torch.float64)
        alphas.append(alpha)
        torch.testing.assert_close(direction, alpha @ grads)  # direction = sum_i alpha_i g_i
    assert refreshed == [1, 0, 0, 1, 0, 0, 1]
    assert torch.equal(alphas[0], alphas[2]) and not torch.equal(alphas[2], alphas[3])

    # a cluster that was absent at the last refresh forces a refresh when it shows up
    method = make("nash_mtl", k, update_every=10)
    grads, losses = random_problem(k, 12, 20)
    method.combine(grads, losses, torch.tensor([True, True, False]), 0)
    assert "nash_alpha_2" not in method.log_values()
    method.combine(grads, losses, torch.tensor([True, True, False]), 1)
    assert method.log_values()["nash_refreshed"] == 0
    method.combine(grads, losses, all_present(k), 2)
    assert method.log_values()["nash_refreshed"] == 1 and "nash_alpha_2" in method.log_values()


def test_nash_fixed_weights_fast_path_equals_combine():
    k = 3
    method = make("nash_mtl", k, update_every=4, max_norm=1.0)
    grads, losses = random_problem(k, 12, 30)
    assert method.fixed_weights(0, all_present(k)) is None  # nothing cached yet
    method.combine(grads, losses, all_present(k), 0)
    new_grads, new_losses = random_problem(k, 12, 31)
    weights = method.fixed_weights(1, all_present(k))
    assert weights is not None
    fast = method.finish_direction(weights @ new_grads)
    torch.testing.assert_close(fast, method.combine(new_grads, new_losses, all_present(k), 1))
    assert method.fixed_weights(4, all_present(k)) is None  # refresh due


# ---------------------------------------------------------------- CAGrad


def test_cagrad_with_c_zero_is_the_mean_gradient():
    grads, losses = random_problem(4, 15, 6)
    for rescale in (0, 1, 2):
        direction = make("cagrad", 4, c=0.0, rescale=rescale).combine(grads, losses, all_present(4), 0)
        torch.testing.assert_close(direction, grads.mean(0))


def test_cagrad_direction_solves_the_primal_problem():
    c = 0.5
    grads, losses = random_problem(3, 6, 7)
    grads[0] = -0.9 * grads[1] + 0.2 * grads[0]  # conflicting
    direction = make("cagrad", 3, c=c, rescale=0).combine(grads, losses, all_present(3), 0)
    g0 = grads.mean(0)
    radius = c * g0.norm()
    assert (direction - g0).norm() <= radius * (1 + 1e-6)
    best = (grads @ direction).min()
    # no feasible d in the ball around g0 does better on the worst cluster
    generator = torch.Generator().manual_seed(0)
    for _ in range(2000):
        u = torch.randn(6, generator=generator, dtype=torch.float64)
        shrink = torch.rand(1, generator=generator, dtype=torch.float64) ** 0.2
        candidate = g0 + radius * shrink * u / u.norm()
        assert (grads @ candidate).min() <= best + 1e-6
    # rescale=1 divides by 1 + c^2 (the official default)
    default = make("cagrad", 3, c=c).combine(grads, losses, all_present(3), 0)
    torch.testing.assert_close(default, direction / (1 + c**2))


def test_cagrad_dual_weights_beat_a_simplex_grid():
    grads, _ = random_problem(3, 8, 8)
    grads[2] = -grads[0] + 0.5 * grads[2]
    gram = (grads @ grads.T).numpy()
    c = 0.4
    g0_norm = np.sqrt(gram.mean())

    def dual(w):
        return w @ gram @ np.full(3, 1 / 3) + c * g0_norm * np.sqrt(w @ gram @ w)

    w = cagrad_dual_weights(gram, c)
    assert w.min() >= 0 and w.sum() == pytest.approx(1.0)
    grid = [np.array([a, b, 1 - a - b]) for a in np.linspace(0, 1, 101) for b in np.linspace(0, 1 - a, 101)]
    assert dual(w) <= min(dual(x) for x in grid) + 1e-9


# ---------------------------------------------------------------- GradNorm


def gradnorm_autograd_reference(weights, grads, losses, initial, alpha):
    """dL_grad/dw by autograd, with L_grad written as in Chen et al. Eq. 2 (target detached)."""
    w = weights.clone().requires_grad_(True)
    norms = (w[:, None] * grads).norm(dim=1)
    ratios = losses / initial
    rates = ratios / ratios.mean()
    target = (norms.mean() * rates**alpha).detach()
    (norms - target).abs().sum().backward()
    return w.grad


def test_gradnorm_weight_gradient_matches_autograd_and_weights_stay_normalised():
    k = 3
    method = make("gradnorm", k, alpha=1.5)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.05)
    grads, first_losses = random_problem(k, 10, 9)
    direction = method.combine(grads, first_losses, all_present(k), 0)
    torch.testing.assert_close(direction, grads.sum(0))  # initial weights are all 1
    ones = torch.ones(k, dtype=torch.float64)
    expected = gradnorm_autograd_reference(ones, grads, first_losses, first_losses, 1.5)
    torch.testing.assert_close(method.weights.grad.double(), expected, rtol=1e-6, atol=1e-6)
    optimizer.step()

    later_losses = first_losses * torch.tensor([0.5, 0.9, 1.0], dtype=torch.float64)
    weights = method.weights.detach().double()
    weights = weights * k / weights.sum()  # what the next call uses
    direction = method.combine(grads, later_losses, all_present(k), 1)
    torch.testing.assert_close(direction, weights @ grads, rtol=1e-6, atol=1e-6)
    expected = gradnorm_autograd_reference(weights, grads, later_losses, first_losses, 1.5)
    torch.testing.assert_close(method.weights.grad.double(), expected, rtol=1e-5, atol=1e-5)
    assert method.weights.detach().sum().item() == pytest.approx(k)
    logs = method.log_values()
    assert set(logs) == {"gradnorm_weight_0", "gradnorm_weight_1", "gradnorm_weight_2", "gradnorm_loss"}


# ---------------------------------------------------------------- loss balancing: LS, RLW, UW


def test_ls_is_the_sum_or_mean_of_present_losses():
    losses = torch.tensor([1.0, 2.0, float("nan"), 4.0])
    present = torch.tensor([True, True, False, True])
    assert make("ls", 4).weighted_loss(losses, present).item() == pytest.approx(7.0)
    assert make("ls", 4, reduction="mean").weighted_loss(losses, present).item() == pytest.approx(7.0 / 3)


def test_rlw_weights_are_a_seeded_softmax_of_normal_draws():
    k, seed = 4, 11
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    present = torch.tensor([True, False, True, True])
    method = make("rlw", k, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(3):
        z = torch.randn(k, generator=generator, dtype=torch.float64)
        weights = torch.zeros(k, dtype=torch.float64)
        weights[present] = torch.softmax(z[present], dim=0)
        loss = method.weighted_loss(losses, present)
        torch.testing.assert_close(loss, (weights * losses).sum())
        logged = torch.tensor([method.log_values()[f"rlw_weight_{i}"] for i in range(k)], dtype=torch.float64)
        torch.testing.assert_close(logged, weights)


def test_uw_gradients_match_the_closed_form():
    log_vars = torch.tensor([0.3, -0.5, 1.2])
    method = make("uw", 3)
    with torch.no_grad():
        method.log_vars.copy_(log_vars)
    losses = torch.tensor([0.8, 2.5, float("nan")], requires_grad=True)
    present = torch.tensor([True, True, False])
    loss = method.weighted_loss(losses, present)
    expected = (torch.exp(-log_vars[:2]) * losses.detach()[:2] + log_vars[:2]).sum()
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    expected_s = torch.zeros(3)
    expected_s[:2] = 1 - torch.exp(-log_vars[:2]) * losses.detach()[:2]
    torch.testing.assert_close(method.log_vars.grad, expected_s)
    expected_l = torch.tensor([np.exp(-0.3), np.exp(0.5), 0.0], dtype=torch.float32)
    torch.testing.assert_close(losses.grad, expected_l)
    assert method.log_values()["uw_logvar_1"] == pytest.approx(-0.5)


# ---------------------------------------------------------------- UW + PCGrad


def test_uw_pcgrad_is_pcgrad_on_scaled_gradients_and_matches_uw_for_s():
    k, seed = 3, 2
    grads, losses = random_problem(k, 9, 12)
    grads[1] = -grads[0] + 0.4 * grads[1]
    log_vars = torch.tensor([0.2, -0.4, 0.7])
    method = make("uw_pcgrad", k, seed=seed)
    with torch.no_grad():
        method.log_vars.copy_(log_vars)
    direction = method.combine(grads, losses, all_present(k), 0)

    generator = torch.Generator().manual_seed(seed)
    orders = [torch.randperm(k, generator=generator).tolist() for _ in range(k)]
    scaled = torch.exp(-log_vars.double())[:, None] * grads
    torch.testing.assert_close(direction, pcgrad_reference(scaled, orders))

    uw = make("uw", k)
    with torch.no_grad():
        uw.log_vars.copy_(log_vars)
    uw.weighted_loss(losses.float(), all_present(k)).backward()
    torch.testing.assert_close(method.log_vars.grad, uw.log_vars.grad)


def test_uw_pcgrad_log_variances_converge_to_log_losses_through_the_optimizer():
    losses = torch.tensor([0.5, 2.0], dtype=torch.float64)
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    method = make("uw_pcgrad", 2)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.2)
    for step in range(300):
        optimizer.zero_grad()
        method.combine(grads, losses, all_present(2), step)
        optimizer.step()
    torch.testing.assert_close(method.log_vars.detach().double(), losses.log(), rtol=0, atol=1e-4)


# ---------------------------------------------------------------- absent clusters


DETERMINISTIC_ON_DROP = {
    "imtl_g": {},
    "nash_mtl": {},
    "cagrad": {},
    "gradnorm": {},
    "pcgrad": {},  # two present clusters: projection order cannot matter
    "uw_pcgrad": {},
}


@pytest.mark.parametrize("name", sorted(DETERMINISTIC_ON_DROP))
def test_gradient_methods_ignore_absent_rows(name):
    k = 4
    keep = [0, 2] if name in ("pcgrad", "uw_pcgrad") else [0, 2, 3]
    present = torch.zeros(k, dtype=torch.bool)
    present[keep] = True
    grads, losses = random_problem(k, 14, 13)
    grads[~present] = float("nan")
    losses = losses.clone()
    losses[~present] = float("nan")
    full = make(name, k)
    direction = full.combine(grads, losses, present, 0)
    assert torch.isfinite(direction).all()
    dropped = make(name, len(keep))
    expected = dropped.combine(grads[keep], losses[keep], None, 0)
    torch.testing.assert_close(direction, expected)
    if name == "uw_pcgrad":
        assert torch.equal(full.log_vars.grad[~present], torch.zeros(k - len(keep)))
        torch.testing.assert_close(full.log_vars.grad[keep], dropped.log_vars.grad)


@pytest.mark.parametrize("name", ["ls", "uw"])
def test_loss_methods_ignore_absent_clusters(name):
    losses = torch.tensor([1.5, float("nan"), 0.5, float("inf")], requires_grad=True)
    present = torch.tensor([True, False, True, False])
    full = make(name, 4)
    loss = full.weighted_loss(losses, present)
    loss.backward()
    assert torch.isfinite(losses.grad).all() and torch.equal(losses.grad[~present], torch.zeros(2))
    for p in full.parameters():
        assert torch.isfinite(p.grad).all()
    expected = make(name, 2).weighted_loss(losses.detach()[present], None)
    torch.testing.assert_close(loss.detach(), expected)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_no_cluster_present_gives_zero_and_no_nan(name):
    k = 3
    method = make(name, k)
    none = torch.zeros(k, dtype=torch.bool)
    losses = torch.full((k,), float("nan"))
    if method.needs_grads:
        result = method.combine(torch.full((k, 5), float("nan")), losses, none, 0)
        assert torch.equal(result, torch.zeros(5))
    else:
        assert method.weighted_loss(losses, none).item() == 0.0


# ---------------------------------------------------------------- state dict round trip


def run_step(method, step: int, generator: torch.Generator):
    k = method.num_tasks
    grads = torch.randn(k, 10, generator=generator, dtype=torch.float64)
    losses = torch.rand(k, generator=generator, dtype=torch.float64) + 0.5
    if method.needs_grads:
        out = method.combine(grads, losses, all_present(k), step)
    else:
        for p in method.parameters():
            p.grad = None
        out = method.weighted_loss(losses, all_present(k))
        if out.requires_grad:
            out.backward()
    with torch.no_grad():  # a plain SGD step on the method's own parameters
        for p in method.parameters():
            p -= 0.1 * p.grad
    return out.detach()


@pytest.mark.parametrize("name", ALL_NAMES)
def test_state_dict_round_trip_gives_identical_next_outputs(name):
    options = {"update_every": 5} if name == "nash_mtl" else {}
    original = make(name, 3, **options)
    data = torch.Generator().manual_seed(0)
    for step in range(3):
        run_step(original, step, data)
    state = original.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    # a safetensors file round trip (plain tensors only)
    blob = safetensors.torch.save({key: value.contiguous() for key, value in state.items()})
    restored_state = safetensors.torch.load(blob)
    restored = make(name, 3, **options)
    restored.load_state_dict(restored_state)
    # torch.save works too
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    also_restored = make(name, 3, **options)
    also_restored.load_state_dict(torch.load(buffer))

    data_state = data.get_state()
    outputs = []
    for method in (original, restored, also_restored):
        data.set_state(data_state)
        outputs.append([run_step(method, step, data) for step in range(3, 6)])
    for a, b, c in zip(*outputs):
        assert torch.equal(a, b) and torch.equal(a, c)


# ---------------------------------------------------------------- dtype / device


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", GRADIENT_NAMES)
def test_low_precision_and_device_inputs(name, device):
    grads, losses = random_problem(3, 64, 14)
    reference = make(name, 3).combine(grads, losses, all_present(3), 0)
    method = make(name, 3).to(device)
    direction = method.combine(
        grads.to(device, torch.bfloat16), losses.to(device, torch.float32), all_present(3).to(device), 0
    )
    assert direction.dtype == torch.bfloat16 and direction.device.type == device
    tolerance = 0.05 * reference.abs().max().item()
    torch.testing.assert_close(direction.double().cpu(), reference, rtol=0.05, atol=tolerance)


# ---------------------------------------------------------------- flat gradient helpers


def test_flat_gradient_helpers_round_trip():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    unused = nn.Parameter(torch.ones(5))
    params = [*model.parameters(), unused]
    x = torch.randn(6, 3)
    loss = model(x).square().mean()
    flat = flat_grad(loss, params)
    assert flat.shape == (sum(p.numel() for p in params),)
    assert all(p.grad is None for p in params)
    loss.backward()
    torch.testing.assert_close(flat, flatten_grads(params))  # unused param -> zeros in both
    assert torch.equal(flat[-5:], torch.zeros(5))
    new = torch.arange(flat.numel(), dtype=torch.float32)
    write_flat_grad(params, new)
    torch.testing.assert_close(flatten_grads(params), new)
    assert torch.equal(unused.grad, new[-5:])
    with pytest.raises(ValueError, match="flat must be a 1-D tensor with"):
        write_flat_grad(params, new[:-1])
    with pytest.raises(ValueError, match="params is empty"):
        flatten_grads([])
