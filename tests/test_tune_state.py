"""A Tune experiment whose state file was torn (a driver killed while Tune wrote it) is restored from the copy
`KeepStateCopy` keeps: its finished trials are not run again. Without a copy it is kept aside and starts over.
(Tune alone loses the finished trials; see `ant_ray/search/tune_state.py`.)"""

import json
import pickle
import sys
from pathlib import Path

import pytest
from ray import cloudpickle, tune

from ant_ray.search.tune_runs import run_tune
from ant_ray.search.tune_state import is_whole, state_copy_path
from conftest import shared_ray

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import a test module


@pytest.fixture(scope="module", autouse=True)
def _ray():
    shared_ray()


def _trainable(config):
    with open(Path(config["folder"]) / "runs.txt", "a") as f:  # one line per time a trial body runs
        f.write(f"{config['x']}\n")
    tune.report({"score": config["x"] * 2.0})


def _run(tmp_path: Path, resume: bool, logged: list[str]) -> tune.ResultGrid:
    return run_tune(_trainable, name="tune", storage=tmp_path, resume=resume,
                    param_space={"x": tune.grid_search([1, 2]), "folder": str(tmp_path)},
                    tune_config=tune.TuneConfig(max_concurrent_trials=2),
                    run_config=tune.RunConfig(name="tune", storage_path=str(tmp_path), verbose=0),
                    label="toy stage", log=logged.append)


def _tear(experiment: Path) -> Path:
    state = max(experiment.glob("experiment_state-*.json"))
    state.write_bytes(state.read_bytes()[:0])  # what a kill between Tune's open and its first write leaves
    return state


def _runs(tmp_path: Path) -> list[str]:
    return sorted((tmp_path / "runs.txt").read_text().split())


def test_a_torn_state_is_restored_from_its_copy_and_no_trial_runs_again(tmp_path):
    logged = []
    _run(tmp_path, resume=False, logged=logged)
    experiment = tmp_path / "tune"
    copy = state_copy_path(experiment)
    assert copy.is_file() and _runs(tmp_path) == ["1", "2"]
    torn = _tear(experiment)
    assert not is_whole(torn)

    results = _run(tmp_path, resume=True, logged=logged)
    assert is_whole(torn) and json.loads(torn.read_text())["trial_data"]
    assert sorted(r.metrics["score"] for r in results) == [2.0, 4.0]
    assert _runs(tmp_path) == ["1", "2"]  # restored as finished, not run again
    assert any(line.startswith("toy stage: the interruption tore Tune's state (experiment_state-")
               and "restored the whole copy saved at" in line for line in logged), logged


def test_without_a_copy_a_torn_experiment_is_kept_aside_and_starts_over(tmp_path):
    logged = []
    _run(tmp_path, resume=False, logged=logged)
    experiment = tmp_path / "tune"
    state_copy_path(experiment).unlink()
    _tear(experiment)

    results = _run(tmp_path, resume=True, logged=logged)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("tune.torn-")]
    assert len(aside) == 1 and (aside[0] / "tuner.pkl").is_file()  # nothing deleted
    assert sorted(r.metrics["score"] for r in results) == [2.0, 4.0]
    assert _runs(tmp_path) == ["1", "1", "2", "2"]
    assert any("no whole copy exists" in line and str(aside[0]) in line for line in logged), logged


def test_a_copy_that_cannot_be_written_is_a_warning_not_a_failure(tmp_path, caplog):
    state_copy_path(tmp_path / "tune").mkdir()  # a folder where the zip goes: every write fails
    results = _run(tmp_path, resume=False, logged=[])
    assert sorted(r.metrics["score"] for r in results) == [2.0, 4.0]
    warnings = [r for r in caplog.records if "could not keep a copy of Tune's state" in r.getMessage()]
    assert len(warnings) == 1  # once, not at every step


def test_whole_and_torn_files_are_told_apart(tmp_path):
    pickled = tmp_path / "searcher-state-x.pkl"
    data = pickle.dumps({"trials": list(range(100))})
    pickled.write_bytes(data)
    assert is_whole(pickled)
    for cut in (0, 1, len(data) // 2, len(data) - 1):
        pickled.write_bytes(data[:cut])
        assert not is_whole(pickled), cut
    state = tmp_path / "experiment_state-x.json"
    text = json.dumps({"trial_data": [["a", "b"]], "runner_data": {}})
    state.write_text(text)
    assert is_whole(state)
    state.write_text(text[:-1])
    assert not is_whole(state)
