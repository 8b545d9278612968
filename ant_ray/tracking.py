"""MLflow tracking: one run per stage, child runs nested under a parent with `mlflow.parentRunId`.

Runs are addressed by id through an explicit `MlflowClient`, so a Ray worker in another process logs to the same
run as long as it gets the tracking URI and run id (no reliance on MLflow's process-global active run).

Params and tags pass through `redact_credentials` first, so a token or password from the environment never
lands in the store. `check_tracking_store` tells within seconds whether the store can be used at all (MLflow
itself retries an unreachable server silently for minutes).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import json
import logging
import math
import os
import re
import ssl
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from base64 import b64encode
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ant_ray.commands import command
from ant_ray.files import publish_text

# SQLite stores are opened by several processes (driver, trials, workers); MLflow's own sqlite pool is fine with
# that for the low write rate here, but creating the schema must happen once, on the driver, before any worker.


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (sqlite:///relative.db, sqlite:////absolute.db); None for other
    stores and in-memory databases."""
    if not tracking_uri.startswith("sqlite:"):
        return None
    path_text = urllib.parse.urlsplit(tracking_uri).path.removeprefix("/")
    return None if path_text in ("", ":memory:") else Path(path_text).expanduser()


@contextlib.contextmanager
def store_setup_lock(tracking_uri: str) -> Iterator[None]:
    """Held while a SQLite store is opened for the first time and its experiment created: MLflow creates a new
    database's tables when a process first opens it, and two searches starting together on a new store would
    both create them (the second dies: "table experiments already exists"). A lock file beside the database,
    <name>.db.lock; other stores need none."""
    path = sqlite_path(tracking_uri)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def setup_experiment(tracking_uri: str, experiment: str, artifact_root: Path) -> str:
    """Create (or reuse) the experiment on the driver and return its id. Artifacts go to an explicit folder so
    they never land in a temporary working directory (as under `ray job submit`). Every call names its store
    explicitly: `mlflow.set_tracking_uri` would also set MLFLOW_TRACKING_URI in this process's environment, and a
    later search with another output directory (or any subprocess) would then log into this store. Searches that
    start together on one store each get the one experiment (`store_setup_lock`)."""
    quiet_mlflow()
    with store_setup_lock(tracking_uri):
        client = MlflowClient(tracking_uri)
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            artifact_location = None
            if not tracking_uri.startswith(("http://", "https://", "databricks")):
                artifact_root.mkdir(parents=True, exist_ok=True)
                artifact_location = artifact_root.resolve().as_uri()
            try:
                experiment_id = client.create_experiment(experiment, artifact_location=artifact_location)
            except MlflowException as error:  # a server: another search created it since we looked
                found = client.get_experiment_by_name(experiment)
                if found is None or error.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment_id = found.experiment_id
    # The kind of experiment for MLflow 3 UIs that read it. MLflow 3.17's UI ignores it and opens every experiment
    # on its GenAI overview unless the URL says workflowType=machine_learning: the links ant_ray prints do
    # (`save_runs_view`).
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, "custom_model_development")
    return experiment_id


# A saved view of the MLflow UI's runs table is an experiment tag with this prefix; the UI lists it under "Views"
# and opens it from a link with viewStateShareKey=<the rest of the tag's name>.
RUNS_VIEW_TAG_PREFIX = "mlflow.sharedViewState."
_OWN_VIEW = "ant_ray-"  # the rest of the names of the views ant_ray saves


def save_runs_view(tracking_uri: str, experiment_id: str, metrics: Iterable[str], params: Iterable[str] = ()) -> str:
    """Save a view of the experiment's runs table that shows the given metric columns (the UI shows none by
    default), then the given param columns (the searched values, so that trials compare row by row), and the
    Dataset column, and return the page that opens it: the runs table of the "Model training" workflow, e.g.
    "#/experiments/1/runs?workflowType=machine_learning&viewStateShareKey=ant_ray-0123456789ab", to append to the
    UI's address. The tree of runs (search, stages, trials, training runs) opens with the + beside each parent; a
    view cannot open it. A param no run has logged yet shows no column."""
    metrics, params = list(dict.fromkeys(metrics)), list(dict.fromkeys(params))
    columns = [f"metrics.`{m}`" for m in metrics] + [f"params.`{p}`" for p in params] + ["attributes.`Dataset`"]
    # MLflow 3.17's column ids; the metrics come right after the pinned checkbox, run name and start time ("0",
    # "runDateAndNestInfo"), and run names get the width that training runs' names need.
    state = {"selectedColumns": columns,
             "columnOrder": ["0", "attributes.`Run Name`", "runDateAndNestInfo", *columns, "duration"],
             "columnWidths": {"attributes.`Run Name`": 300, "attributes.`Dataset`": 180}}
    state_text = json.dumps(state, sort_keys=True)
    key = _OWN_VIEW + hashlib.sha256(state_text.encode()).hexdigest()[:12]
    client = MlflowClient(tracking_uri)
    if RUNS_VIEW_TAG_PREFIX + key not in client.get_experiment(experiment_id).tags:
        now = int(time.time() * 1000)
        name = f"ant_ray: {', '.join(metrics)}" + (f" + {', '.join(params)}" if params else "")
        view = {"name": name[:250], "createdAt": now, "updatedAt": now, "state": state_text}
        client.set_experiment_tag(experiment_id, RUNS_VIEW_TAG_PREFIX + key, json.dumps(view))
    return _runs_page(experiment_id, key)


def saved_runs_pages(tracking_uri: str) -> dict[str, str]:
    """Experiment name -> the page of its most recently saved ant_ray runs view (see `save_runs_view`)."""
    pages = {}
    for experiment in MlflowClient(tracking_uri).search_experiments():
        views = []
        for name, value in experiment.tags.items():
            if name.startswith(RUNS_VIEW_TAG_PREFIX + _OWN_VIEW):
                views.append((json.loads(value).get("updatedAt", 0), name.removeprefix(RUNS_VIEW_TAG_PREFIX)))
        if views:
            pages[experiment.name] = _runs_page(experiment.experiment_id, max(views)[1])
    return pages


def _runs_page(experiment_id: str, view_key: str) -> str:
    return f"#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={view_key}"


def run_page(experiment_id: str, run_id: str) -> str:
    """The page of one run in the "Model training" workflow, to append to the UI's address. MLflow 3.17 keeps the
    last workflow in the browser and starts on GenAI: without workflowType a run page opens in the GenAI
    navigation."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def quiet_mlflow() -> None:
    """MLflow's own terminal output off, unless ANT_RAY_VERBOSE=1 (`ant-ray --verbose`). With a tracking server,
    MLflow's client prints "View run ... at" and "View experiment at" whenever a run ends, and urllib3 logs
    "Retrying ..." while the server does not answer; in a Ray worker no logging is configured, so both reach the
    terminal. Called in every process that talks to MLflow through this module (driver, trials, workers); what
    goes wrong for good still raises."""
    if os.environ.get("ANT_RAY_VERBOSE", "0") == "1":
        return
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"  # read by MLflow whenever a run ends
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    if logging.getLogger("mlflow").getEffectiveLevel() < logging.WARNING:
        logging.getLogger("mlflow").setLevel(logging.WARNING)


class TrackedRun:
    """A handle on one MLflow run that any process can reconstruct from (tracking_uri, run_id)."""

    def __init__(self, tracking_uri: str, run_id: str):
        quiet_mlflow()
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri)

    @classmethod
    def start(cls, tracking_uri: str, experiment_id: str, name: str, *, parent_run_id: str | None = None,
              tags: Mapping[str, str] | None = None) -> "TrackedRun":
        all_tags = redact_credentials({key: str(value) for key, value in (tags or {}).items()})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = MlflowClient(tracking_uri).create_run(experiment_id, run_name=name, tags=all_tags)
        return cls(tracking_uri, run.info.run_id)

    def handle(self) -> dict[str, str]:
        """What a Ray worker needs to log into this run."""
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id}

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log (nested) params as dotted keys; credentials are redacted (`redact_credentials`) before the values
        are cut to MLflow's 6000 characters, so no part of a secret is stored."""
        values = redact_credentials({k: str(v) for k, v in flatten(params).items()})
        flat = [Param(k, v[:6000]) for k, v in values.items()]
        for i in range(0, len(flat), 100):
            self.client.log_batch(self.run_id, params=flat[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        import time

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and math.isfinite(v)]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags; credentials are redacted (`redact_credentials`)."""
        values = redact_credentials({k: str(v) for k, v in tags.items()})
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in values.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, path: str | Path, text: str) -> Path:
        """Write ``text`` (plus a final newline) to ``path``, a file kept beside the run's outputs, and log it as an
        artifact; returns the path."""
        path = Path(path)
        publish_text(path, text + "\n")
        self.log_artifact(path)
        return path

    def log_table(self, table, artifact_file: str) -> None:
        """A pandas DataFrame as an MLflow table (shown in the UI's artifact view); non-finite numbers as null."""
        import numpy as np

        finite = table.replace([np.inf, -np.inf], np.nan)
        clean = finite.astype(object).where(finite.notna(), None)
        self.client.log_table(self.run_id, data=clean, artifact_file=artifact_file)

    def log_dataset(self, dataset, path: str | None) -> None:
        """The training images as the run's MLflow input (the runs table's Dataset column, the run page's Datasets):
        named <dataset>-<resolution>px, with where they come from (``path``, or scikit-learn for the built-in
        digits), the number of images and their shape (its profile and schema), and the data fingerprint as its
        digest. ``dataset``: an `ant_ray.data.ImageDataset`."""
        import mlflow.data
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.entities import DatasetInput, InputTag

        if path is None:
            source = CodeDatasetSource({"loader": "sklearn.datasets.load_digits"})
        else:
            with warnings.catch_warnings():  # MLflow registers its local-file source twice and says so
                warnings.simplefilter("ignore", UserWarning)
                source = resolve_dataset_source(Path(path).expanduser().resolve().as_uri())
        labels = dataset.labels.numpy() if dataset.labels is not None else None
        entry = mlflow.data.from_numpy(dataset.images.numpy(), source=source, targets=labels,
                                       name=f"{dataset.name}-{dataset.resolution}px", digest=dataset.fingerprint)
        self.client.log_inputs(self.run_id, datasets=[
            DatasetInput(entry._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "training")])])

    def log_figure(self, figure, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / name
            figure.savefig(target, dpi=100, bbox_inches="tight")
            self.log_artifact(target)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def status(self) -> str:
        return self.client.get_run(self.run_id).info.status

    def reopen(self) -> None:
        """Mark a run RUNNING again (a resumed search continues its runs instead of opening new ones)."""
        self.client.update_run(self.run_id, status="RUNNING")


def end_open_runs(tracking_uri: str, experiment_id: str, root_run_id: str, status: str, reason: str) -> int:
    """End every run under ``root_run_id`` (its children, their children, ...) that is still RUNNING, with
    ``status`` and the reason as the `ant_ray.failure` tag; returns how many. A search stopped by a signal (or an
    error) calls this for its own runs: trials and Ray Train runs of the trials that were running when it stopped
    would otherwise stay RUNNING, as their processes were killed with the search. Runs of other searches in the
    experiment (running ones too) are not touched: a run is ended only if its chain of parents leads to the root."""
    client = MlflowClient(tracking_uri)
    running = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=5000)
    parent_of = {run.info.run_id: run.data.tags.get("mlflow.parentRunId") for run in running}

    def under_root(run_id: str) -> bool:
        seen = set()
        while run_id and run_id not in seen:  # a few levels: search -> stage -> trial -> training run
            seen.add(run_id)
            parent = parent_of.get(run_id)
            if parent is None and run_id not in parent_of:  # a parent that is no longer RUNNING: look it up
                parent = parent_of[run_id] = client.get_run(run_id).data.tags.get("mlflow.parentRunId")
            if parent == root_run_id:
                return True
            run_id = parent
        return False

    ended = 0
    for run in running:
        if run.info.run_id != root_run_id and under_root(run.info.run_id):
            tracked = TrackedRun(tracking_uri, run.info.run_id)
            tracked.set_tags({"ant_ray.failure": reason[:500]})
            tracked.finish(status)
            ended += 1
    return ended


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix=f"{name}."))
        else:
            out[name] = value
    return out


def loss_curve_figure(steps: Iterable[int], losses: Iterable[float], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(list(steps), list(losses))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    return fig


def ui_address(tracking_uri: str) -> str | None:
    """Where the UI on this store answers: the tracking server (credentials hidden), or for a SQLite store the UI
    that `mlflow ui` / `ant-ray ui` start (http://127.0.0.1:5000); None for other stores."""
    if tracking_uri.startswith("sqlite:"):
        return "http://127.0.0.1:5000"
    if tracking_uri.startswith(("http://", "https://")):
        return redact_credentials({"uri": tracking_uri})["uri"].rstrip("/")
    return None


def ui_command(tracking_uri: str, page: str | None = None) -> str:
    """How to look at the runs: the command that starts the UI on a SQLite store, and the address of ``page``
    (from `save_runs_view` or `run_page`) on it or on the tracking server."""
    shown = redact_credentials({"uri": tracking_uri})["uri"]
    if tracking_uri.startswith("sqlite:"):
        ui = _ui_start_command(tracking_uri)
        return f"{ui}, then open {ui_address(tracking_uri)}/{page}" if page else ui
    if page and tracking_uri.startswith(("http://", "https://")):
        return f"open {ui_address(tracking_uri)}/{page}"
    return f"open {shown} (MLFLOW_TRACKING_URI) in a browser"


def _ui_start_command(tracking_uri: str) -> str:
    """`ant-ray ui --output-dir DIR` for an output directory's own store (DIR/mlflow.db): it starts in about 15 s
    where `mlflow ui` takes 60, and prints the runs tables' links. Another SQLite file gets `mlflow ui`."""
    import shlex

    db = Path(tracking_uri.removeprefix("sqlite:///"))
    if db.name != "mlflow.db" or os.environ.get("MLFLOW_TRACKING_URI", tracking_uri) != tracking_uri:
        # `ant-ray ui` opens DIR/mlflow.db, or MLFLOW_TRACKING_URI whenever that is set: name the store itself
        return f"{command('mlflow')} ui --backend-store-uri {tracking_uri}"
    output_dir = db.parent
    try:  # the shorter, relative form when the folder is below the working directory
        output_dir = output_dir.relative_to(Path.cwd())
    except ValueError:
        pass
    return f"{command('ant-ray')} ui --output-dir {shlex.quote(str(output_dir))}"


def worker_env() -> dict[str, str]:
    """Environment for the workers of a private local Ray: a quiet MLflow. Not the tracking URI: every worker gets
    it in its tracking handle, so one Ray instance can serve runs that log to different stores (a joined cluster's
    workers get the job's runtime env instead)."""
    return {"MLFLOW_ENABLE_ASYNC_LOGGING": "false",
            "GIT_PYTHON_REFRESH": "quiet", **({"HOME": os.environ["HOME"]} if "HOME" in os.environ else {})}


# ----------------------------------------------------------------------------------------- credential redaction
REDACTED = "***"
# Environment variables and param/tag names that hold credentials: AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_TOKEN,
# MLFLOW_TRACKING_PASSWORD, HF_TOKEN, ... (a false positive only hides a value; a miss would leak one).
_CREDENTIAL_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|KEY", re.IGNORECASE)
# Values of such variables that are switches, not secrets (e.g. HF_HUB_DISABLE_IMPLICIT_TOKEN=1).
_NOT_SECRETS = {"true", "false", "yes", "no", "on", "off", "none", "null"}
# A password in a URL's user part, e.g. postgresql://user:password@host/db or https://user:token@host.
_URL_PASSWORD = re.compile(r"(?P<start>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^/\s@]+@")


def looks_like_credential(name: str) -> bool:
    """Whether a variable, param or tag name suggests a credential (contains TOKEN, SECRET, PASSWORD, KEY, ...)."""
    return bool(_CREDENTIAL_NAME.search(name))


def environment_credentials(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of credential-looking environment variables that can be secrets (4+ characters, not a yes/no
    word), longest first so that a secret containing another is replaced whole."""
    environ = os.environ if environ is None else environ
    values = {value for name, value in environ.items()
              if looks_like_credential(name) and len(value) >= 4 and value.lower() not in _NOT_SECRETS}
    return sorted(values, key=len, reverse=True)


def redact_credentials(values: Mapping[str, str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Replace by "***": the value of a credential-looking key; any value equal to a credential from the
    environment (`environment_credentials`); a credential of 8+ characters inside a longer value (a URL or a
    command line that embeds a token); and the password part of a URL. Keys are kept as they are."""
    secrets = environment_credentials(environ)
    redacted = {}
    for key, value in values.items():
        if looks_like_credential(key):
            redacted[key] = REDACTED
            continue
        for secret in secrets:
            if value == secret or (len(secret) >= 8 and secret in value):
                value = value.replace(secret, REDACTED)
        redacted[key] = _URL_PASSWORD.sub(rf"\g<start>{REDACTED}@", value)
    return redacted


# --------------------------------------------------------------------------------------------- store check
class TrackingUnreachable(ValueError):
    """The MLflow tracking store cannot be used; the message (one line) names the URI and the fix."""


_SERVER_FIX = "start the server, or unset MLFLOW_TRACKING_URI to use the local SQLite store"


def check_tracking_store(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before anything is created, if the tracking store at `uri` cannot be used.

    http(s): a GET of the server's /health, then (if that is not 200, e.g. behind a proxy) of the REST API's
    experiment search, each within `timeout_s` (MLflow's own client retries an unreachable server silently for
    minutes). No answer, or an answer of HTTP 404, 401/403, 429 or 5xx, raises. sqlite: the database file, or the
    folder it would be created in, must be writable (nothing is created). Other schemes (databricks, ...) are
    not checked. Raises TrackingUnreachable with one line naming the URI and the fix."""
    if uri.startswith(("http://", "https://")):
        _check_tracking_server(uri, timeout_s)
    elif uri.startswith("sqlite:"):
        _check_sqlite_store(uri)


def _check_tracking_server(uri: str, timeout_s: float) -> None:
    shown = redact_credentials({"uri": uri})["uri"]
    parts = urllib.parse.urlsplit(uri)
    headers = _auth_headers()
    if parts.username is not None:  # http://user:password@host: urllib wants it as a header, not in the URL
        headers.setdefault("Authorization", "Basic " + b64encode(
            f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}".encode()).decode())
        parts = parts._replace(netloc=parts.netloc.rpartition("@")[2])
    base = urllib.parse.urlunsplit(parts).rstrip("/")
    if _http_status(f"{base}/health", headers, shown, timeout_s) == 200:  # cheap: no database work on the server
        return
    status = _http_status(f"{base}/api/2.0/mlflow/experiments/search?max_results=1", headers, shown, timeout_s)
    if status in (401, 403) and not os.environ.get("MLFLOW_TRACKING_AUTH"):  # an auth plugin: we cannot log in
        raise TrackingUnreachable(f"the MLflow tracking server {shown} refuses our credentials (HTTP {status}); set "
                                  "MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    if status == 404:
        raise TrackingUnreachable(f"{shown} answers HTTP 404 for MLflow's REST API (/api/2.0/mlflow/...); check "
                                  "the URI's host, port and path, or unset MLFLOW_TRACKING_URI to use the local "
                                  "SQLite store")
    if status == 429 or status >= 500:  # MLflow's client would retry these for minutes
        raise TrackingUnreachable(f"the MLflow tracking server {shown} answers HTTP {status}; check the server "
                                  "(its log), or unset MLFLOW_TRACKING_URI to use the local SQLite store")


def _http_status(url: str, headers: dict[str, str], shown_uri: str, timeout_s: float) -> int:
    """The HTTP status of a GET of `url`; TrackingUnreachable if nothing answers within `timeout_s`."""
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s, context=_tls_context()) as response:
            return response.status
    except urllib.error.HTTPError as error:  # the server answered, with an error status
        return error.code
    except (OSError, http.client.HTTPException) as error:  # refused, timed out, unknown host, not HTTP
        reason = getattr(error, "reason", None) or error
        raise TrackingUnreachable(f"cannot reach the MLflow tracking server {shown_uri} within {timeout_s:g} s "
                                  f"({reason}); {_SERVER_FIX}") from None


def _auth_headers() -> dict[str, str]:
    """The credentials MLflow's client would send (MLFLOW_TRACKING_TOKEN, or username and password)."""
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"}
    username, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if username and password:
        return {"Authorization": "Basic " + b64encode(f"{username}:{password}".encode()).decode()}
    return {}


def _tls_context() -> ssl.SSLContext | None:
    """TLS settings as MLflow's client reads them from the environment; None: Python's defaults."""
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        return ssl._create_unverified_context()  # the user opted out of verification for MLflow too
    certificate_authority = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH")
    client_certificate = os.environ.get("MLFLOW_TRACKING_CLIENT_CERT_PATH")
    if not certificate_authority and not client_certificate:
        return None
    context = ssl.create_default_context(cafile=certificate_authority or None)
    if client_certificate:
        context.load_cert_chain(client_certificate)
    return context


def _check_sqlite_store(uri: str) -> None:
    """sqlite:///relative.db, sqlite:////absolute.db; sqlite:// and sqlite:///:memory: are in-memory."""
    path = sqlite_path(uri)
    if path is None:
        return
    fix = ("choose a writable place with tracking.uri or MLFLOW_TRACKING_URI (or output_dir, for the default "
           "store)")

    def fail(problem: str) -> None:
        raise TrackingUnreachable(f"the MLflow SQLite store {uri} cannot be used: {problem}; {fix}")

    if path.is_dir():
        fail(f"{path} is a folder, not a database file")
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        fail(f"{path} is not writable")
    existing = path.absolute().parent
    while not existing.exists():  # the first folder that exists must let us create the rest
        existing = existing.parent
    if not existing.is_dir():
        fail(f"{existing} is a file, so no folder can be created there")
    if not os.access(existing, os.W_OK | os.X_OK):  # SQLite also writes a journal file beside the database
        fail(f"the folder {existing} is not writable")
