"""Config loading: every shipped YAML validates; bad input names the field and the fix."""

from pathlib import Path

import pytest

from ant_ray.config import ConfigError, apply_overrides, load_config

SEARCH_SPACES = Path(__file__).resolve().parent.parent / "search_spaces"


@pytest.mark.parametrize("path", sorted(SEARCH_SPACES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.diffusion.T >= cfg.sampler.steps


def test_defaults_and_overrides():
    cfg = load_config(None, ["pretrain.steps=7", "finetune.ranges=[[0, 300], [300, 1000]]", "fid.extractor=domain"])
    assert cfg.pretrain.steps == 7
    assert cfg.finetune.ranges == [(0, 300), (300, 1000)]


def test_overrides_parse_yaml_values_and_create_sections():
    raw = apply_overrides({"a": {"b": 1}}, ["a.c=true", "d.e=[1, 2]", "a.b=0.5"])
    assert raw == {"a": {"b": 0.5, "c": True}, "d": {"e": [1, 2]}}


@pytest.mark.parametrize("override, field, hint", [
    ("pretrain.stepz=3", "pretrain.stepz", "unknown field"),
    ("finetune.p=1.5", "finetune.p", "less than or equal to 1"),
    ("data.dataset=cifar10", "data", "data.path is required"),
    ("sampler.steps=2000", "sampler.steps (2000)", "cannot exceed diffusion.T"),
    ("finetune.ranges=[[0, 10], [20, 1000]]", "finetune", "contiguous"),
    ("finetune.ranges=[[0, 500], [500, 900]]", "finetune.ranges must", "cover [0, 1000)"),
    ("pretrain.weighting.name=nope", "pretrain.weighting", "choose one of"),
    ("pretrain.weighting={name: min-snr, options: {gamma: -1}}", "pretrain.weighting", "gamma"),
    ("merge_search.resources.gpu=0.5", "merge_search.resources.gpu", "fractional GPUs"),
    ("ant.k=5000", "ant.k (5000)", "cannot exceed diffusion.T"),
    ("data.resolution=9", "data.resolution (9)", "multiple of 2"),  # before any model is built
])
def test_bad_input_names_the_field(override, field, hint):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert (f"  {field}:" in message or f"  {field} " in message) and hint in message


def test_missing_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["pretrain.steps"])
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_tracking_uri_default_and_env(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(None, [f"output_dir={tmp_path}"])
    assert cfg.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert cfg.tracking_uri() == "http://127.0.0.1:5000"


def test_validate_names_the_paths_this_machine_lacks(tmp_path, capsys):
    """A config for a cluster may name paths only its nodes have: validate warns, and still succeeds."""
    from ant_ray.cli import main

    a_file = tmp_path / "a_file"
    a_file.write_text("")
    code = main(["validate", "search_spaces/quickstart.yaml", "--set", "model.base=/nope/unet",
                 "--output-dir", str(a_file / "out")])
    err = capsys.readouterr().err
    assert code == 0
    assert "warning: model.base '/nope/unet' is neither a preset" in err
    assert f"warning: output_dir {a_file / 'out'} is not a folder ({a_file} is a file)" in err
    assert main(["validate", "search_spaces/quickstart.yaml"]) == 0
    assert "warning" not in capsys.readouterr().err


LR_STEP = "search.ant.space.ant.lr={type: float, low: 0.001, high: 0.003, step: 0.001}"


@pytest.mark.parametrize("overrides, hint", [
    ([LR_STEP, "ant.lr=0.0015"], "search.ant.space[ant.lr]: the config's ant.lr (0.0015) is tried first, but it is "
                                 "off the space's step (0.001 from 0.001): set ant.lr to 0.001 or 0.002"),
    (["search.ant.space.ant.k={type: int, low: 2, high: 8, step: 2}", "ant.k=5"],
     "search.ant.space[ant.k]: the config's ant.k (5) is tried first, but it is off the space's step (2 from 2): "
     "set ant.k to 4 or 6"),
    (["search.ant.space.ant.lr={type: float, low: 0.001, high: 0.0035, step: 0.001}"],
     "search.ant.space[ant.lr]: high - low (0.0025) must be a multiple of step (0.001): set high to 0.003 or 0.004"),
])
def test_a_config_value_off_the_step_fails_on_load(overrides, hint):
    """An Optuna searcher enqueues the config's own value first; off the step, Optuna would only warn."""
    with pytest.raises(ConfigError) as err:
        load_config(SEARCH_SPACES / "quickstart.yaml", ["search=null"] + overrides)
    assert hint in str(err.value)


def test_values_on_the_step_pass_within_optunas_tolerance():
    import optuna

    cfg = load_config(SEARCH_SPACES / "quickstart.yaml", ["search=null", LR_STEP, "ant.lr=0.002"])
    assert optuna.distributions.FloatDistribution(0.001, 0.003, step=0.001)._contains(cfg.ant.lr)
    load_config(SEARCH_SPACES / "quickstart.yaml", ["search=null", LR_STEP, "ant.lr=0.00200000000001"])
    load_config(SEARCH_SPACES / "quickstart.yaml", ["search=null", LR_STEP, "ant.lr=0.01"])  # outside: not enqueued
    load_config(SEARCH_SPACES / "quickstart.yaml",  # the grid searcher never enqueues the config's value
                ["search=null", LR_STEP, "ant.lr=0.0015", "search.ant.searcher.name=grid"])
    load_config(SEARCH_SPACES / "quickstart.yaml",
                ["search=null", "search.deme.space.finetune.p={type: float, low: 0.0, high: 0.8, step: 0.1}",
                 "finetune.p=0.3"])  # 0.3 is 3 steps of 0.1 up to rounding


MERGE_TVS = ["search=null", "search.merge.task_vectors=[a.safetensors, b.safetensors, c.safetensors]",
             "search.merge.base_model=b", "search.merge.fidelities=[250, 500]", "search.merge.searcher.name=grid",
             "merge_search.weight_high=1.5", "merge_search.grid_step=0.25", "merge_search.grid_fine_step=0.05"]


def test_a_merge_grid_bigger_than_its_budget_fails_on_load():
    with pytest.raises(ConfigError) as err:
        load_config(SEARCH_SPACES / "quickstart.yaml", MERGE_TVS)
    message = str(err.value)
    assert ("search.merge.num_candidates (16) is the first rung's budget, but searcher grid scores up to 1,679 "
            "candidates there for 3 task vectors: 5 anchors, 343 coarse points") in message
    assert "Set search.merge.num_candidates=1679 to score the whole grid" in message
    cfg = load_config(SEARCH_SPACES / "quickstart.yaml", MERGE_TVS + ["search.merge.num_candidates=1679"])
    assert cfg.search.merge.num_candidates == 1679


def test_the_merge_grid_budget_counts_the_most_task_vectors_a_chain_can_make():
    """With deme's ranges 'ant', N is the ant winner's k: the largest k the ant space allows."""
    chain = ["search.deme.ranges=ant", "search.merge.searcher.name=grid", "search.merge.fidelities=[250]",
             "merge_search.weight_high=1", "merge_search.grid_step=0.5", "merge_search.grid_fine_step=0.25",
             "search.ant.space.ant.k={type: int, low: 2, high: 4}"]
    with pytest.raises(ConfigError, match="for 4 task vectors: 6 anchors, 81 coarse points"):
        load_config(SEARCH_SPACES / "quickstart.yaml", chain)
    cfg = load_config(SEARCH_SPACES / "quickstart.yaml", chain + ["search.merge.num_candidates=712"])
    assert cfg.search.max_task_vectors(cfg.ant.k, cfg.finetune.num_specialists) == 4
