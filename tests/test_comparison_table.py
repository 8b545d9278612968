"""Comparison tables: mean/std per arm, published to MLflow and Markdown; the ANT comparison's arms."""

import pytest
from mlflow.tracking import MlflowClient

from ant_ray.config import load_config
from ant_ray.experiments import ant_comparison
from ant_ray.experiments.ant_comparison import comparison_arms, run_ant_comparison
from ant_ray.experiments.comparison_table import ComparisonResult, start_comparison_run
from ant_ray.tracking import TrackedRun, setup_experiment


def test_markdown_and_publish(tmp_path):
    result = ComparisonResult("fid1k_domain", [0, 1], {"pretrained": [10.0, 12.0], "DeMe merged": [9.0, 9.0]})
    table = result.markdown("t")
    assert "| pretrained | 11.00 | 1.41 | 10.00, 12.00 |" in table
    assert "| DeMe merged | 9.00 | 0.00 | 9.00, 9.00 |" in table
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = TrackedRun.start(uri, setup_experiment(uri, "c", tmp_path / "a"), "comparison")
    result.publish(run, "digits", tmp_path / "report.md")
    assert (tmp_path / "report.md").read_text().startswith("### digits, ")
    got = MlflowClient(uri).get_run(run.run_id)
    assert got.data.metrics == {"pretrained_mean": 11.0, "deme_merged_mean": 9.0}


def test_ant_comparison_arms():
    cfg = load_config("search_spaces/ant_compare_digits.yaml")
    arms = comparison_arms(cfg)
    assert len(arms) == 1 + 4 * 3
    assert arms["vanilla"]["k"] == 1 and arms["vanilla"]["method"] == "ls"
    assert arms["ANT-nash_mtl (gradient)"] == {"method": "nash_mtl", "clustering": "gradient"}


def test_start_comparison_run(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(None, [f"output_dir={tmp_path}"])
    parent, experiment_id = start_comparison_run(cfg, [0, 1], "deme_comparison")
    got = MlflowClient(cfg.tracking_uri()).get_run(parent.run_id)
    assert got.info.experiment_id == experiment_id and got.info.run_name == "ant_ray-deme-comparison"
    assert got.data.tags["ant_ray.stage"] == "deme_comparison" and got.data.params["seeds"] == "[0, 1]"


def _tiny_comparison_config(tmp_path, *extra):
    return load_config("search_spaces/ant_compare_digits.yaml", [
        f"output_dir={tmp_path}", "ant.steps=4", "ant.batch_size=32", "ant.log_every=2", "ant.checkpoint_every=4",
        "fid.num_samples=50", "fid.batch_size=50", "sampler.steps=3", "comparison.seeds=[0, 1]",
        "comparison.ant_methods=[uw]", "comparison.ant_clusterings=[timestep]", "comparison.max_concurrent=2",
        *extra])


@pytest.mark.slow
def test_ant_comparison_runs_arms_concurrently_and_keeps_seed_order(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = _tiny_comparison_config(tmp_path)
    result = run_ant_comparison(cfg, [0, 1], report=tmp_path / "table.md")
    assert list(result.scores) == ["vanilla", "ANT-uw (timestep)"]
    client = MlflowClient(cfg.tracking_uri())
    experiment = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    runs = client.search_runs([experiment])
    parent = next(r for r in runs if r.data.tags.get("ant_ray.stage") == "ant_comparison")
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
    # Runs finish in any order; each table cell must still be that (arm, seed)'s own child run's FID.
    by_arm_seed = {(r.data.tags["ant_ray.method"], int(r.data.params["seed"])): r.data.metrics[result.metric]
                   for r in children}
    for arm, method in (("vanilla", "ls"), ("ANT-uw (timestep)", "uw")):
        assert result.scores[arm] == [by_arm_seed[method, 0], by_arm_seed[method, 1]]
    assert "| vanilla |" in (tmp_path / "table.md").read_text()


def test_ant_comparison_failure_marks_parent_failed_and_starts_nothing_after(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = _tiny_comparison_config(tmp_path, "comparison.max_concurrent=1")
    calls = []

    def failing_first_run(arm_cfg, *, parent_run_id):
        calls.append(arm_cfg.ant.method)
        raise RuntimeError("arm failed")

    monkeypatch.setattr(ant_comparison, "run_ant", failing_first_run)
    with pytest.raises(RuntimeError, match="arm failed"):
        run_ant_comparison(cfg, [0, 1])
    assert len(calls) == 1  # with one run at a time, nothing starts after the failure
    client = MlflowClient(cfg.tracking_uri())
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    statuses = {r.data.tags.get("ant_ray.stage"): r.info.status for r in runs}
    assert statuses == {"ant_comparison": "FAILED"}
