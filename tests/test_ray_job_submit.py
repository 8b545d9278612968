"""`ray job submit`, as the README's "On a cluster" section documents it, against a head of our own started with
`ray start --head`: the job's runtime env (working_dir, env_vars) must reach the search, which joins the cluster
instead of starting a private Ray, and its nested MLflow runs must land in the store the job's env names.

The head is stopped by process id, never with `ray stop`: that command kills every Ray process on the machine,
including other people's."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parent.parent
# The interpreter running the tests; its bin/ holds the `ray` CLI and goes first on the head's PATH, so that the
# job's plain `python` entrypoint (run by a shell on the head) is this environment's python, not the system's.
VENV_BIN = Path(sys.executable).parent
RAY_CLI = VENV_BIN / "ray"
HEAD_CPUS = 4  # logical CPUs, like TINY's ray.num_cpus for the private instance: fractional workers share 2 cores
JOB_TIMEOUT_S = 600  # 3-4 minutes measured on this 2-core machine while other sessions loaded it (load 9-17)
# A tiny search: one ANT trial of the quickstart's config, scored and re-scored on 50 samples.
OVERRIDES = ["search.deme=null", "search.merge=null", "search.ant.space={}", "ant.steps=20", "ant.batch_size=32",
             "ant.log_every=10", "ant.checkpoint_every=10", "fid.batch_size=50", "sampler.steps=4",
             "search.ant.num_samples=50", "search.ant.scheduler.name=fifo", "search.ant.eval_every=null",
             "search.final.num_samples=50", "search.final.seeds=[0]"]
# Variables of the test process that would point the head, its jobs or the job CLI elsewhere (an earlier test's
# private Ray pins RAY_API_SERVER_ADDRESS in os.environ; the job CLI and JobSubmissionClient prefer it to --address).
FOREIGN_VARS = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_env(api_server: str) -> dict[str, str]:
    """Environment of the head (which its workers and the job's entrypoint inherit) and of the job CLI."""
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN_VARS}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "disabled"  # Ray >= 2.59 would enable token auth and write ~/.ray/auth_token
    # Train V2's placement-group cleaner, a worker, asks the state API of "the" Ray on its machine; with other Ray
    # instances on this machine (other tests, other people) it gives up ("Found multiple active Ray instances").
    # A cluster's node runs one Ray; here, name ours.
    env["RAY_API_SERVER_ADDRESS"] = api_server
    return env


def _process_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state, command line) of every process, from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # exited meanwhile
            continue
        state, ppid = stat[stat.rindex(")") + 2:].split()[:2]  # the command name in (...) may hold spaces
        table[int(entry.name)] = (int(ppid), state, cmdline)
    return table


def _head_processes(head: subprocess.Popen, temp_dir: str) -> set[int]:
    """Every process of this head: `ray start --block` and its descendants (GCS, raylet, dashboard, workers, the
    job's entrypoint, which Ray starts in a session of its own), plus any that outlived their parent but name this
    head's own temporary directory on their command line."""
    table = _process_table()
    ours = {head.pid} | {pid for pid, (_, _, cmdline) in table.items() if temp_dir in cmdline}
    grew = True
    while grew:
        children = {pid for pid, (ppid, _, _) in table.items() if ppid in ours} - ours
        ours |= children
        grew = bool(children)
    return ours


def _alive(pids: set[int]) -> set[int]:
    table = _process_table()
    return {pid for pid in pids if pid in table and table[pid][1] != "Z"}


def _signal(pids: set[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _stop_head(head: subprocess.Popen, temp_dir: str, grace_s: float = 5) -> None:
    """SIGTERM to every process of this head (found before any of them exits), SIGKILL to those left after
    `grace_s`."""
    pids = _head_processes(head, temp_dir)
    _signal(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _alive(pids - {head.pid}) or head.poll() is None:
        if time.monotonic() > deadline:
            _signal(_alive(pids), signal.SIGKILL)
            break
        time.sleep(0.5)
    head.wait(timeout=10)


@pytest.fixture
def ray_head():
    """A Ray head on free ports with a temporary directory of its own; yields its dashboard (job API) address."""
    if not RAY_CLI.exists():
        pytest.skip(f"no ray CLI next to {sys.executable}")
    if not Path("/proc/self/stat").exists():
        pytest.skip("stopping the head finds its processes in /proc (Linux only)")
    # Short and outside pytest's deep tmp_path: Ray's unix socket paths under it must fit in 107 characters.
    temp_dir = tempfile.mkdtemp(prefix="ray-head-", dir="/tmp")
    dashboard_port = _free_port()
    address = f"http://127.0.0.1:{dashboard_port}"
    log_path = Path(temp_dir) / "ray-start.log"
    with open(log_path, "w") as log:
        head = subprocess.Popen(
            [str(RAY_CLI), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
             "--port", str(_free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
             "--ray-client-server-port", str(_free_port()), "--dashboard-agent-listen-port", str(_free_port()),
             "--num-cpus", str(HEAD_CPUS), "--temp-dir", temp_dir, "--disable-usage-stats"],
            env=_ray_env(address), stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for_job_api(address, head, log_path)
        yield address
    finally:
        _stop_head(head, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _job_client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def _wait_for_job_api(address: str, head: subprocess.Popen, log_path: Path, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if head.poll() is not None:
            pytest.fail(f"`ray start --head` exited with {head.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            _job_client(address)
            return
        except ConnectionError:
            if time.monotonic() > deadline:
                pytest.fail(f"the head's job API did not answer within {timeout_s} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(1)


def _wait_for_job(address: str, submission_id: str) -> tuple[str, str]:
    from ray.job_submission import JobStatus

    client = _job_client(address)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (status := client.get_job_status(submission_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                                     JobStatus.STOPPED):
        if time.monotonic() > deadline:
            client.stop_job(submission_id)
            break
        time.sleep(2)
    return str(status), client.get_job_logs(submission_id)


@pytest.fixture(autouse=True)
def _talk_to_our_head(monkeypatch):
    # JobSubmissionClient, like the CLI, prefers RAY_API_SERVER_ADDRESS / RAY_ADDRESS to the address it is given.
    for name in FOREIGN_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")


# The job's entrypoint after `python`: one parameter, so that other entry points can run through the same test.
# Opt-in (about 100 s: a head of its own, the job's driver, a Train run): CI's 20 minutes on 2 cores do not fit it.
@pytest.mark.slow
@pytest.mark.parametrize("entrypoint", [["jobs/search.py", "search_spaces/quickstart.yaml"]],
                         ids=lambda args: args[0])
def test_ray_job_submit_runs_a_search_on_a_cluster(ray_head, tmp_path, entrypoint):
    tracking_uri = f"sqlite:///{tmp_path / 'x.db'}"
    out = tmp_path / "out"
    submission_id = f"ant-ray-test-{uuid.uuid4().hex[:8]}"
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": tracking_uri}}
    submit = subprocess.run(
        [str(RAY_CLI), "job", "submit", "--address", ray_head, "--submission-id", submission_id, "--no-wait",
         "--working-dir", str(REPO), "--entrypoint-num-cpus", "0.5", "--runtime-env-json", json.dumps(runtime_env),
         "--", "python", *entrypoint, "--set", f"output_dir={out}", *[arg for o in OVERRIDES for arg in ("--set", o)]],
        env=_ray_env(ray_head), capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, f"ray job submit failed:\n{submit.stdout}\n{submit.stderr}"

    status, logs = _wait_for_job(ray_head, submission_id)
    assert status == "SUCCEEDED", f"job {submission_id} ended {status}; its logs:\n{logs[-8000:]}"
    assert "joined Ray at" in logs  # the cluster's Ray, not a private one started inside the job

    client = MlflowClient(tracking_uri)  # the store named by the job's runtime env, not output_dir's default
    experiment = client.get_experiment_by_name("ant_ray-quickstart")
    assert experiment is not None, f"no experiment in {tracking_uri}; job logs:\n{logs[-4000:]}"
    runs = {r.data.tags.get("ant_ray.stage"): r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"search", "ant_search", "ant_trial", "ant_train"}
    for child, parent in (("ant_search", "search"), ("ant_trial", "ant_search"), ("ant_train", "ant_trial")):
        assert runs[child].data.tags["mlflow.parentRunId"] == runs[parent].info.run_id
    assert "loss" in runs["ant_train"].data.metrics  # logged by the Ray Train worker itself
    assert "fid50_domain" in runs["ant_trial"].data.metrics
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    assert not (out / "mlflow.db").exists()
    search_dir = Path(runs["search"].data.tags["ant_ray.search_dir"])
    assert search_dir.is_relative_to(out) and (search_dir / "summary.txt").is_file()  # outlives the working dir
