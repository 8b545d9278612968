"""Comparison tables: mean/std per arm, published to MLflow and Markdown; the ANT comparison's arms."""

from mlflow.tracking import MlflowClient

from ant_ray.config import load_config
from ant_ray.search.ant_comparison import comparison_arms
from ant_ray.search.comparison_table import ComparisonResult, start_comparison_run
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
