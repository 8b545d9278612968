"""Task vectors and merge methods checked against closed forms, hand-computed TIES examples and a brute-force TIES."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from ant_ray.merge import (
    MERGE_METHODS,
    TaskVectorMerger,
    compute_task_vector,
    load_task_vector,
    merge_from_task_vectors,
    merge_task_vectors,
    save_task_vector,
    state_dict_fingerprint,
    task_vector_range,
)

GROUPS = {"down": "down_blocks.", "mid": "mid_block.", "up": "up_blocks.", "other": ""}


def make_state_dict(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = {"conv_in.weight": (4, 1, 3, 3), "down_blocks.0.weight": (4, 4), "down_blocks.0.bias": (4,),
              "mid_block.weight": (3, 4), "up_blocks.0.weight": (2, 3), "conv_out.bias": ()}
    state = {key: torch.randn(shape, generator=generator).to(dtype) for key, shape in shapes.items()}
    state["down_blocks.0.num_batches_tracked"] = torch.tensor(seed, dtype=torch.long)  # an int buffer
    return state


@pytest.fixture
def models():
    return make_state_dict(0), [make_state_dict(seed) for seed in (1, 2, 3)]


def closed_form(base, finetuned, weights_for_key):
    """base + sum_i w_i (finetuned_i - base) in float64, key by key."""
    out = {}
    for key, tensor in base.items():
        if not tensor.is_floating_point():
            out[key] = tensor
            continue
        total = tensor.double().clone()
        for weight, model in zip(weights_for_key(key), finetuned):
            total += weight * (model[key].double() - tensor.double())
        out[key] = total
    return out


def assert_state_dicts_close(actual, expected, atol=1e-6):
    assert list(actual) == list(expected)
    for key in expected:
        assert actual[key].shape == expected[key].shape, key
        torch.testing.assert_close(actual[key].double(), expected[key].double(), atol=atol, rtol=0, msg=key)


# ------------------------------------------------------------------------------------------------------ linear
def test_registry_lists_both_methods():
    assert MERGE_METHODS.names() == ["linear", "ties"]
    with pytest.raises(ValueError, match="linear"):
        MERGE_METHODS.get("slerp")


def test_linear_merge_equals_closed_form(models):
    base, finetuned = models
    weights = [0.7, -0.2, 1.3]
    merged = merge_task_vectors(base, finetuned, weights)
    assert_state_dicts_close(merged, closed_form(base, finetuned, lambda key: weights))
    assert all(merged[key].dtype == base[key].dtype for key in base)


def test_zero_weights_give_the_base_and_one_hot_gives_that_model(models):
    base, finetuned = models
    merger = TaskVectorMerger(base, finetuned)
    zero = merger.merge([0.0, 0.0, 0.0], copy=True)
    for key in base:
        assert torch.equal(zero[key], base[key]), key
    for index in range(3):
        one_hot = merger.merge([1.0 if i == index else 0.0 for i in range(3)])
        for key in base:
            expected = base[key] if not base[key].is_floating_point() else finetuned[index][key]
            torch.testing.assert_close(one_hot[key], expected, atol=1e-6, rtol=0)


def test_integer_buffers_come_from_the_base(models):
    base, finetuned = models
    merged = merge_task_vectors(base, finetuned, [1.0, 1.0, 1.0])
    assert merged["down_blocks.0.num_batches_tracked"].item() == 0
    assert merged["down_blocks.0.num_batches_tracked"].dtype == torch.long


def test_half_precision_base_keeps_its_dtype():
    base = make_state_dict(0, torch.float16)
    finetuned = [make_state_dict(1, torch.float16)]
    merged = merge_task_vectors(base, finetuned, [0.5])
    assert merged["mid_block.weight"].dtype == torch.float16
    expected = closed_form(base, finetuned, lambda key: [0.5])
    assert_state_dicts_close(merged, expected, atol=2e-3)


def test_merger_reuses_its_output_buffer(models):
    base, finetuned = models
    merger = TaskVectorMerger(base, finetuned)
    first = merger.merge([0.1, 0.2, 0.3])
    kept = merger.merge([0.1, 0.2, 0.3], copy=True)
    second = merger.merge([1.0, 0.0, -1.0])
    assert first["mid_block.weight"].data_ptr() == second["mid_block.weight"].data_ptr()
    assert torch.equal(first["mid_block.weight"], second["mid_block.weight"])  # overwritten in place
    assert_state_dicts_close(kept, closed_form(base, finetuned, lambda key: [0.1, 0.2, 0.3]))
    assert_state_dicts_close(second, closed_form(base, finetuned, lambda key: [1.0, 0.0, -1.0]))


def test_per_layer_group_weights_apply_per_prefix(models):
    base, finetuned = models
    weights = {"down": [1.0, 0.0, 0.0], "mid": [0.0, 0.5, 0.0], "up": [0.0, 0.0, 2.0], "other": [0.1, 0.1, 0.1]}
    expected_group = {"conv_in.weight": "other", "down_blocks.0.weight": "down", "down_blocks.0.bias": "down",
                      "mid_block.weight": "mid", "up_blocks.0.weight": "up", "conv_out.bias": "other"}
    merged = merge_task_vectors(base, finetuned, weights, layer_groups=GROUPS)
    assert_state_dicts_close(merged, closed_form(base, finetuned, lambda key: weights[expected_group[key]]))


def test_first_matching_prefix_wins(models):
    base, finetuned = models
    groups = {"down0_weight": "down_blocks.0.w", "down": "down_blocks.", "rest": ""}
    weights = {"down0_weight": [1.0, 0.0, 0.0], "down": [0.0, 1.0, 0.0], "rest": [0.0, 0.0, 0.0]}
    merged = merge_task_vectors(base, finetuned, weights, layer_groups=groups)
    torch.testing.assert_close(merged["down_blocks.0.weight"], finetuned[0]["down_blocks.0.weight"])
    torch.testing.assert_close(merged["down_blocks.0.bias"], finetuned[1]["down_blocks.0.bias"])
    assert torch.equal(merged["mid_block.weight"], base["mid_block.weight"])


def test_flat_weights_with_layer_groups_apply_everywhere(models):
    base, finetuned = models
    merged = merge_task_vectors(base, finetuned, [0.3, 0.3, 0.3], layer_groups=GROUPS)
    assert_state_dicts_close(merged, closed_form(base, finetuned, lambda key: [0.3, 0.3, 0.3]))


def test_bad_weights_and_groups_are_refused(models):
    base, finetuned = models
    merger = TaskVectorMerger(base, finetuned, layer_groups=GROUPS)
    with pytest.raises(ValueError, match="missing \\['other'\\]"):
        merger.merge({"down": [1, 1, 1], "mid": [1, 1, 1], "up": [1, 1, 1]})
    with pytest.raises(ValueError, match="has 2 entries but there are 3"):
        merger.merge([1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        merger.merge([1.0, math.nan, 0.0])
    with pytest.raises(ValueError, match="no layer_groups"):
        TaskVectorMerger(base, finetuned).merge({"down": [1, 1, 1]})
    with pytest.raises(ValueError, match="'conv_in.weight' matches no prefix"):
        TaskVectorMerger(base, finetuned, layer_groups={"down": "down_blocks."})
    with pytest.raises(ValueError, match="bad options"):
        TaskVectorMerger(base, finetuned, method="linear", density=0.5)


def test_key_and_shape_mismatches_name_the_key(models):
    base, finetuned = models
    missing = dict(finetuned[1])
    del missing["mid_block.weight"]
    with pytest.raises(ValueError, match=r"finetuned_state_dicts\[1\] lacks key 'mid_block.weight'"):
        merge_task_vectors(base, [finetuned[0], missing], [1.0, 1.0])
    extra = dict(finetuned[0], **{"channel_projections.mid_block.weight": torch.eye(3)})
    with pytest.raises(ValueError, match="'channel_projections.mid_block.weight'"):
        merge_task_vectors(base, [extra], [1.0])
    reshaped = dict(finetuned[0], **{"up_blocks.0.weight": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match=r"\['up_blocks.0.weight'\] has shape \(3, 2\)"):
        merge_task_vectors(base, [reshaped], [1.0])


# -------------------------------------------------------------------------------------------------------- TIES
def test_ties_hand_computed_example():
    # one tensor of 5 entries, 3 task vectors, density 0.6 -> keep the ceil(3) = 3 largest magnitudes per task
    base = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])}
    taus = [torch.tensor([0.5, -0.2, 0.1, 0.9, -0.7]),
            torch.tensor([-0.8, 0.3, 0.05, 0.4, 0.6]),
            torch.tensor([0.2, -0.5, -0.3, -0.1, 0.05])]
    # trimmed:   t1 = [0.5, 0, 0, 0.9, -0.7]; t2 = [-0.8, 0, 0, 0.4, 0.6]; t3 = [0.2, -0.5, -0.3, 0, 0]
    # sums:      [-0.1, -0.5, -0.3, 1.3, -0.1]  -> elected signs [-, -, -, +, -]
    # agreeing:  e0 {t2} -> -0.8; e1 {t3} -> -0.5; e2 {t3} -> -0.3; e3 {t1, t2} -> 0.65; e4 {t1} -> -0.7
    finetuned = [{"w": base["w"] + tau} for tau in taus]
    merged = merge_task_vectors(base, finetuned, [1.0, 1.0, 1.0], method="ties", density=0.6)
    torch.testing.assert_close(merged["w"], base["w"] + torch.tensor([-0.8, -0.5, -0.3, 0.65, -0.7]))

    # lambda = 0.5 on every task scales the merged task vector; weights (2, 1, 0) change the election:
    # v1 = 2 t1 = [1, 0, 0, 1.8, -1.4], v2 = t2, v3 = 0 -> sums [0.2, 0, 0, 2.2, -0.8] -> signs [+, 0, 0, +, -]
    # agreeing: e0 {v1} -> 1; e1, e2 none -> 0; e3 {v1, v2} -> 1.1; e4 {v1} -> -1.4
    merged = merge_task_vectors(base, finetuned, [0.5, 0.5, 0.5], method="ties", density=0.6)
    torch.testing.assert_close(merged["w"], base["w"] + 0.5 * torch.tensor([-0.8, -0.5, -0.3, 0.65, -0.7]))
    merged = merge_task_vectors(base, finetuned, [2.0, 1.0, 0.0], method="ties", density=0.6)
    torch.testing.assert_close(merged["w"], base["w"] + torch.tensor([1.0, 0.0, 0.0, 1.1, -1.4]))


def test_ties_trim_scope_global_versus_per_tensor():
    # task 1 has a big tensor "a" and a small tensor "b"; density 0.5 over 4 entries keeps 2
    base = {"a": torch.zeros(2), "b": torch.zeros(2)}
    finetuned = [{"a": torch.tensor([4.0, 3.0]), "b": torch.tensor([2.0, 1.0])}]
    global_trim = merge_task_vectors(base, finetuned, [1.0], method="ties", density=0.5)
    assert global_trim["a"].tolist() == [4.0, 3.0] and global_trim["b"].tolist() == [0.0, 0.0]
    per_tensor = merge_task_vectors(base, finetuned, [1.0], method="ties", density=0.5, trim_scope="tensor")
    assert per_tensor["a"].tolist() == [4.0, 0.0] and per_tensor["b"].tolist() == [2.0, 0.0]


def brute_force_ties(base, taus, weights, density):
    """Entry-by-entry TIES with numpy and Python loops (global trim), independent of the vectorised code."""
    keys = list(base)
    flat_taus = [np.concatenate([tau[key].numpy().ravel() for key in keys]).astype(np.float64) for tau in taus]
    trimmed = []
    for tau in flat_taus:
        keep = math.ceil(density * tau.size)
        threshold = sorted(np.abs(tau), reverse=True)[keep - 1]
        trimmed.append(np.where(np.abs(tau) >= threshold, tau, 0.0))
    merged = np.zeros_like(flat_taus[0])
    for entry in range(merged.size):
        values = [w * t[entry] for w, t in zip(weights, trimmed)]
        elected = np.sign(sum(values))
        agreeing = [value for value in values if np.sign(value) == elected and value != 0]
        merged[entry] = sum(agreeing) / len(agreeing) if agreeing else 0.0
    out, offset = {}, 0
    for key in keys:
        size = base[key].numel()
        out[key] = base[key].double() + torch.from_numpy(merged[offset:offset + size]).view(base[key].shape)
        offset += size
    return out


@pytest.mark.parametrize("weights,density", [([1.0, 1.0, 1.0], 0.2), ([0.4, -1.2, 0.9], 0.5), ([1.0, 0, 0], 1.0)])
def test_ties_matches_brute_force(models, weights, density):
    base, finetuned = models
    floating = {key: tensor for key, tensor in base.items() if tensor.is_floating_point()}
    taus = [compute_task_vector(base, model) for model in finetuned]
    merged = merge_task_vectors(base, finetuned, weights, method="ties", density=density)
    expected = brute_force_ties(floating, taus, weights, density)
    for key in floating:
        torch.testing.assert_close(merged[key].double(), expected[key], atol=1e-6, rtol=0)
    assert torch.equal(merged["down_blocks.0.num_batches_tracked"], base["down_blocks.0.num_batches_tracked"])


def test_ties_zero_and_one_hot_weights(models):
    base, finetuned = models
    merger = TaskVectorMerger(base, finetuned, method="ties", density=1.0)
    zero = merger.merge([0.0, 0.0, 0.0], copy=True)
    assert all(torch.equal(zero[key], base[key]) for key in base)
    one_hot = merger.merge([0.0, 1.0, 0.0])  # density 1: nothing trimmed, so exactly model 1
    for key in base:
        expected = finetuned[1][key] if base[key].is_floating_point() else base[key]
        torch.testing.assert_close(one_hot[key], expected, atol=1e-6, rtol=0)


def test_ties_options_are_checked(models):
    base, finetuned = models
    with pytest.raises(ValueError, match="density"):
        TaskVectorMerger(base, finetuned, method="ties", density=0.0)
    with pytest.raises(ValueError, match="trim_scope"):
        TaskVectorMerger(base, finetuned, method="ties", trim_scope="row")


# --------------------------------------------------------------------------------- fingerprints and files
def test_fingerprint_is_order_independent_and_sensitive(models):
    base, _ = models
    fingerprint = state_dict_fingerprint(base)
    assert len(fingerprint) == 64
    assert state_dict_fingerprint(dict(reversed(list(base.items())))) == fingerprint
    changed = {key: tensor.clone() for key, tensor in base.items()}
    changed["mid_block.weight"][1, 2] += 1e-6
    assert state_dict_fingerprint(changed) != fingerprint
    assert state_dict_fingerprint(dict(base, **{"conv_out.bias": base["conv_out.bias"].double()})) != fingerprint
    renamed = {("x." + key if key == "conv_out.bias" else key): tensor for key, tensor in base.items()}
    assert state_dict_fingerprint(renamed) != fingerprint


def test_task_vector_file_round_trip(tmp_path, models):
    base, finetuned = models
    path = tmp_path / "tv" / "range_0.safetensors"
    written = save_task_vector(path, base, finetuned[0], {"range": (0, 250), "p": 0.4, "lambda": 1.0,
                                                          "run_id": "abc", "seed": 7})
    task_vector, metadata = load_task_vector(path)
    assert metadata == written
    assert metadata["range"] == "0,250" and task_vector_range(metadata) == (0, 250)
    assert metadata["p"] == "0.4" and metadata["lambda"] == "1.0" and metadata["run_id"] == "abc"
    assert metadata["seed"] == "7" and metadata["base_fingerprint"] == state_dict_fingerprint(base)
    assert sorted(task_vector) == sorted(key for key in base if base[key].is_floating_point())
    for key, tau in task_vector.items():
        torch.testing.assert_close(tau, finetuned[0][key] - base[key], atol=0, rtol=0)
    with pytest.raises(ValueError, match="range"):
        save_task_vector(path, base, finetuned[0], {"range": (250, 0)})
    with pytest.raises(ValueError, match="computed"):
        save_task_vector(path, base, finetuned[0], {"base_fingerprint": "0" * 64})


def test_merge_from_task_vector_files(tmp_path, models):
    base, finetuned = models
    loaded = []
    for index, model in enumerate(finetuned):
        path = tmp_path / f"tv{index}.safetensors"
        save_task_vector(path, base, model, {"range": (index * 250, index * 250 + 250)})
        loaded.append(load_task_vector(path))
    weights = {"down": [0.2, 0.3, 0.4], "mid": [1, 0, 0], "up": [0, 0, 1], "other": [0.5, 0.5, 0.5]}
    from_files = merge_from_task_vectors(base, loaded, weights, layer_groups=GROUPS)
    direct = merge_task_vectors(base, finetuned, weights, layer_groups=GROUPS)
    assert_state_dicts_close(from_files, direct)


def test_merge_from_task_vectors_refuses_another_base(tmp_path, models):
    base, finetuned = models
    path = tmp_path / "tv.safetensors"
    save_task_vector(path, base, finetuned[0], {"range": "0,500"})
    other_base = make_state_dict(9)
    with pytest.raises(ValueError) as error:
        merge_from_task_vectors(other_base, [load_task_vector(path)], [1.0])
    message = str(error.value)
    assert state_dict_fingerprint(base) in message and state_dict_fingerprint(other_base) in message
    tau, _ = load_task_vector(path)
    with pytest.raises(ValueError, match="fingerprint None"):
        merge_from_task_vectors(base, [(tau, {})], [1.0])


def test_task_vector_key_mismatch_is_refused(tmp_path, models):
    base, finetuned = models
    tau = compute_task_vector(base, finetuned[0])
    del tau["conv_in.weight"]
    metadata = {"base_fingerprint": state_dict_fingerprint(base)}
    with pytest.raises(ValueError, match=r"task_vectors\[0\] lacks key 'conv_in.weight'"):
        merge_from_task_vectors(base, [(tau, metadata)], [1.0])


# ------------------------------------------------------------------------------------------------------ timing
def test_merge_of_36m_parameters_with_four_models_is_fast():
    # values do not change the cost of the merge, so cheap constant fills keep the test's setup short
    shapes = [(1024, 1024)] * 34 + [(256, 256, 3, 3)] * 2 + [(256,)] * 40  # ~36.8M parameters
    base = {f"block.{index}.weight": torch.full(shape, 0.5) for index, shape in enumerate(shapes)}
    finetuned = {key: tensor + 0.01 for key, tensor in base.items()}
    merger = TaskVectorMerger(base, [finetuned] * 4)
    del finetuned
    merger.merge([0.25, 0.25, 0.25, 0.25])  # first call touches the fresh output pages
    start = time.perf_counter()
    merged = merger.merge([0.1, 0.2, 0.3, 0.4])
    elapsed = time.perf_counter() - start
    print(f"TaskVectorMerger.merge: {merger.num_parameters / 1e6:.1f}M parameters, N=4: {elapsed * 1000:.0f} ms")
    assert merger.num_parameters > 35_000_000
    assert elapsed < 2.0
    for key in ("block.0.weight", "block.75.weight"):
        torch.testing.assert_close(merged[key], base[key] + 0.01, atol=1e-6, rtol=0)
