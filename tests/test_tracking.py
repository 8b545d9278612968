"""MLflow logging into a temporary SQLite store: nesting, params, per-step metrics, artifacts; checking that a
tracking store can be used before anything starts."""

import base64
import contextlib
import http.server
import json
import logging
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
from ant_ray.tracking import (RUNS_VIEW_TAG_PREFIX, TrackedRun, TrackingUnreachable, check_tracking_store,
                              end_open_runs, flatten, loss_curve_figure, quiet_mlflow, run_page, save_runs_view,
                              saved_runs_pages, setup_experiment, ui_address, ui_command)


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


def test_run_pages_open_in_the_model_training_workflow():
    # MLflow 3.17 opens a run page in its GenAI navigation unless the address says workflowType=machine_learning
    assert run_page("3", "abc") == "#/experiments/3/runs/abc?workflowType=machine_learning"
    assert ui_address("sqlite:////x/mlflow.db") == "http://127.0.0.1:5000"
    assert ui_address("http://u:secret@mlflow:5000/") == "http://u:***@mlflow:5000"
    assert ui_address("databricks") is None


def test_flatten_and_ui_command(monkeypatch, tmp_path):
    assert flatten({"a": {"b": {"c": 1}}, "d": 2}) == {"a.b.c": 1, "d": 2}
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ant_ray = command("ant-ray")  # the bare name, or the virtualenv's path where the shell would not find it
    # an output directory's store: `ant-ray ui` (starts in 15 s, prints the runs tables' links), not `mlflow ui`
    assert ui_command("sqlite:////x/mlflow.db") == f"{ant_ray} ui --output-dir /x"
    page = "#/experiments/1/runs?workflowType=machine_learning&viewStateShareKey=ant_ray-0"
    assert ui_command("sqlite:////x/mlflow.db", page) == (f"{ant_ray} ui --output-dir /x, "
                                                          f"then open http://127.0.0.1:5000/{page}")
    monkeypatch.chdir(tmp_path)  # below the working directory: the relative path, quoted for a shell
    assert ui_command(f"sqlite:///{tmp_path}/my runs/mlflow.db") == f"{command('ant-ray')} ui --output-dir 'my runs'"
    # a store `ant-ray ui` would not open: another file name, or MLFLOW_TRACKING_URI naming another store
    mlflow = command("mlflow")
    assert ui_command("sqlite:////x/other.db") == f"{mlflow} ui --backend-store-uri sqlite:////x/other.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////y/mlflow.db")
    assert ui_command("sqlite:////x/mlflow.db") == f"{mlflow} ui --backend-store-uri sqlite:////x/mlflow.db"
    assert ui_command("http://u:secret@mlflow:5000/", page) == f"open http://u:***@mlflow:5000/{page}"


def test_runs_view_is_saved_once_per_column_set(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = setup_experiment(uri, "t", tmp_path / "artifacts")
    page = save_runs_view(uri, exp, ["fid100_domain", "fid50_domain", "fid100_domain", "loss"], ["ant.k", "w0"])
    assert page.startswith(f"#/experiments/{exp}/runs?workflowType=machine_learning&viewStateShareKey=ant_ray-")
    assert save_runs_view(uri, exp, ["fid100_domain", "fid50_domain", "loss"], ["ant.k", "w0"]) == page  # once
    views = {k: json.loads(v) for k, v in MlflowClient(uri).get_experiment(exp).tags.items()
             if k.startswith(RUNS_VIEW_TAG_PREFIX)}
    (view,) = views.values()
    assert view["name"] == "ant_ray: fid100_domain, fid50_domain, loss + ant.k, w0"
    assert json.loads(view["state"])["selectedColumns"] == [
        "metrics.`fid100_domain`", "metrics.`fid50_domain`", "metrics.`loss`", "params.`ant.k`", "params.`w0`",
        "attributes.`Dataset`"]
    assert saved_runs_pages(uri) == {"t": page}


def test_searched_values_are_the_views_param_columns():
    from ant_ray.config import load_config
    from ant_ray.search.trials import trial_param_names

    cfg = load_config("search_spaces/quickstart.yaml")  # ant over k and method, deme over p, N = the ant winner's k
    k_high = cfg.search.ant.space["ant.k"].high
    assert trial_param_names(cfg) == ["ant.k", "ant.method", "finetune.p", *(f"w{i}" for i in range(k_high))]
    grouped = load_config("search_spaces/quickstart.yaml", ["merge_search.layer_groups={down: down_blocks., up: ''}",
                                                           "search.ant.space={ant.lr: {type: categorical, "
                                                           "choices: [0.001, 0.002]}}", "ant.k=2"])
    assert trial_param_names(grouped) == ["ant.lr", "finetune.p", "down.w0", "down.w1", "up.w0", "up.w1"]


def test_two_processes_create_a_new_store_together(tmp_path):
    """Two searches starting at once on a new SQLite store: MLflow creates the tables when a process first opens
    the database, and without the lock the second process died ("table experiments already exists")."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    start = time.time() + 8  # both processes have imported MLflow by then (about 3 s each on 2 busy cores)
    code = ("import sys, time; from pathlib import Path; from ant_ray.tracking import setup_experiment\n"
            "while time.time() < float(sys.argv[2]): time.sleep(0.005)\n"
            "print(setup_experiment(sys.argv[1], 'together', Path(sys.argv[3])))")
    processes = [subprocess.Popen([sys.executable, "-c", code, uri, str(start), str(tmp_path / "artifacts")],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], [err[-1500:] for _, err in outputs]
    ids = {out.strip() for out, _ in outputs}
    assert len(ids) == 1  # one experiment, found or created by each
    assert [e.name for e in MlflowClient(uri).search_experiments()].count("together") == 1
    assert (tmp_path / "mlflow.db.lock").is_file()


def test_a_stopped_search_ends_every_open_run_under_it(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = setup_experiment(uri, "t", tmp_path / "artifacts")
    search = TrackedRun.start(uri, exp, "search")
    stage = TrackedRun.start(uri, exp, "ant-search", parent_run_id=search.run_id)
    done = TrackedRun.start(uri, exp, "ant-trial-1", parent_run_id=stage.run_id)
    running = TrackedRun.start(uri, exp, "ant-trial-2", parent_run_id=stage.run_id)
    training = TrackedRun.start(uri, exp, "ant-train-2", parent_run_id=running.run_id)
    done_training = TrackedRun.start(uri, exp, "ant-train-1", parent_run_id=done.run_id)
    other_search = TrackedRun.start(uri, exp, "another search")
    other_trial = TrackedRun.start(uri, exp, "its trial", parent_run_id=other_search.run_id)
    for run in (done_training, done):
        run.finish()
    stage.finish("KILLED")  # the search ends its own runs itself; their children may still be RUNNING
    assert end_open_runs(uri, exp, search.run_id, "KILLED", "SystemExit: 143") == 2
    assert [r.status() for r in (running, training)] == ["KILLED", "KILLED"]
    assert MlflowClient(uri).get_run(training.run_id).data.tags["ant_ray.failure"] == "SystemExit: 143"
    assert [r.status() for r in (done, done_training)] == ["FINISHED", "FINISHED"]
    assert [r.status() for r in (search, other_search, other_trial)] == ["RUNNING"] * 3  # not its business


class _Trial:  # what TrialTracker reads of a Tune trial
    def __init__(self, trial_id, last_result):
        self.trial_id, self.last_result = trial_id, last_result


def test_a_trial_the_scheduler_stopped_ends_finished_with_its_fate(tmp_path):
    from ant_ray.search.callbacks import RUN_ID_FILE, TRAIN_RUN_IDS_FILE, TrialTracker, trial_folder

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = setup_experiment(uri, "t", tmp_path / "artifacts")
    tracker = TrialTracker(uri, tmp_path / "ant", "fid100_domain", final_step=60)
    ends = {"stopped": ({"step": 30, "fid100_domain": 400.0}, "on_trial_complete"),
            "finished": ({"step": 60, "fid100_domain": 380.0}, "on_trial_complete"),
            "diverged": ({"step": 0, "diverged": 1}, "on_trial_complete"),
            "failed": ({"step": 30}, "on_trial_error")}
    runs = {}
    for name, (last_result, event) in ends.items():
        folder = trial_folder(tmp_path / "ant", name)
        folder.mkdir(parents=True)
        trial_run = TrackedRun.start(uri, exp, f"ant-trial-{name}")
        train_run = TrackedRun.start(uri, exp, f"ant-train-{name}", parent_run_id=trial_run.run_id)
        (folder / RUN_ID_FILE).write_text(trial_run.run_id)
        (folder / TRAIN_RUN_IDS_FILE).write_text(json.dumps([train_run.run_id]))
        getattr(tracker, event)(0, [], _Trial(name, last_result))
        runs[name] = [MlflowClient(uri).get_run(r.run_id) for r in (trial_run, train_run)]
    got = {name: {(r.info.status, r.data.tags["ant_ray.fate"]) for r in pair} for name, pair in runs.items()}
    assert got == {"stopped": {("FINISHED", "stopped_early")}, "finished": {("FINISHED", "finished")},
                   "diverged": {("FAILED", "diverged")}, "failed": {("FAILED", "failed")}}


def test_mlflow_prints_nothing_unless_verbose(monkeypatch):
    retries = logging.getLogger("urllib3.connectionpool")  # its "Retrying (...)" warnings reach a worker's stderr
    level = retries.level
    try:
        for verbose, suppressed, retry_level in (("0", "true", logging.ERROR), ("1", None, logging.NOTSET)):
            monkeypatch.setenv("ANT_RAY_VERBOSE", verbose)
            monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
            retries.setLevel(logging.NOTSET)
            quiet_mlflow()
            # read by MLflow when a run ends: no "View run ... at", "View experiment at"
            assert os.environ.get("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT") == suppressed
            assert retries.level == retry_level
    finally:
        retries.setLevel(level)


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


def test_a_run_on_a_server_ends_without_mlflows_lines(mlflow_server, tmp_path, capfd, monkeypatch):
    monkeypatch.delenv("ANT_RAY_VERBOSE", raising=False)
    run = TrackedRun.start(mlflow_server, setup_experiment(mlflow_server, "quiet", tmp_path), "trial")
    run.log_metrics({"fid100_domain": 1.0})
    run.finish()
    printed = capfd.readouterr()
    assert "View run" not in printed.out + printed.err and "View experiment" not in printed.out + printed.err


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


# ------------------------------------------------------------------------------------------ what a search shows
def test_every_stage_lists_its_trials_in_one_schema(tmp_path):
    import pandas as pd

    from ant_ray.search.outcome import StageOutcome
    from ant_ray.search.result import TRIAL_COLUMNS, SearchResult, trials_table

    ant_csv, merge_csv = tmp_path / "ant.csv", tmp_path / "merge.csv"
    pd.DataFrame([{"stage": "ant", "trial_id": "a_1", "fate": "finished", "metric": "fid100_domain", "score": 380.5,
                   "step": 60, "ant.k": 2, "ant.method": "uw"},
                  {"stage": "ant", "trial_id": "a_2", "fate": "stopped_early", "metric": "fid100_domain",
                   "score": 400.0, "step": 30, "ant.k": 3, "ant.method": "pcgrad"}]).to_csv(ant_csv, index=False)
    # the merge stage's own table: a row per candidate and rung
    rung = [("c1", 0, 1.0, 1.0, 10.0), ("c2", 0, 1.0, 0.0, 12.0), ("c3", 0, 0.0, 1.0, 9.0),
            ("c3", 1, 0.0, 1.0, 8.0), ("c1", 1, 1.0, 1.0, 8.5)]
    pd.DataFrame([{"candidate": c, "rung": r, "samples": 50 * (r + 1), "images": 50, "w0": w0, "w1": w1, "fid": f,
                   "metric": f"fid{50 * (r + 1)}_domain"} for c, r, w0, w1, f in rung]).to_csv(merge_csv, index=False)
    ant = StageOutcome("ant", "fid100_domain", {}, 380.5, {}, "run", trials_csv=str(ant_csv))
    merge = StageOutcome("merge", "fid100_domain", {}, 8.0, {}, "run", trials_csv=str(merge_csv),
                         extra={"fidelities": [50, 100]})
    rows = trials_table(merge)
    assert list(rows.columns) == [*TRIAL_COLUMNS, "w0", "w1"]
    assert rows[["trial_id", "fate", "metric", "score", "fidelity"]].values.tolist() == [
        ["c1", "finished", "fid100_domain", 8.5, 100], ["c2", "stopped_early", "fid50_domain", 12.0, 50],
        ["c3", "finished", "fid100_domain", 8.0, 100]]
    table = SearchResult(tmp_path, "sqlite://", "run", {"ant": ant, "merge": merge}, tmp_path).trials
    assert list(table.columns) == [*TRIAL_COLUMNS, "ant.k", "ant.method", "w0", "w1"]
    assert list(table["stage"]) == ["ant", "ant", "merge", "merge", "merge"]
    assert str(table["step"].dtype) == "Int64" and str(table["ant.k"].dtype) == "Int64"
    assert table["w0"].dtype == float  # weights stay floats where every one is whole


def test_search_table_links_the_search_run(tmp_path):
    from ant_ray.search.outcome import StageOutcome
    from ant_ray.search.result import SearchResult

    outcome = StageOutcome("ant", "fid100_domain", {"ant.k": 2}, 380.5, {}, "run", finished=1)
    page = "#/experiments/7/runs?workflowType=machine_learning&viewStateShareKey=ant_ray-0"
    text = SearchResult(tmp_path, "sqlite:////x/mlflow.db", "parent1", {"ant": outcome}, tmp_path / "model",
                        runs_page=page).table()
    assert ("search run (figures, trials table): http://127.0.0.1:5000/#/experiments/7/runs/parent1"
            "?workflowType=machine_learning") in text
    assert text.splitlines()[-1].endswith(f"then open http://127.0.0.1:5000/{page}")


def _study(journal, name, values):
    import optuna

    from ant_ray.search.searchers import journal_storage

    study = optuna.create_study(storage=journal_storage(journal), study_name=name)
    space = {"ant.k": optuna.distributions.IntDistribution(2, 6),
             "ant.method": optuna.distributions.CategoricalDistribution(["uw", "pcgrad", "nash_mtl"])}
    for i, value in enumerate(values):
        study.add_trial(optuna.trial.create_trial(params={"ant.k": 2 + i % 5, "ant.method": ["uw", "pcgrad"][i % 2]},
                                                  distributions=space, value=value))


def test_study_figures_say_how_many_trials_and_skip_importances_under_five(tmp_path, monkeypatch):
    import matplotlib.figure

    from ant_ray.search import plots

    titles = []
    save = matplotlib.figure.Figure.savefig
    def every_title(figure):  # Optuna titles some plots on the left, ours is centred: there must be one
        return " ".join(filter(None, (figure.axes[0].get_title(loc=side) for side in ("left", "center", "right"))))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda self, *a, **k: (titles.append(every_title(self)), save(self, *a, **k)))
    journal = tmp_path / "optuna.journal"
    _study(journal, "few", [390.0, 380.0, float("inf"), 385.0])  # 3 finished, 1 diverged (+inf)
    _study(journal, "enough", [390.0, 380.0, 385.0, 370.0, 375.0])
    few = plots.study_figures(journal, "few", tmp_path / "few", "fid100_domain")
    assert [p.name for p in few] == ["optimization_history.png", "parallel_coordinates.png"]
    assert titles == ["fid100_domain: optimisation history (3 finished trials)",
                      "fid100_domain: parallel coordinates (3 finished trials)"]
    enough = plots.study_figures(journal, "enough", tmp_path / "enough", "fid100_domain")
    assert "param_importances.png" in [p.name for p in enough]
    assert "fid100_domain: parameter importances (5 finished trials)" in titles


def test_merge_landscape_shows_a_winner_on_the_edge_of_the_box(tmp_path, monkeypatch):
    import matplotlib.figure
    import pandas as pd

    from ant_ray.search import plots

    shown = {}
    save = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: (
        shown.update(x=self.axes[0].get_xlim(), y=self.axes[0].get_ylim()), save(self, *a, **k)))
    points = [(1.0, 1.0, 10.0), (1.0, 0.0, 12.0), (0.0, 1.0, 9.0), (0.5, 0.5, 11.0), (1.5, 1.5, 8.0),
              (0.3, 1.2, 9.5), (1.1, 0.2, 13.0)]
    table = pd.DataFrame([{"rung": 0, "w0": a, "w1": b, "fid": f, "metric": "fid50_domain"} for a, b, f in points])
    plots.merge_landscape(table, ["w0", "w1"], {"w0": 1.5, "w1": 1.5}, tmp_path / "landscape.png")
    assert shown["x"][0] < 0.0 and shown["x"][1] > 1.5 and shown["y"][0] < 0.0 and shown["y"][1] > 1.5


def test_stage_figures_are_copied_to_the_search_run(tmp_path):
    from ant_ray.search.plots import copy_stage_figures

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    search = TrackedRun.start(uri, setup_experiment(uri, "t", tmp_path / "artifacts"), "search")
    for stage, name in (("ant", "optimization_history.png"), ("merge", "merge_landscape.png")):
        (tmp_path / stage / "figures").mkdir(parents=True)
        loss_curve_figure([1, 2], [1.0, 0.5], "x").savefig(tmp_path / stage / "figures" / name)
    assert copy_stage_figures(search, tmp_path, ["ant", "deme", "merge"]) == [
        "figures/ant/optimization_history.png", "figures/merge/merge_landscape.png"]
    logged = {a.path for folder in ("figures/ant", "figures/merge")
              for a in MlflowClient(uri).list_artifacts(search.run_id, folder)}
    assert logged == {"figures/ant/optimization_history.png", "figures/merge/merge_landscape.png"}


def test_resuming_from_python_takes_the_folder_alone(tmp_path):
    import ant_ray

    with pytest.raises(ant_ray.ConfigError) as error:
        ant_ray.launch_search(resume=tmp_path)
    message = str(error.value)
    assert message.startswith(f"resume={str(tmp_path)!r} is not a search folder") and "--" not in message
    with pytest.raises(ant_ray.ConfigError, match="needs a config"):
        ant_ray.launch_search()
