"""MLflow logging into a temporary SQLite store: nesting, params, per-step metrics, artifacts; checking that a
tracking store can be used before anything starts."""

import base64
import contextlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import matplotlib
import pytest

matplotlib.use("Agg")

from mlflow.tracking import MlflowClient

from ant_ray.commands import command
from ant_ray.data import load_dataset
from ant_ray.tracking import (RUNS_VIEW_TAG_PREFIX, TrackedRun, TrackingUnreachable, check_tracking_store, flatten,
                              loss_curve_figure, save_runs_view, saved_runs_pages, setup_experiment, ui_command)


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
    mlflow = command("mlflow")  # the bare name, or the virtualenv's path where the shell would not find it
    assert ui_command("sqlite:////x/mlflow.db") == f"{mlflow} ui --backend-store-uri sqlite:////x/mlflow.db"
    page = "#/experiments/1/runs?workflowType=machine_learning&viewStateShareKey=ant_ray-0"
    assert ui_command("sqlite:////x/mlflow.db", page) == (f"{mlflow} ui --backend-store-uri sqlite:////x/mlflow.db, "
                                                          f"then open http://127.0.0.1:5000/{page}")
    assert ui_command("http://u:secret@mlflow:5000/", page) == f"open http://u:***@mlflow:5000/{page}"


def test_runs_view_is_saved_once_per_column_set(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = setup_experiment(uri, "t", tmp_path / "artifacts")
    page = save_runs_view(uri, exp, ["fid100_domain", "fid50_domain", "fid100_domain", "loss"])
    assert page.startswith(f"#/experiments/{exp}/runs?workflowType=machine_learning&viewStateShareKey=ant_ray-")
    assert save_runs_view(uri, exp, ["fid100_domain", "fid50_domain", "loss"]) == page  # the same view, once
    views = {k: json.loads(v) for k, v in MlflowClient(uri).get_experiment(exp).tags.items()
             if k.startswith(RUNS_VIEW_TAG_PREFIX)}
    (view,) = views.values()
    assert view["name"] == "ant_ray: fid100_domain, fid50_domain, loss"
    assert json.loads(view["state"])["selectedColumns"] == [
        "metrics.`fid100_domain`", "metrics.`fid50_domain`", "metrics.`loss`", "attributes.`Dataset`"]
    assert saved_runs_pages(uri) == {"t": page}


def test_dataset_is_logged_as_a_run_input(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = TrackedRun.start(uri, setup_experiment(uri, "t", tmp_path / "artifacts"), "search")
    digits = load_dataset("digits", resolution=8, channels=1, limit=100)
    run.log_dataset(digits, None)
    (logged,) = MlflowClient(uri).get_run(run.run_id).inputs.dataset_inputs
    assert logged.dataset.name == "digits-8px" and logged.dataset.digest == digits.fingerprint
    assert json.loads(logged.dataset.source) == {"tags": {"loader": "sklearn.datasets.load_digits"}}
    assert json.loads(logged.dataset.profile)["features_shape"] == [100, 1, 8, 8]
    assert [(t.key, t.value) for t in logged.tags] == [("mlflow.data.context", "training")]


# ------------------------------------------------------------------------------------------ check_tracking_store
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_closed_port_fails_fast_with_one_line_naming_uri_and_fix():
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(TrackingUnreachable) as error:
        check_tracking_store(uri)
    assert time.monotonic() - started < 6
    message = str(error.value)
    assert "\n" not in message and uri in message and "unset MLFLOW_TRACKING_URI" in message


def test_server_that_never_answers_fails_within_the_timeout():
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(TrackingUnreachable, match="within 0.5 s"):
            check_tracking_store(uri, timeout_s=0.5)
        assert time.monotonic() - started < 3


def test_password_in_the_uri_is_not_shown():
    with pytest.raises(TrackingUnreachable) as error:
        check_tracking_store(f"http://ant:s3cret-pass@127.0.0.1:{free_port()}")
    assert "s3cret-pass" not in str(error.value)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on a free loopback port (it needs a few seconds to answer)."""
    folder = tmp_path_factory.mktemp("mlflow_server")
    port, log_path = free_port(), folder / "server.log"
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
               "--default-artifact-root", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]  # the default 4 workers start too slowly on 2 busy cores and get restarted
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # ~6 s on a quiet machine; minutes when the cores are busy
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not start: {log_path.read_text()[-2000:]}")
                time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # its own session: the server and the job consumers it started
        try:
            server.wait(timeout=30)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)  # any consumer still shutting down


def test_running_server_passes_and_a_wrong_path_is_named(mlflow_server):
    check_tracking_store(mlflow_server)
    check_tracking_store(mlflow_server + "/")
    with pytest.raises(TrackingUnreachable, match="HTTP 404"):
        check_tracking_store(mlflow_server + "/not-mlflow")


@pytest.fixture
def fake_server():
    """A stdlib HTTP server answering /health with 200 under /ok and every other path with `status`; it records
    the (path, Authorization header) of each request."""
    class Handler(http.server.BaseHTTPRequestHandler):
        status, requests = 404, []

        def do_GET(self):
            Handler.requests.append((self.path, self.headers.get("Authorization")))
            self.send_response(200 if self.path == "/ok/health" else Handler.status)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield Handler, f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def test_credentials_in_the_uri_are_sent_as_a_header(fake_server):
    handler, address = fake_server
    check_tracking_store(f"http://bob:pa%40ss@{address}/ok/")
    assert handler.requests == [("/ok/health", "Basic " + base64.b64encode(b"bob:pa@ss").decode())]


@pytest.mark.parametrize("status, hint", [(401, "refuses our credentials"), (404, "HTTP 404"), (503, "HTTP 503")])
def test_error_statuses_are_named(fake_server, status, hint):
    handler, address = fake_server
    handler.status = status
    with pytest.raises(TrackingUnreachable, match=hint):
        check_tracking_store(f"http://{address}/mlflow")


def test_sqlite_store_checks(tmp_path, monkeypatch):
    check_tracking_store(f"sqlite:///{tmp_path / 'new' / 'deeper' / 'mlflow.db'}")  # folders can be created
    assert not (tmp_path / "new").exists()  # ... but the check creates nothing
    monkeypatch.chdir(tmp_path)
    check_tracking_store("sqlite:///relative.db")
    check_tracking_store("sqlite://")  # in memory
    check_tracking_store("sqlite:///:memory:")

    (tmp_path / "a_file").write_text("")
    uri = f"sqlite:///{tmp_path / 'a_file' / 'mlflow.db'}"
    with pytest.raises(TrackingUnreachable) as error:
        check_tracking_store(uri)
    assert "\n" not in str(error.value) and uri in str(error.value) and "is a file" in str(error.value)
    with pytest.raises(TrackingUnreachable, match="is a folder"):
        check_tracking_store(f"sqlite:///{tmp_path}")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere: there is no unwritable folder to test")
def test_sqlite_store_in_an_unwritable_folder_fails(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(TrackingUnreachable, match="not writable"):
        check_tracking_store(f"sqlite:///{locked / 'mlflow.db'}")


def test_other_schemes_are_not_checked():
    check_tracking_store("databricks")
    check_tracking_store("databricks://profile")


def test_setting_up_an_experiment_leaves_the_environment_alone(tmp_path, monkeypatch):
    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI: a second search from the same Python process (or any
    # subprocess) would then log into the first one's store.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    setup_experiment(f"sqlite:///{tmp_path / 'mlflow.db'}", "t", tmp_path / "artifacts")
    assert "MLFLOW_TRACKING_URI" not in os.environ
