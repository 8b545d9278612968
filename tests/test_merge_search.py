"""Merge-weight search under Ray Tune: the grid baseline (coarse then fine) and Optuna with TIES + layer groups."""

import pytest
import ray
import torch

from ant_ray.config import load_config
from ant_ray.diffusion import build_model, save_model
from ant_ray.search.merge_search import _grid_axis, grid_size, parameter_names, search_merge_weights
from ant_ray.stages.ray_runtime import start_ray
from ant_ray.tracking import TrackedRun, setup_experiment

SMALL = ["diffusion.T=100", "sampler.steps=2", "fid.num_samples=20", "fid.batch_size=20", "merge_search.max_concurrent=2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    out = tmp_path_factory.mktemp("merge")
    base = build_model("tiny", resolution=8, channels=1, seed=0)
    base_dir = save_model(base, out / "base")
    gen = torch.Generator().manual_seed(0)
    taus = [{k: 0.02 * torch.randn(v.shape, generator=gen) for k, v in base.state_dict().items()
             if v.is_floating_point()}]
    uri = f"sqlite:///{out / 'mlflow.db'}"
    exp = setup_experiment(uri, "merge-test", out / "artifacts")
    start_ray(None, num_cpus=4)
    yield out, base_dir, taus, uri, exp
    ray.shutdown()


def test_grid_axis_and_size():
    assert _grid_axis(0.0, 1.5, 0.25) == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
    cfg = load_config(None, ["merge_search.layer_groups={down: 'down_blocks.', other: ''}"])
    assert parameter_names(2, ["down", "other"]) == ["down.w0", "down.w1", "other.w0", "other.w1"]
    assert grid_size(cfg, 2) == 7 ** 4


def test_grid_search_coarse_then_fine(setup):
    out, base_dir, taus, uri, exp = setup
    cfg = load_config(None, SMALL + [f"output_dir={out}", "merge_search.searcher=grid", "merge_search.weight_low=0",
                                     "merge_search.weight_high=1", "merge_search.grid_step=1.0",
                                     "merge_search.grid_fine_step=0.5"])
    parent = TrackedRun.start(uri, exp, "grid")
    outcome = search_merge_weights(cfg, base_model=base_dir, task_vectors=taus, cache_dir=out / "fid",
                                   experiment_id=exp, parent=parent.handle(), name="grid")
    # coarse {0, 1} (2 trials) then fine within one coarse step of the best: {0, .5, 1} clipped to [0, 1]
    assert outcome.trials == 2 + 3
    assert outcome.images_generated == 5 * 20 and outcome.images_to_best % 20 == 0
    assert outcome.weights[0] in (0.0, 0.5, 1.0)
    from mlflow.tracking import MlflowClient

    trials = MlflowClient(uri).search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.run_id}'")
    assert len(trials) == 5
    assert outcome.fid == pytest.approx(min(t.data.metrics["fid20_domain"] for t in trials))


def test_optuna_with_ties_and_layer_groups(setup):
    out, base_dir, taus, uri, exp = setup
    cfg = load_config(None, SMALL + [f"output_dir={out}", "merge_search.num_trials=3", "merge_search.method=ties",
                                     "merge_search.layer_groups={down: 'down_blocks.', other: ''}"])
    parent = TrackedRun.start(uri, exp, "optuna")
    outcome = search_merge_weights(cfg, base_model=base_dir, task_vectors=taus, cache_dir=out / "fid",
                                   experiment_id=exp, parent=parent.handle(), name="optuna-ties")
    assert set(outcome.weights) == {"down", "other"} and all(len(w) == 1 for w in outcome.weights.values())
    assert outcome.trials == 3
