"""Nothing lost, nothing poisoned: divergence and lost processes under real Ray, on a simulated cluster
(`ray.cluster_utils.Cluster`: a head and three 1-CPU worker nodes on this machine, nodes removed on the main thread).

- A diverged `ant-ray run` stops with one line naming the fix, publishes no model, and fails its MLflow run with the
  reason. A diverged search trial is marked diverged, told to the searcher as +inf, and the search goes on.
- A search whose trial driver loses its node retries the trial (Tune's FailureConfig); the retry continues from the
  trial's Ray Train checkpoint and its MLflow runs; the trial that had ended is untouched.
- A Ray Train run whose node is removed, or whose worker process is killed, restarts from its last checkpoint
  (Train's FailureConfig) and ends with exactly the weights of an uninterrupted run.
"""

import copy
import math
import os
import pickle
import shutil
import signal
import socket
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient
from ray import cloudpickle
from ray.cluster_utils import Cluster
from ray.exceptions import RayTaskError
from ray.train.v2.api.exceptions import WorkerGroupError
from ray.util.state import list_actors

from ant_ray.cli import _print_table, main
from ant_ray.config import ConfigError, load_config
from ant_ray.data import DatasetError, DatasetNotFoundError
from ant_ray.deme.finetune import train_diffusion
from ant_ray.diffusion import build_model, load_model, save_model
from ant_ray.files import CorruptFileError, DiskFull
from ant_ray.fid import InceptionUnavailable
from ant_ray.search.chain import SearchFolderInUse, run_search
from ant_ray.search.outcome import SearchStageFailed
from ant_ray.search.searchers import journal_storage
from ant_ray.stages.ray_runtime import start_ray
from ant_ray.stages.ray_train import TrainingRunFailed, failure_cause, fit
from ant_ray.tracking import TrackingUnreachable
from ant_ray.training import TrainingDiverged

SEARCH_SPACES = Path(__file__).resolve().parent.parent / "search_spaces"
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train writes it once a reported checkpoint is registered


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_command_line_input_is_one_line_with_status_2(tmp_path, capsys):
    assert main(["search", "--resume", str(tmp_path)]) == 2
    assert main(["analyze", "ntg", str(SEARCH_SPACES / "ant_digits.yaml"), "--intervals", "0,200;oops"]) == 2

    def offline_inception() -> str:
        raise InceptionUnavailable("Inception weights are not available at /tmp/inception-2015-12-05.pt (...). "
                                   "Pre-stage the file on every node")

    assert _print_table(offline_inception) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --resume {tmp_path} is not a search folder (it has no config.yaml); pass the folder the search "
        "printed, <output_dir>/searches/<name>-<date>-<id>",
        "error: --intervals expects half-open timestep intervals 'a,b;c,d' (e.g. '0,200;200,1000'), got "
        "'0,200;oops'",
        "error: Inception weights are not available at /tmp/inception-2015-12-05.pt (...). Pre-stage the file on "
        "every node"]


# ------------------------------------------------------------------------------------------------ exceptions


def _every_exception() -> list:
    """One instance of each of ant_ray's exception classes, built as the code raises it."""
    return [ConfigError("ant.k: Input should be greater than or equal to 1"),
            TrainingDiverged("ant diverged: the loss is nan at step 7; lower ant.lr"),
            TrainingRunFailed("ant-1", "ant diverged: the loss is nan at step 7", diverged=True),
            TrainingRunFailed("ant-2", "no space left on device writing /x", False, fault="disk_full"),
            SearchStageFailed("no trial of the ant stage finished"),
            CorruptFileError("/runs/model.safetensors", "is truncated (5 bytes)", "delete it and re-run the ant stage"),
            DiskFull("no space left on device writing /runs/ckpt: 0.0 MB free on /runs, it needs at least 1.0 MB"),
            DatasetError("dataset 'cifar10' at '/x': not a CIFAR-10 archive"),
            DatasetNotFoundError("dataset 'image-folder' at '/nope': path does not exist"),
            TrackingUnreachable("cannot reach the MLflow tracking server http://127.0.0.1:9 within 5 s"),
            InceptionUnavailable("Inception weights are not available at /tmp/inception-2015-12-05.pt"),
            SearchFolderInUse("/runs/searches/s is in use by another search driver (host h, PID 1, since ...)")]


@pytest.mark.parametrize("error", _every_exception(), ids=lambda e: type(e).__name__)
def test_every_exception_survives_copy_and_pickle(error):
    """Ray copies and pickles an exception raised in a worker or trial; one that cannot be rebuilt becomes a
    TypeError that hides its cause."""
    for copied in (copy.copy(error), pickle.loads(pickle.dumps(error)), cloudpickle.loads(cloudpickle.dumps(error))):
        assert type(copied) is type(error) and str(copied) == str(error)
        assert vars(copied) == vars(error)
    # as Ray raises it on the driver: an instance of both RayTaskError and the worker's class
    raised = RayTaskError("train_fn", "Traceback ...", error).as_instanceof_cause()
    assert isinstance(raised, type(error))
    assert str(cloudpickle.loads(cloudpickle.dumps(raised)).cause) == str(error)


def test_a_failed_run_reports_its_cause_in_one_line():
    """The worker's own error, not Ray's wrapper or traceback; a full disk or a damaged file is marked as a fault
    outside the trial's configuration (the search stops, and a --resume retries the trial)."""
    full_disk = ("safetensors_rust.SafetensorError: Error while serializing: IoError(Os { code: 28, kind: "
                 "StorageFull, message: \"No space left on device\" })")
    in_worker = RayTaskError("train_fn", f"Traceback (most recent call last):\n  File \"x.py\", line 1\n{full_disk}",
                             RuntimeError(full_disk)).as_instanceof_cause()
    reason, diverged, fault = failure_cause(in_worker)
    assert (fault, diverged) == ("disk_full", False) and "\n" not in reason and "No space left on device" in reason
    damaged = CorruptFileError("/runs/ema/diffusion_pytorch_model.safetensors", "is truncated (9 bytes)",
                               "delete it and re-run the ant stage")
    assert failure_cause(RayTaskError("f", "tb", damaged).as_instanceof_cause()) == (str(damaged), False,
                                                                                     "damaged_file")
    nested = TrainingRunFailed("deme-1", "ant diverged: the loss is nan at step 3", diverged=True)
    assert failure_cause(RayTaskError("f", "tb", nested).as_instanceof_cause()) == (nested.reason, True, "")
    assert failure_cause(ValueError("Traceback:\n  File y\nKeyError: 'w3'"))[0] == "KeyError: 'w3'"
    # Ray Train's error for a run whose rank 0 hit a full disk while saving its checkpoint
    full = DiskFull("no space left on device writing /runs/ckpt: it needs more than the 0.0 MB free on /runs")
    run_error = WorkerGroupError("Training failed due to worker errors", {0: full, 1: RuntimeError("peer lost")})
    assert failure_cause(run_error) == (str(full), False, "disk_full")


# ------------------------------------------------------------------------------------------------ the cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A head without CPUs (the driver, Train controllers) and three 1-CPU worker nodes (trials, Train workers)."""
    ray.shutdown()  # the session's shared Ray (tests/conftest.py); the next module starts it again
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE")}
    # Cluster writes its address where a plain ray.init() of anyone on this machine would join it: keep it private
    # (and short: Ray's socket paths must fit in 107 characters).
    temp_dir = tempfile.mkdtemp(prefix="faults-ray-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = temp_dir
    port = _free_port()  # Train's placement-group cleaner must ask this cluster's state API, not another Ray's
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    os.environ["RAY_AUTH_MODE"] = "disabled"
    simulated = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port})
    try:
        for _ in range(3):
            simulated.add_node(num_cpus=1)
        yield simulated
    finally:
        ray.shutdown()
        simulated.shutdown()
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _connect(cluster: Cluster) -> None:
    """Join the cluster as ant_ray does with --address (`ant-ray` commands disconnect when they end)."""
    start_ray(cluster.address)


def _wait_for(predicate, what: str, running: Future, timeout: float = 300):
    """Poll `predicate` until it returns something truthy, while `running` (the run in a background thread) runs."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = predicate()
        if found:
            return found
        if running.done():
            running.result()  # raises the run's own error, if it had one
            raise AssertionError(f"the run ended before {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _node(cluster: Cluster, node_id: str):
    (node,) = [n for n in cluster.worker_nodes if n.node_id == node_id]
    return node


def _alive(class_name: str) -> list:
    return list_actors(filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")], detail=True)


def _runs(tracking_uri: str, experiment: str) -> dict[str, list]:
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    by_stage: dict[str, list] = {}
    for run in client.search_runs([exp.experiment_id], max_results=500):
        by_stage.setdefault(run.data.tags.get("ant_ray.stage"), []).append(run)
    return by_stage


# ------------------------------------------------------------------------------------------------ divergence


@pytest.mark.slow  # about 35 s; in the default suite the search's diverged trial (below) covers the mechanism
def test_a_diverged_run_fails_in_one_line_and_publishes_nothing(cluster, tmp_path, capsys):
    """The reported reproduction (`ant-ray run ... --set pretrain.lr=1e6`) on a tiny budget."""
    out = tmp_path / "out"
    code = main(["run", str(SEARCH_SPACES / "pipeline_digits.yaml"), "--address", cluster.address,
                 "--output-dir", str(out)] + [arg for o in [
                     "pretrain.lr=1e6", "pretrain.steps=20", "pretrain.batch_size=32",
                     "pretrain.resources={cpu: 1, num_workers: 1}", "finetune.steps=10", "fid.num_samples=100",
                     "fid.batch_size=50", "sampler.steps=4"] for arg in ("--set", o)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code != 0
    assert len(errors) == 1 and "pretrain diverged" in errors[0] and "lower pretrain.lr" in errors[0], errors
    assert not any((out / "cache" / "pretrained").iterdir())  # nothing published to the cache
    assert not list(out.rglob("diffusion_pytorch_model.safetensors"))  # no model folder, not even a hidden one

    (pretrain,) = _runs(f"sqlite:///{out / 'mlflow.db'}", "ant_ray-pipeline")["pretrain"]
    assert pretrain.info.status == "FAILED"
    assert "pretrain diverged" in pretrain.data.tags["ant_ray.failure"]


# ------------------------------------------------------------------------------------------------ a search


SEARCH = [
    "fid.batch_size=50", "sampler.steps=4", "search.deme=null", "search.merge=null",
    "ant.steps=60", "ant.batch_size=32", "ant.log_every=10", "ant.checkpoint_every=10", "ant.k=2",
    "ant.resources={cpu: 0.5, num_workers: 1}", "search.ant.num_samples=50", "search.ant.eval_every=null",
    "search.ant.scheduler={name: fifo}", "search.ant.max_concurrent=1",
    # TPE, one trial at a time: the config's own lr (1e6) is the first point and diverges at once; the seeded
    # sampler then picks 0.002 (asserted below), the trial whose driver's node is removed.
    "ant.lr=1.0e+6", "search.ant.space={ant.lr: {type: categorical, choices: [1.0e+6, 0.002]}}",
    "search.ant.searcher={name: tpe, seed: 0}", "search.ant.num_trials=2",
    "search.final.num_samples=50", "search.final.seeds=[0]",
]


@pytest.fixture(scope="module")
def search(cluster, tmp_path_factory):
    """The search, run in a background thread; once the second trial has registered a Ray Train checkpoint, the
    node of that trial's driver (its Tune actor) is removed."""
    _connect(cluster)
    out = tmp_path_factory.mktemp("search")
    cfg = load_config(SEARCH_SPACES / "quickstart.yaml", SEARCH + [f"output_dir={out}"])
    pool = ThreadPoolExecutor(1)
    running = pool.submit(run_search, cfg)
    try:
        (snapshot,) = _wait_for(lambda: list(out.glob(f"searches/*/train/ant-*/{SNAPSHOT}")),
                                "the second trial's first checkpoint", running)
        (ended,) = out.glob("searches/*/ant/trials/*/result.json")  # the diverged trial's
        ended_before = (ended.read_text(), ended.stat().st_mtime_ns)
        lost_trial = snapshot.parent.name.removeprefix("ant-")
        lost_folder = ended.parents[1] / lost_trial
        (driver,) = _alive("ImplicitFunc")  # one trial at a time: its Tune actor
        lost_had_ended = (lost_folder / "result.json").is_file()
        cluster.remove_node(_node(cluster, driver.node_id))
        result = running.result(timeout=600)
    finally:
        pool.shutdown(wait=False)
    return SimpleNamespace(cfg=cfg, result=result, ended=ended, ended_before=ended_before, lost_trial=lost_trial,
                           lost_had_ended=lost_had_ended)


def test_a_diverged_trial_is_marked_told_to_the_searcher_and_loses(search):
    result = search.result
    ant = result.trials[result.trials["stage"] == "ant"].set_index("ant.lr")
    assert sorted(ant.index) == [0.002, 1e6], "the seeded sampler no longer picks 0.002 second: change its seed"
    assert ant.loc[1e6, "fate"] == "diverged" and ant.loc[0.002, "fate"] == "finished"
    assert result.best["ant"] == {"ant.lr": 0.002}

    trials = _runs(result.tracking_uri, search.cfg.tracking.experiment)["ant_trial"]
    (diverged,) = [r for r in trials if float(r.data.params["ant.lr"]) == 1e6]
    assert diverged.info.status == "FAILED" and diverged.data.tags["ant_ray.fate"] == "diverged"
    assert "ant diverged" in diverged.data.tags["ant_ray.failure"]
    assert "lower ant.lr" in diverged.data.tags["ant_ray.failure"]

    study = optuna.load_study(storage=journal_storage(result.search_dir / "optuna.journal"),
                              study_name=f"{result.search_dir.name}-ant")
    told = {t.params["ant.lr"]: t for t in study.trials}
    assert told[1e6].state == optuna.trial.TrialState.COMPLETE and told[1e6].value == math.inf
    assert told[0.002].state == optuna.trial.TrialState.COMPLETE and math.isfinite(told[0.002].value)


def test_a_search_survives_losing_a_trial_driver(search):
    result = search.result
    assert not search.lost_had_ended  # the node went while the trial was training
    assert (search.ended.read_text(), search.ended.stat().st_mtime_ns) == search.ended_before  # not run again
    ant = result.trials[result.trials["stage"] == "ant"].set_index("trial_id")
    assert ant.loc[search.lost_trial, "fate"] == "finished" and ant.loc[search.lost_trial, "step"] == 60

    runs = _runs(result.tracking_uri, search.cfg.tracking.experiment)
    assert len(runs["ant_trial"]) == 2 and len(runs["ant_train"]) == 2  # the retry continued the same runs
    statuses = sorted(r.info.status for r in runs["ant_trial"])
    assert statuses == ["FAILED", "FINISHED"]  # the diverged trial's, kept; the retried trial's
    (train,) = [r for r in runs["ant_train"] if r.info.run_name == f"ant-train-{search.lost_trial}"]
    assert train.info.status == "FINISHED"
    steps = [m.step for m in MlflowClient(result.tracking_uri).get_metric_history(train.info.run_id, "loss")]
    # The retry resumed from the checkpoint: steps up to it were trained (and logged) once; a restart from scratch
    # would log step 10 again.
    assert steps.count(10) == 1 and sorted(set(steps)) == list(range(10, 61, 10)), steps


# ------------------------------------------------------------------------------------------------ a Ray Train run


FINETUNE = ["data.resolution=8", "model.base=tiny", "finetune.steps=60", "finetune.batch_size=32",
            "finetune.checkpoint_every=10", "finetune.log_every=10", "finetune.p=0.5",
            "finetune.consistency_weight=1.0"]


def _specialist(folder: Path, init: Path) -> dict:
    return {"range": [0, 500], "init_model": str(init), "teacher_model": str(folder / "base"),
            "output_model": str(folder / "out" / init.name), "tracking": None, "seed": 10}


@pytest.fixture(scope="module")
def specialist(tmp_path_factory):
    """A DeMe specialist's training and the weights of an uninterrupted run: Ray Train's local mode in this process,
    on one thread like a 1-CPU worker, gives bit-identical weights."""
    folder = tmp_path_factory.mktemp("specialist")
    save_model(build_model("tiny", resolution=8, channels=1, seed=0), folder / "base")
    cfg = load_config(None, FINETUNE + [f"output_dir={folder}", "finetune.resources={cpu: 1, num_workers: 0}"])
    init = save_model(load_model(folder / "base"), folder / "init-reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit(train_diffusion, {"pipeline": cfg.worker_dump(), "section": "finetune", "name": "reference",
                              "models": [_specialist(folder, init)], "evaluation": None},
            name="reference", storage=folder / "ray", resources=cfg.finetune.resources)
    finally:
        torch.set_num_threads(threads)
    return SimpleNamespace(folder=folder, reference=load_model(folder / "out" / init.name).state_dict())


def _fit_through(faults, name: str, cluster: Cluster, specialist) -> SimpleNamespace:
    """Train the specialist on the cluster (one 1-CPU worker, one restart allowed per fault) in a background thread.
    Once the run has registered its first checkpoint, its initial weights are replaced by others (so only a resume
    from a checkpoint can still end at the reference weights); then each `fault(worker)` in turn strikes the worker
    training at that moment, here on the main thread, each after the run registered a checkpoint since the last."""
    _connect(cluster)
    folder = specialist.folder
    cfg = load_config(None, FINETUNE + [f"output_dir={folder}", "finetune.resources={cpu: 1, num_workers: 1}"])
    init = save_model(load_model(folder / "base"), folder / f"init-{name}")
    before = {a.actor_id for a in list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True)}
    snapshot = folder / "ray" / name / SNAPSHOT
    pool = ThreadPoolExecutor(1)
    running = pool.submit(fit, train_diffusion, {
        "pipeline": cfg.worker_dump(), "section": "finetune", "name": name,
        "models": [_specialist(folder, init)], "evaluation": None},
        name=name, storage=folder / "ray", resources=cfg.finetune.resources, max_failures=len(faults))
    struck: list = []
    try:
        _wait_for(snapshot.is_file, "the first checkpoint", running)
        save_model(build_model("tiny", resolution=8, channels=1, seed=1), init)
        for fault in faults:
            if struck:  # the restarted worker has registered a checkpoint of its own
                _wait_for(lambda: snapshot.stat().st_mtime_ns > registered, "a checkpoint after the restart", running)
            (worker,) = _wait_for(lambda: [a for a in _alive("RayTrainWorker")
                                           if a.actor_id not in before | {w.actor_id for w in struck}],
                                  "a training worker", running)
            registered = snapshot.stat().st_mtime_ns
            fault(worker)
            struck.append(worker)
        # A bound on the wait: after a lost node, Train retries starting its workers without end by default
        # (FailureConfig.controller_failure_limit=-1).
        result = running.result(timeout=300)
    finally:
        pool.shutdown(wait=False)
    workers = [a for a in list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True)
               if a.actor_id not in before]
    return SimpleNamespace(result=result, struck=struck, workers=workers,
                           weights=load_model(folder / "out" / init.name).state_dict())


def _assert_equal_weights(weights: dict, reference: dict) -> None:
    assert weights.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(weights[key], reference[key], rtol=0, atol=0, msg=key)


def test_a_train_run_survives_a_killed_worker_then_losing_its_node(cluster, specialist):
    """Two faults in one run (each restart costs a run's start-up, so one run carries both): the worker process is
    killed, and once its replacement has checkpointed, the replacement's node is removed."""
    run = _fit_through([lambda worker: os.kill(worker.pid, signal.SIGKILL),
                        lambda worker: cluster.remove_node(_node(cluster, worker.node_id))],
                       "two-faults", cluster, specialist)
    assert run.result.metrics["step"] == 60
    assert len(run.workers) == 3, "a fault came after the run had ended: no restart"
    (last,) = [a for a in run.workers if a.actor_id not in {w.actor_id for w in run.struck}]
    assert last.node_id != run.struck[1].node_id  # restarted on another node
    _assert_equal_weights(run.weights, specialist.reference)
