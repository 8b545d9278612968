"""A Tune experiment's state that survives a driver killed while Tune writes it.

Tune rewrites its state files in place (`experiment_state-*.json`, the searcher's state) and copies them from the
driver's staging folder to the experiment folder in a background thread. A driver killed during either write
leaves a torn file, and `Tuner.restore` then logs "Failed to restore the run state" and goes on without it: Ray
2.60 starts one trial without a configuration, and the trials that had finished are lost from the result. So:

- `KeepStateCopy`, a Tune callback, zips the staging folder's state files after each of Tune's saves and after
  its final one. It runs in the thread that writes them, after the save, so the copy is whole and one save's set.
  The zip is written beside the experiment folder, outside Tune's copying, and replaced atomically.
- `repair_torn_state`, before a restore, checks that every state file reads; if one does not, it puts the zip's
  files back. With no zip (a driver killed during the first save) it moves the experiment folder aside, keeping
  it, and the stage starts over.

A restore retries the trials that had failed (errored: a full disk, a damaged file, a lost process): Optuna keeps
their failed attempt as FAIL, and `record_retried_trials` tells it the retry's outcome as a new trial with the same
values, so the study holds every attempt and the searcher learns the retried trial's score.
"""

from __future__ import annotations

import json
import logging
import pickletools
import time
import zipfile
from pathlib import Path
from typing import Callable

from ray import tune

from ant_ray.files import publishing_file

# Tune's state files at the top of an experiment folder (trial folders belong to the trials).
STATE_FILES = ("experiment_state-*.json", "basic-variant-state-*.json", "search_gen_state-*.json",
               "searcher-state-*.pkl", "callback-states-*.pkl")
TUNER_FILE = "tuner.pkl"  # written once, when the experiment starts

logger = logging.getLogger(__name__)


def state_copy_path(experiment_dir: Path) -> Path:
    return experiment_dir.with_name(f"{experiment_dir.name}.state-copy.zip")


def _state_files(folder: Path) -> list[Path]:
    return sorted(p for pattern in STATE_FILES for p in folder.glob(pattern) if p.is_file())


def is_whole(path: Path) -> bool:
    """Whether a state file reads to its end: JSON parses, a pickle's opcodes run to its STOP (without loading
    it, which would import and build the searcher). Some of Tune's `.json` files are pickles."""
    data = path.read_bytes()
    try:
        if not data.startswith(b"\x80"):  # every pickle protocol from 2 on starts with PROTO
            json.loads(data)
        else:
            ops = list(pickletools.genops(data))
            if not ops or ops[-1][0].name != "STOP":
                return False
    except ValueError:  # json.JSONDecodeError, and pickletools on truncated data
        return False
    return True


class KeepStateCopy(tune.Callback):
    """Zips the state Tune has just saved in the driver's staging folder, when it changed."""

    def __init__(self):
        self._copied: int | None = None  # the newest mtime (ns) of the state files last copied
        self._warned = False

    def on_step_end(self, iteration, trials, **info) -> None:
        self._copy(trials)

    def on_experiment_end(self, trials, **info) -> None:  # after Tune's final save
        self._copy(trials)

    def _copy(self, trials) -> None:
        if not trials:
            return
        storage = trials[0].storage
        staging = Path(storage.experiment_driver_staging_path)
        files = _state_files(staging)
        newest = max((p.stat().st_mtime_ns for p in files), default=None)
        if newest is None or newest == self._copied:
            return
        copy = state_copy_path(Path(storage.experiment_fs_path))
        try:
            with publishing_file(copy) as temporary, zipfile.ZipFile(temporary, "w") as archive:
                for path in files:
                    archive.write(path, path.name)
        except OSError as error:  # a missing copy costs safety, not results: the search goes on
            if not self._warned:
                logger.warning("could not keep a copy of Tune's state in %s (%s); a resume after a kill that "
                               "tears Tune's own file would start this stage over", copy, error)
                self._warned = True
            return
        self._copied = newest


def repair_torn_state(experiment_dir: Path, log: Callable[[str], None], label: str) -> None:
    """Make a started experiment restorable, or move it aside (kept) so the stage starts over. ``label`` names the
    stage in what is logged."""
    if not experiment_dir.is_dir():
        return
    torn = [p.name for p in _state_files(experiment_dir) if not is_whole(p)]
    tuner = experiment_dir / TUNER_FILE
    if tuner.is_file() and not is_whole(tuner):
        torn.append(TUNER_FILE)
    if not torn:
        return
    copy = state_copy_path(experiment_dir)
    if TUNER_FILE not in torn and copy.is_file():
        with zipfile.ZipFile(copy) as archive:
            for name in archive.namelist():
                with publishing_file(experiment_dir / name) as temporary:
                    temporary.write_bytes(archive.read(name))
        still = [p.name for p in _state_files(experiment_dir) if not is_whole(p)]
        if not still:
            saved = time.strftime("%H:%M:%S", time.localtime(copy.stat().st_mtime))
            log(f"{label}: the interruption tore Tune's state ({', '.join(torn)}); "
                f"restored the whole copy saved at {saved}")
            return
        torn = still
    aside = experiment_dir.with_name(f"{experiment_dir.name}.torn-{time.strftime('%Y%m%d-%H%M%S')}")
    experiment_dir.rename(aside)
    log(f"{label}: the interruption tore Tune's state ({', '.join(torn)}) and no whole copy exists; "
        f"this stage starts over (the torn experiment is kept in {aside})")


def record_retried_trials(searcher, results, log: Callable[[str], None], label: str) -> int:
    """Tell Optuna the outcome of trials that a resume retried after they had failed. Returns how many.

    `searcher` is the stage's OptunaSearch (None for a grid: nothing to tell). Optuna cannot change a finished
    trial, and Ray's searcher ignores a trial it counts as completed, so a retried trial's result would otherwise
    never reach the study: each one gets a new Optuna trial with the same values, told through the searcher (which
    decides COMPLETE, PRUNED or +inf as for any trial)."""
    import optuna
    from optuna.trial import TrialState

    from ant_ray.search.searchers import TUNE_TRIAL_ID

    study = getattr(searcher, "_ot_study", None)
    if study is None:
        return 0
    attempts: dict[str, list] = {}
    for frozen in study.get_trials(deepcopy=False):
        attempts.setdefault(frozen.user_attrs.get(TUNE_TRIAL_ID), []).append(frozen)
    told = 0
    for result in results:
        trial_id = (result.metrics or {}).get("trial_id")
        tried = attempts.get(trial_id, [])
        if result.error is not None or not tried or any(t.state != TrialState.FAIL for t in tried):
            continue  # still failing, not Optuna's, or its outcome is recorded already
        failed = tried[-1]
        # a RUNNING copy of the failed attempt (not enqueue + ask, which would take any other waiting point first)
        study.add_trial(optuna.trial.create_trial(state=TrialState.RUNNING, params=failed.params,
                                                  distributions=failed.distributions,
                                                  user_attrs={TUNE_TRIAL_ID: trial_id}))
        searcher._ot_trials[trial_id] = optuna.Trial(study, study.get_trials(deepcopy=False)[-1]._trial_id)
        searcher._completed_trials.discard(trial_id)
        searcher.on_trial_complete(trial_id, result=result.metrics)
        told += 1
    if told:
        log(f"{label}: {told} trial{'' if told == 1 else 's'} that had failed ran again; Optuna keeps the failed "
            "attempt and has the retry's outcome")
    return told
