"""MLflow logging into a temporary SQLite store: nesting, params, per-step metrics, artifacts."""

import matplotlib

matplotlib.use("Agg")

from mlflow.tracking import MlflowClient

from ant_ray.tracking import TrackedRun, flatten, loss_curve_figure, setup_experiment, ui_command


def test_runs_nest_and_log(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = setup_experiment(uri, "t", tmp_path / "artifacts")
    assert setup_experiment(uri, "t", tmp_path / "artifacts") == exp  # reused, not duplicated
    parent = TrackedRun.start(uri, exp, "pipeline", tags={"ant_ray.stage": "pipeline"})
    child = TrackedRun(**TrackedRun.start(uri, exp, "trial", parent_run_id=parent.run_id).handle())
    parent.log_params({"a": {"b": 1}, "c": "x"})
    for step, value in enumerate([3.0, 2.0, float("nan"), 1.0]):
        child.log_metrics({"loss": value}, step=step)
    child.log_figure(loss_curve_figure([1, 2], [1.0, 0.5], "loss"), "loss_curve.png")
    child.finish()
    parent.finish("FAILED")

    client = MlflowClient(uri)
    got_child = client.get_run(child.run_id)
    assert got_child.data.tags["mlflow.parentRunId"] == parent.run_id
    assert got_child.info.status == "FINISHED"
    assert client.get_run(parent.run_id).info.status == "FAILED"
    assert client.get_run(parent.run_id).data.params == {"a.b": "1", "c": "x"}
    history = client.get_metric_history(child.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 3.0), (1, 2.0), (3, 1.0)]  # NaN is not logged
    assert [f.path for f in client.list_artifacts(child.run_id)] == ["loss_curve.png"]
    assert (tmp_path / "artifacts").is_dir()


def test_flatten_and_ui_command():
    assert flatten({"a": {"b": {"c": 1}}, "d": 2}) == {"a.b.c": 1, "d": 2}
    assert ui_command("sqlite:////x/mlflow.db") == "mlflow ui --backend-store-uri sqlite:////x/mlflow.db"
