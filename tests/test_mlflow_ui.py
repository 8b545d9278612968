"""What a person sees in the MLflow UI: the page ant_ray prints opens the runs table of the "Model training"
workflow (not MLflow 3's GenAI overview), where the search's runs open as a tree (search -> stage -> trial ->
training run) and the FID, searched-value and Dataset columns show.

Checked in headless Chromium, driven over the DevTools protocol (to open the tree as a person would, with the +
beside each parent), against `mlflow server` on a store with a search's shape of runs, logged by ant_ray's own
tracking code (tests/test_search_e2e.py checks that a real search logs that shape). Skipped without Chromium
(Debian: apt-get install chromium).
"""

import base64
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

from ant_ray.data import load_dataset
from ant_ray.tracking import TrackedRun, save_runs_view, setup_experiment

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium for the headless browser check of the "
                                                         "MLflow UI (Debian: apt-get install chromium)")


class HeadlessChromium:
    """Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: requests on the child's file
    descriptor 3, answers on 4, each a JSON message ended by a NUL byte); one page."""

    def __init__(self, width: int = 1600, height: int = 1000):
        self.profile = tempfile.mkdtemp(prefix="ant-ray-chromium-")
        requests_read, self.requests = os.pipe()
        self.answers, answers_write = os.pipe()

        def use_fds_3_and_4() -> None:  # in the child, before exec
            read, write = os.dup(requests_read), os.dup(answers_write)  # out of the way of 3 and 4 first
            os.dup2(read, 3)
            os.dup2(write, 4)

        self.process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={self.profile}", f"--window-size={width},{height}", "--remote-debugging-pipe",
             "about:blank"],
            preexec_fn=use_fds_3_and_4, pass_fds=(3, 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(requests_read)
        os.close(answers_write)
        self.pending, self.last_id = b"", 0
        page = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]

    def call(self, method: str, session: str | None = None, timeout: float = 30.0, **params) -> dict:
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self.requests, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:  # answers to this request, skipping events
            while b"\0" not in self.pending:
                if not select.select([self.answers], [], [], max(0.0, deadline - time.monotonic()))[0]:
                    raise TimeoutError(f"Chromium did not answer {method} within {timeout:g} s")
                chunk = os.read(self.answers, 1 << 16)
                if not chunk:
                    raise RuntimeError("Chromium exited")
                self.pending += chunk
            raw, self.pending = self.pending.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self.last_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]

    def open(self, url: str) -> None:
        self.call("Page.navigate", session=self.session, url=url)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", session=self.session, expression=expression, returnByValue=True)
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 45.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.evaluate(expression):
                return True
            time.sleep(0.25)
        return False

    def screenshot(self, path) -> None:
        data = self.call("Page.captureScreenshot", session=self.session, format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (TimeoutError, RuntimeError, OSError):
            self.process.kill()
        self.process.wait(timeout=10)
        os.close(self.requests)
        os.close(self.answers)
        shutil.rmtree(self.profile, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def search_store(tmp_path_factory):
    """A SQLite store with one search's tree of runs and the runs view a search saves; returns (URI, page)."""
    folder = tmp_path_factory.mktemp("mlflow_ui")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    experiment = setup_experiment(uri, "ant_ray-ui-check", folder / "artifacts")
    search = TrackedRun.start(uri, experiment, "search-ui-check", tags={"ant_ray.stage": "search"})
    search.log_dataset(load_dataset("digits", resolution=8, channels=1, limit=64), None)
    search.log_metrics({"fid100_domain": 327.804})
    stage = TrackedRun.start(uri, experiment, "ant-search", parent_run_id=search.run_id)
    stage.log_metrics({"fid100_domain": 387.847})
    trial = TrackedRun.start(uri, experiment, "ant-trial-00000", parent_run_id=stage.run_id)
    trial.log_params({"ant.method": "nash_mtl"})  # a searched value: a column of the saved view
    trial.log_metrics({"fid100_domain": 387.847}, step=60)
    train = TrackedRun.start(uri, experiment, "ant-train-00000", parent_run_id=trial.run_id)
    for step, loss in ((30, 1.36), (60, 1.32)):
        train.log_metrics({"loss": loss}, step=step)
    for run in (train, trial, stage, search):
        run.finish()
    return uri, save_runs_view(uri, experiment, ["fid100_domain", "loss"], ["ant.method", "w0"])


@pytest.fixture(scope="module")
def mlflow_server(search_store):
    uri, _ = search_store
    port = _free_port()
    log = tempfile.TemporaryFile()
    # The UI only: no background job runners (a dozen processes otherwise).
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120  # 6-30 s on an idle machine
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{address}/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"mlflow server did not start:\n{log.read().decode()[-3000:]}")
                time.sleep(0.5)
        yield address
    finally:  # the server and the workers it started (its own process group)
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


# Clicks the + of every parent row not clicked yet; returns how many it clicked.
EXPAND_NEW_PARENTS = """(() => {
    window.expanded = window.expanded || new Set();
    let clicked = 0;
    for (const row of document.querySelectorAll('.ag-row')) {
        const id = row.getAttribute('row-id'), plus = row.querySelector('[col-id="attributes.`Run Name`"] button');
        if (plus && !window.expanded.has(id)) { window.expanded.add(id); plus.click(); clicked += 1; }
    }
    return clicked;
})()"""


def test_printed_page_opens_the_runs_tree_with_its_fid_column(search_store, mlflow_server, tmp_path):
    _, page = search_store
    browser = HeadlessChromium()
    try:
        browser.open(f"{mlflow_server}/{page}")
        assert browser.wait_for("!!document.querySelector('.ag-row')"), "the runs table did not show a run"
        for _ in range(5):  # one level of the tree per round
            if not browser.evaluate(EXPAND_NEW_PARENTS):
                break
            time.sleep(0.5)
        names = ("search-ui-check", "ant-search", "ant-trial-00000", "ant-train-00000")
        shown = all(browser.wait_for(f"document.body.innerText.includes({json.dumps(n)})", 10) for n in names)
        text = browser.evaluate("document.body.innerText")
        headers = browser.evaluate("Array.from(document.querySelectorAll('.ag-header-cell')).map(h => h.innerText)")
        browser.screenshot(tmp_path / "runs_table.png")
    finally:
        browser.close()
    where = f"(see {tmp_path / 'runs_table.png'})"
    assert "Overview" not in text and "Training runs" not in text, f"opened MLflow's GenAI pages {where}"
    assert shown, f"the tree of runs did not open to the training run {where}"
    assert "fid100_domain" in headers and "loss" in headers, f"metric columns {headers} {where}"
    assert "ant.method" in headers and "nash_mtl" in text, f"the searched value's column {headers} {where}"
    assert "327.804" in text, f"the search's FID is not in its row {where}"
    assert "digits-8px" in text, f"the dataset is not in the Dataset column {where}"
