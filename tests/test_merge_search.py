"""The merge stage under Ray Tune, on task vector files: DeMe's grid baseline (coarse then fine) at one fidelity,
and successive halving over two fidelities with Optuna, TIES and layer groups (anchors first, streams continued)."""

import pytest

from conftest import shared_ray
import torch

from ant_ray.config import ConfigError, SearcherConfig, load_config
from ant_ray.diffusion import build_model, save_model
from ant_ray.merge import save_task_vector, state_dict_fingerprint
from ant_ray.search.merge_stage import MergePlan, grid_axis, run_merge_stage
from ant_ray.search.tune_runs import StageSetup
from ant_ray.tracking import TrackedRun, setup_experiment

SMALL = ["diffusion.T=100", "sampler.steps=2", "fid.batch_size=20"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    out = tmp_path_factory.mktemp("merge")
    base = build_model("tiny", resolution=8, channels=1, seed=0)
    base_dir = save_model(base, out / "base")
    state = base.state_dict()
    gen = torch.Generator().manual_seed(0)
    paths = []
    for i in range(2):
        tuned = {k: v + 0.02 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                 for k, v in state.items()}
        path = out / f"tv{i}.safetensors"
        save_task_vector(path, state, tuned, {"range": (50 * i, 50 * i + 50),
                                              "base_fingerprint": state_dict_fingerprint(state)})
        paths.append(path)
    uri = f"sqlite:///{out / 'mlflow.db'}"
    exp = setup_experiment(uri, "merge-test", out / "artifacts")
    shared_ray()
    yield out, base_dir, paths, uri, exp


def _stage(out, uri, exp, name, overrides):
    cfg = load_config(None, SMALL + [f"output_dir={out}"] + overrides)
    run = TrackedRun.start(uri, exp, name)
    return cfg, StageSetup(cfg=cfg, search_dir=out / name, tracking_uri=uri, experiment_id=exp, stage_run=run,
                           study_name=name, resume=False)


def test_grid_axis():
    assert grid_axis(0.0, 1.5, 0.25) == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]


def test_the_merge_benchmark_plans_what_the_search_would_accept(tmp_path):
    """Issue 19: `bench_merge_search --top 500` built its plan without the load-time check and crashed in rung 1
    (a stream of 125 images cannot continue in batches of 250). Its arms are now validated search.merge sections."""
    from benchmarks.bench_merge_search import GRID, HALVING, bench_configs

    configs = bench_configs(str(tmp_path), 500, [])
    halving, grid = (MergePlan.from_settings(configs[name].search.merge) for name in (HALVING, GRID))
    batch = configs[HALVING].fid.batch_size
    assert halving.fidelities == [125, 250, 500] and all(n % batch == 0 for n in halving.fidelities[:-1])
    assert (grid.searcher.name, grid.fidelities, grid.num_candidates) == ("grid", [500], 4 + 7 ** 2 + 9 ** 2)
    with pytest.raises(ConfigError, match=r"search.merge.fidelities: \[125\] must be multiples of fid.batch_size "
                                          r"\(250\)"):
        bench_configs(str(tmp_path), 500, ["fid.batch_size=250"])  # the plan that crashed, now refused on load


@pytest.mark.slow
def test_grid_coarse_then_fine(setup):
    out, base_dir, paths, uri, exp = setup
    cfg, stage = _stage(out, uri, exp, "grid", ["merge_search.weight_low=0", "merge_search.weight_high=1",
                                                "merge_search.grid_step=1.0", "merge_search.grid_fine_step=0.5"])
    plan = MergePlan(fidelities=[20], num_candidates=1, reduction_factor=3, searcher=SearcherConfig(name="grid"),
                     max_concurrent=2, cpu=1, gpu=0)
    outcome = run_merge_stage(stage, base_model=base_dir, task_vectors=paths[:1], plan=plan, merge=cfg.merge_search)
    trials = outcome.trials()
    # coarse {0, 1}, then the fine points within one coarse step of the best that were not scored yet: {0.5}
    assert sorted(trials["w0"]) == [0.0, 0.5, 1.0]
    assert outcome.images_generated == 3 * 20
    assert outcome.best_score == pytest.approx(trials["fid"].min())


@pytest.mark.slow
def test_successive_halving_with_ties_and_layer_groups(setup):
    out, base_dir, paths, uri, exp = setup
    cfg, stage = _stage(out, uri, exp, "halving", ["merge_search.method=ties",
                                                   "merge_search.layer_groups={down: 'down_blocks.', other: ''}"])
    plan = MergePlan(fidelities=[20, 40], num_candidates=5, reduction_factor=2,
                     searcher=SearcherConfig(name="tpe", seed=0), max_concurrent=2, cpu=1, gpu=0)
    outcome = run_merge_stage(stage, base_model=base_dir, task_vectors=paths, plan=plan, merge=cfg.merge_search)
    trials = outcome.trials()
    assert list(trials.groupby("rung").size()) == [5, 3]
    first = trials[trials["rung"] == 0].iloc[0]
    assert [first[c] for c in ("down.w0", "down.w1", "other.w0", "other.w1")] == [1.0, 1.0, 1.0, 1.0]
    # rung 1 continued each promoted candidate's stream: 20 new samples each, not 40
    assert outcome.images_generated == 5 * 20 + 3 * 20
    assert outcome.metric == "fid40_domain" and set(outcome.winner["weights"]) == {"down", "other"}
    assert outcome.best_score == pytest.approx(trials[trials["rung"] == 1]["fid"].min())
