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
