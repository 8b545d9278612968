"""Security: nothing the project loads is unpickled, no credential from the environment reaches MLflow or the private
Ray's files, and `ant-ray ui` keeps to this machine unless told otherwise (and leaves no server behind).

Weights, task vectors and checkpoints are safetensors + JSON; FID statistics are .npz read with
allow_pickle=False. Unpickling a file runs whatever code it holds, so the scan below fails on any call that
could unpickle, naming file:line.
"""

import ast
import sqlite3
from contextlib import closing
from pathlib import Path

from mlflow.tracking import MlflowClient

from ant_ray.tracking import REDACTED, TrackedRun, redact_credentials, setup_experiment

ROOT = Path(__file__).resolve().parent.parent
SCANNED = [ROOT / "ant_ray", ROOT / "jobs", ROOT / "benchmarks"]

# Fully qualified callables that unpickle whatever they are given.
UNPICKLERS = {"pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "dill.load",
              "dill.loads", "cloudpickle.load", "cloudpickle.loads", "joblib.load", "pandas.read_pickle",
              "torch.serialization.load"}


def qualified_name(node: ast.expr, aliases: dict[str, str]) -> str | None:
    """`np.load` -> "numpy.load" given `import numpy as np`; None for calls on anything but a (dotted) name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


def unpickling_calls(source: str, filename: str) -> list[str]:
    """`filename:line: call` for each call that may unpickle: the UNPICKLERS, torch.load without
    weights_only=True, numpy.load with allow_pickle=True."""
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):  # imports anywhere in the module, lazy ones inside functions too
        if isinstance(node, ast.Import):
            aliases.update({alias.asname or alias.name: alias.name for alias in node.names})
        elif isinstance(node, ast.ImportFrom) and node.module:
            aliases.update({alias.asname or alias.name: f"{node.module}.{alias.name}" for alias in node.names})
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = qualified_name(node.func, aliases)
        if (name in UNPICKLERS
                or (name == "torch.load" and not keyword_is(node, "weights_only", True))
                or (name == "numpy.load" and keyword_is(node, "allow_pickle", True))):
            found.append(f"{filename}:{node.lineno}: {name}(...)")
    return found


def test_the_project_never_unpickles():
    found = []
    for folder in SCANNED:
        for path in sorted(folder.rglob("*.py")):
            found += unpickling_calls(path.read_text(), str(path.relative_to(ROOT)))
    assert not found, "calls that can unpickle (use safetensors/JSON, or torch.load(weights_only=True)):\n" + \
        "\n".join(found)


def test_the_scan_finds_unpickling_however_it_is_spelled():
    bad = """
import pickle
import torch as T
import numpy as np
from pickle import loads as from_bytes
from torch import load

def f(path, blob):
    pickle.load(open(path, "rb"))
    from_bytes(blob)
    T.load(path)
    load(path, weights_only=False)
    np.load(path, allow_pickle=True)
"""
    found = unpickling_calls(bad, "bad.py")
    assert [entry.split(": ")[0] for entry in found] == [f"bad.py:{line}" for line in (9, 10, 11, 12, 13)]
    good = """
import torch, numpy
torch.load("w.pt", weights_only=True)
numpy.load("s.npz", allow_pickle=False)
"""
    assert unpickling_calls(good, "good.py") == []


# ---------------------------------------------------------------------------------------- credential redaction
FAKE_TOKEN = "mlflow-token-7f3c9a2b1d"
FAKE_AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


def test_credentials_from_the_environment_never_reach_the_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_AWS_SECRET)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = setup_experiment(uri, "secrets", tmp_path / "artifacts")
    run = TrackedRun.start(uri, experiment, "run", tags={"launched_with": f"--token {FAKE_TOKEN}"})
    run.log_params({
        "token": FAKE_TOKEN,  # equal to a credential
        "storage": {"url": f"s3://bucket/?secret={FAKE_AWS_SECRET}"},  # a credential inside a value
        "tracking": {"password": "hunter2-not-from-env"},  # a credential-looking key
        "database": "postgresql://ant:db-pass-42@db.internal/mlflow",  # a password in a URL
        "lr": 0.001,
    })
    run.set_tags({"aws": FAKE_AWS_SECRET, "note": f"uses {FAKE_TOKEN}", "ant_ray.stage": "pipeline"})
    run.finish()

    stored = MlflowClient(uri).search_runs([experiment])[0].data
    assert stored.params["token"] == REDACTED and stored.params["tracking.password"] == REDACTED
    assert stored.params["storage.url"] == f"s3://bucket/?secret={REDACTED}"
    assert stored.params["database"] == f"postgresql://ant:{REDACTED}@db.internal/mlflow"
    assert stored.params["lr"] == "0.001" and stored.tags["ant_ray.stage"] == "pipeline"  # the rest is kept
    assert stored.tags["aws"] == REDACTED and stored.tags["note"] == f"uses {REDACTED}"
    everything = [*stored.params.values(), *stored.tags.values()]
    with closing(sqlite3.connect(tmp_path / "mlflow.db")) as database:  # the raw rows too, not only what MLflow shows
        for table in ("params", "tags"):
            everything += [str(row) for row in database.execute(f"SELECT * FROM {table}")]
    everything = " ".join(everything)
    for secret in (FAKE_TOKEN, FAKE_AWS_SECRET, "hunter2-not-from-env", "db-pass-42"):
        assert secret not in everything


def test_switches_and_short_values_are_not_taken_for_secrets():
    environ = {"HF_HUB_DISABLE_IMPLICIT_TOKEN": "1", "SOME_KEY": "true", "PATH": "/usr/bin",
               "MLFLOW_TRACKING_PASSWORD": "admin"}
    redacted = redact_credentials({"steps": "1", "flag": "true", "path": "/usr/bin", "user": "admin",
                                   "note": "administrator"}, environ)
    # A short password is hidden where it is the whole value, not inside longer words.
    assert redacted == {"steps": "1", "flag": "true", "path": "/usr/bin", "user": REDACTED, "note": "administrator"}


def test_credentials_from_the_environment_stay_out_of_the_private_rays_files(tmp_path, monkeypatch):
    """Ray Tune copies AWS_* variables into every trial's runtime env, which the runtime env agent logs: for the
    private Ray ant_ray stops that (its workers inherit the environment anyway), and its session folder (logs,
    runtime env files) sits in a folder only the user can enter."""
    import ray
    from ray import tune

    from conftest import shared_ray

    shared_ray()
    credentials = {"AWS_ACCESS_KEY_ID": "AKIAFAKEKEYID7F3C9A2B", "AWS_SECRET_ACCESS_KEY": FAKE_AWS_SECRET,
                   "AWS_SESSION_TOKEN": FAKE_TOKEN}
    for name, value in credentials.items():
        monkeypatch.setenv(name, value)

    def trial(config):  # defined here, so that the trial's process imports nothing of this module
        tune.report({"score": config["x"]})

    results = tune.Tuner(trial, param_space={"x": 1},
                         run_config=tune.RunConfig(storage_path=str(tmp_path), name="secrets", verbose=0)).fit()
    assert not results.errors and results[0].metrics["score"] == 1

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    assert (session.parent.parent.stat().st_mode & 0o077) == 0, "the private Ray's files are open to other users"
    secrets = [value.encode() for value in credentials.values()]
    leaked = [str(path.relative_to(session)) for path in session.rglob("*") if path.is_file() and not path.is_symlink()
              and any(secret in path.read_bytes() for secret in secrets)]
    assert not leaked, f"credentials in the private Ray's files: {leaked}"


# --------------------------------------------------------------------------------------------------- ant-ray ui
def test_the_ui_warns_before_listening_beyond_this_machine():
    from ant_ray.cli import build_parser, ui_host_warning

    assert build_parser().parse_args(["ui"]).host is None  # the command binds 127.0.0.1 then
    assert ui_host_warning("127.0.0.1", 5000) is None and ui_host_warning("localhost", 5000) is None
    warning = ui_host_warning("0.0.0.0", 5000)
    assert warning.startswith("warning: ") and "0.0.0.0:5000" in warning and "\n" not in warning


def test_stopping_the_ui_stops_its_whole_process_group():
    """`ant-ray ui` runs the MLflow server (uvicorn workers, a huey consumer) as a process group of its own and
    stops the group as it ends; here a shell that leaves a child behind stands in for the server, with a child that
    ignores SIGTERM, as a stuck worker would."""
    import subprocess

    from ant_ray.cli import running_in_group, stop_process_group

    leader = subprocess.Popen(["sh", "-c", "(trap '' TERM; exec sleep 60) & echo $!; sleep 60 & wait"],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    child = int(leader.stdout.readline())
    assert running_in_group(leader.pid)
    stop_process_group(leader, grace_s=0.5)
    assert leader.poll() is not None and not running_in_group(leader.pid)
    child_stat = Path(f"/proc/{child}/stat")
    assert not child_stat.exists() or child_stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"  # gone, or exited
    leader.stdout.close()
