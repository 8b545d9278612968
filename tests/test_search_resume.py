"""Kill the driver of a running search with SIGKILL, then resume it: Tune's state, torn by the kill, is restored
from its copy, the trial that had finished is not rerun, the same MLflow runs continue (one parent per search
folder), and the private Ray the killed driver started leaves no process behind. (Skipping the stages a search
had finished is tested in test_search_e2e.py.)"""

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ant_ray.cli import main
from ant_ray.config import load_config
from ant_ray.diffusion import build_model, load_model, model_is_complete, save_model
from ant_ray.files import CorruptFileError
from ant_ray.search import chain
from ant_ray.search.chain import hold_search_dir, prepare_search_dir, release_search_dir, run_search
from ant_ray.search.outcome import SearchStageFailed, StageOutcome
from ant_ray.stages.ray_watchdog import alive, descendants, start_time

SEARCH = [
    "ray.num_cpus=4", "fid.batch_size=50", "sampler.steps=4", "search.merge=null", "search.deme=null",
    "ant.steps=20", "ant.batch_size=32", "ant.log_every=10", "ant.checkpoint_every=10", "ant.k=2",
    # both trials at once: the driver is killed when one has finished, the other is interrupted or done
    "search.ant.space={ant.lr: {type: categorical, choices: [0.003, 0.002]}}", "search.ant.max_concurrent=2",
    "search.ant.eval_every=10", "search.ant.scheduler.name=fifo", "search.ant.num_samples=50",
    "search.final.num_samples=50", "search.final.seeds=[0]",
]


def _wait_for(predicate, what, proc, timeout=420):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = predicate()
        if found:
            return found
        assert proc.poll() is None, f"the search exited ({proc.returncode}) before {what}"
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_resume_after_killing_the_driver(tmp_path, capsys):
    out = tmp_path / "out"
    log = open(tmp_path / "driver.log", "w")
    command = [sys.executable, "-m", "ant_ray.cli", "search", "search_spaces/quickstart.yaml", "--output-dir",
               str(out)] + [arg for o in SEARCH for arg in ("--set", o)]
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=Path(__file__).resolve().parent.parent)
    try:
        finished = _wait_for(lambda: list(out.glob("searches/*/ant/trials/*/result.json")),
                             "the first ant trial finished", proc)[0]
        mtime = finished.stat().st_mtime_ns
        ray_tree = {pid: start_time(pid) for pid in descendants({proc.pid}) - {proc.pid}}
        assert ray_tree, "the driver started no Ray processes"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()

    # Nothing of the killed driver's Ray is left once its watchdog has run.
    deadline = time.time() + 30
    while time.time() < deadline and any(alive(p) and start_time(p) == t for p, t in ray_tree.items()):
        time.sleep(0.5)
    left = [p for p, t in ray_tree.items() if alive(p) and start_time(p) == t]
    assert not left, f"processes of the killed driver's Ray still run: {left}"

    # The kill may land while Tune rewrites its state (CI hit that once): tear it here every time.
    search_dir = finished.parents[3]
    state = max((search_dir / "ant" / "tune").glob("experiment_state-*.json"))
    state.write_bytes(b"")
    cfg = load_config(search_dir / "config.yaml")
    result = run_search(cfg, resume=search_dir)
    assert "ant stage: the interruption tore Tune's state (experiment_state-" in capsys.readouterr().out
    assert finished.stat().st_mtime_ns == mtime  # the finished trial was not trained or scored again
    assert list(result.stages) == ["ant"] and result.search_dir == search_dir
    assert sorted(result.trials[result.trials["stage"] == "ant"]["fate"]) == ["finished", "finished"]

    client = MlflowClient(cfg.tracking_uri())
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id], max_results=200)
    stages = [r.data.tags.get("ant_ray.stage") for r in runs]
    assert stages.count("search") == 1 and stages.count("ant_search") == 1  # continued, not opened again
    assert stages.count("ant_trial") == 2 and stages.count("ant_train") == 2
    assert all(r.info.status != "RUNNING" for r in runs)
    parent = next(r for r in runs if r.data.tags.get("ant_ray.stage") == "search")
    assert parent.info.status == "FINISHED" and parent.data.tags.get("ant_ray.resumed") == "True"


def _cut(path: Path) -> bytes:
    whole = path.read_bytes()
    path.write_bytes(whole[:len(whole) // 2])
    return whole


def _finished_search(tmp_path: Path):
    """A finished ant-only search folder as run_search leaves it (its records, the ant winner, the winner model),
    built directly: resuming a finished search reads only these, without Ray."""
    cfg = load_config("search_spaces/quickstart.yaml", ["search.deme=null", "search.merge=null",
                                                        f"output_dir={tmp_path / 'out'}"])
    search_dir, state = prepare_search_dir(cfg, None)
    ant_model = save_model(build_model(cfg.model.base, resolution=cfg.data.resolution, channels=cfg.data.channels),
                           search_dir / "ant" / "trials" / "t1" / "ema")
    metric = "fid50_domain"
    StageOutcome(stage="ant", metric=metric, best_params={"ant.lr": 0.002}, best_score=40.0,
                 winner={"model": str(ant_model), "intervals": [[0, 500], [500, 1000]], "trial_id": "t1"},
                 run_id="stage-run", finished=1).save(search_dir / "ant" / "outcome.json")
    save_model(load_model(ant_model), search_dir / "winner" / "model")
    state.update(done=["ant"], stage_runs={"ant": "stage-run"}, parent_run_id="parent-run",
                 finished={"final": {"metric": metric, "scores": [41.0]}, "seconds": 60.0, "runs_page": "page"})
    (search_dir / "state.json").write_text(json.dumps(state, indent=1))
    return cfg, search_dir, ant_model / "diffusion_pytorch_model.safetensors"


def _cut(path: Path) -> bytes:
    whole = path.read_bytes()
    path.write_bytes(whole[:len(whole) // 2])
    return whole


def test_a_finished_search_checks_its_records_and_winner(tmp_path, capsys):
    """A finished search resumes from its folder alone: a cut winner model is rebuilt from the stages' results,
    never shown as valid; a cut record or stage winner names its file and the fix, in one line."""
    cfg, search_dir, ant_weights = _finished_search(tmp_path)
    result = run_search(cfg, resume=search_dir)
    assert result.final.scores == [41.0] and model_is_complete(result.winner_model)
    weights = result.winner_model / "diffusion_pytorch_model.safetensors"
    whole = _cut(weights)
    capsys.readouterr()
    again = run_search(cfg, resume=search_dir)
    assert "the winner model is damaged or missing" in capsys.readouterr().out
    assert weights.read_bytes() == whole and model_is_complete(again.winner_model)  # the same weights, rebuilt
    assert again.final.scores == [41.0]

    ant_whole, _ = _cut(ant_weights), _cut(weights)
    with pytest.raises(CorruptFileError) as error:
        run_search(cfg, resume=search_dir)
    assert str(error.value).startswith(f"{ant_weights} is truncated")
    assert "the ant stage's winner (trial t1) cannot be rebuilt" in str(error.value) and "\n" not in str(error.value)
    ant_weights.write_bytes(ant_whole)

    for record, fix in ((search_dir / "ant" / "outcome.json", "delete it and resume the search"),
                        (search_dir / "state.json", "start a new search")):
        saved = _cut(record)
        with pytest.raises(CorruptFileError) as error:
            run_search(cfg, resume=search_dir)
        message = str(error.value)
        assert message.startswith(f"{record} is not valid JSON (") and fix in message and "\n" not in message
        record.write_bytes(saved)
    assert model_is_complete(run_search(cfg, resume=search_dir).winner_model)


def test_a_search_folder_has_one_driver(tmp_path, capsys):
    """A second driver of a folder (a resume from another terminal, a resubmitted job) stops in one line naming
    the running driver, exit status 2, before it reads or writes anything of the folder."""
    cfg = load_config("search_spaces/quickstart.yaml", ["output_dir=" + str(tmp_path / "out")])
    search_dir, _ = prepare_search_dir(cfg, None)
    running = hold_search_dir(search_dir)  # the first driver (flock: a second open file of this process conflicts)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in search_dir.iterdir()}
    try:
        assert main(["search", "--resume", str(search_dir)]) == 2
        # Ray's forwarded worker logs (a shared Ray of earlier tests) arrive on their own thread, coloured "(...)"
        ours = [line for line in capsys.readouterr().err.splitlines() if not line.startswith(("(", "\x1b["))]
        (line,) = ours
        assert line.startswith(f"error: {search_dir} is in use by another search driver (host "
                               f"{socket.gethostname()}, PID {os.getpid()}, since ")
        assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in search_dir.iterdir()} == before
    finally:
        release_search_dir(running)
    release_search_dir(hold_search_dir(search_dir))  # free again once the first driver ends


@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
                         ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_a_search_cleanly(tmp_path, signum):
    """`kill` (a scheduler, `ray job stop`) or Ctrl-C: the open MLflow runs are marked KILLED, the folder and the
    exact --resume command are printed, no C++ abort trace, exit status 128 + the signal (143, 130)."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "ant_ray.cli", "search", "search_spaces/quickstart.yaml", "--output-dir",
               str(out)] + [arg for o in SEARCH for arg in ("--set", o)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=Path(__file__).resolve().parent.parent)
    try:
        _wait_for(lambda: list(out.glob("searches/*/ant")), "the ant stage started", proc)
        proc.send_signal(signum)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 128 + signum, output
    (search_dir,) = out.glob("searches/*")
    assert re.search(rf"continue it with: (\S*/)?ant-ray search --resume {re.escape(str(search_dir))}", output)
    assert "Traceback" not in output and "Aborted" not in output and "SIGABRT" not in output, output

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ant_ray-quickstart").experiment_id])
    by_stage = {r.data.tags.get("ant_ray.stage"): r for r in runs}
    assert by_stage["search"].info.status == "KILLED" and by_stage["ant_search"].info.status == "KILLED"


def test_a_full_disk_on_the_driver_is_one_line(tmp_path, monkeypatch):
    """The driver's own writes (its records, the winner) on a full disk: one line as a failed stage is shown
    (the CLI prints it, exit status 1), the cause attached."""
    cfg, search_dir, _ = _finished_search(tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(chain, "_finished_result", full)
    with pytest.raises(SearchStageFailed) as error:
        run_search(cfg, resume=search_dir)
    assert str(error.value) == (f"no space left on device ([Errno 28] No space left on device); free space in "
                                f"{cfg.output_path()} and continue with --resume")
    assert isinstance(error.value.__cause__, OSError)
