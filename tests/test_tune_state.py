"""A Tune experiment whose state file was torn (a driver killed while Tune wrote it) is restored from the copy
`KeepStateCopy` keeps: its finished trials are not run again. Without a copy it is kept aside and starts over.
(Tune alone loses the finished trials; see `ant_ray/search/tune_state.py`.)"""

import json
import pickle
import sys
from pathlib import Path

import optuna
import pytest
from optuna.distributions import IntDistribution
from ray import cloudpickle, tune

from ant_ray.config import SearcherConfig
from ant_ray.files import DiskFull
from ant_ray.search.outcome import SearchStageFailed
from ant_ray.search.searchers import build_optuna_search, journal_storage
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


def _fails_while_the_disk_is_full(config, folder):
    if config["x"] == 2 and (Path(folder) / "disk-full").exists():
        raise DiskFull(f"no space left on device writing {folder}/model: 0.0 MB free on /, it needs at least 1.0 MB")
    tune.report({"score": config["x"] * 2.0, "step": 1})


def test_a_failed_trial_stops_the_stage_in_one_line_and_a_resume_retries_it(tmp_path):
    """A trial that failed for a cause outside its configuration (a full disk) stops the stage with that cause in
    one line; once the cause is gone a resume runs it again, and Optuna keeps the failed attempt beside the retry's
    score."""
    (tmp_path / "disk-full").touch()
    journal = tmp_path / "optuna.journal"

    def run(resume: bool, logged: list[str]) -> tune.ResultGrid:
        # a restore takes Tune's own saved searcher; a new one would add its points to the study again
        searcher = None if resume else build_optuna_search(
            SearcherConfig(name="random"), space={"x": IntDistribution(1, 2)}, metric="score", seed=0,
            points_to_evaluate=[{"x": 1}, {"x": 2}], storage_path=journal, study_name="toy", final_step=1)
        return run_tune(tune.with_parameters(_fails_while_the_disk_is_full, folder=str(tmp_path)), name="tune",
                        storage=tmp_path, resume=resume, param_space=None,
                        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=2, max_concurrent_trials=2),
                        run_config=tune.RunConfig(name="tune", storage_path=str(tmp_path), verbose=0),
                        label="toy stage", log=logged.append)

    logged: list[str] = []
    with pytest.raises(SearchStageFailed) as failed:
        run(resume=False, logged=logged)
    assert str(failed.value) == (f"toy stage: no space left on device writing {tmp_path}/model: 0.0 MB free on /, "
                                 "it needs at least 1.0 MB")
    assert [line for line in logged if " failed: " in line] == [
        line for line in logged if line.startswith("toy stage: trial ") and "no space left on device" in line]
    study = optuna.load_study(study_name="toy", storage=journal_storage(journal))
    assert sorted((t.params["x"], t.state.name) for t in study.trials) == [(1, "COMPLETE"), (2, "FAIL")]

    (tmp_path / "disk-full").unlink()  # space freed
    logged = []
    results = run(resume=True, logged=logged)
    assert sorted(r.metrics["score"] for r in results if r.error is None) == [2.0, 4.0]
    study = optuna.load_study(study_name="toy", storage=journal_storage(journal))
    assert sorted((t.params["x"], t.state.name, t.value) for t in study.trials) == [
        (1, "COMPLETE", 2.0), (2, "COMPLETE", 4.0), (2, "FAIL", None)]
    assert any("1 trial that had failed ran again" in line for line in logged), logged
