"""Searchers (Optuna's TPE, CMA-ES, random; or a grid) and schedulers (FIFO, ASHA) for a stage's Tune run.

Optuna runs as Ray Tune's searcher through `FidelityAwareOptunaSearch`, which tells the study exactly what a trial
is worth and at which fidelity:
- intermediate scores go in as Optuna intermediate values at their training step (or sample count), so scores
  are only ever compared at equal steps;
- a trial that reached the final step is COMPLETE with its final score;
- a trial stopped early by ASHA is PRUNED (never COMPLETE with a low-fidelity score, which the plain OptunaSearch
  would record as if it were final);
- a trial whose training diverged is COMPLETE with +inf (the searcher learns that region is bad); a trial that
  crashed is FAIL.
The study lives in a JournalStorage file inside the search folder, under a name unique to the search and stage,
so a resumed search continues the same study.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from ant_ray.config import SearcherConfig

TUNE_TRIAL_ID = "tune_trial_id"  # Optuna user attribute: which Tune trial an Optuna trial belongs to


def journal_storage(path: Path) -> JournalStorage:
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def sampler(settings: SearcherConfig, seed: int) -> optuna.samplers.BaseSampler:
    if settings.name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=settings.startup_trials, multivariate=True,
                                          constant_liar=True)
    if settings.name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=settings.startup_trials)
    if settings.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"searcher {settings.name!r} is not an Optuna sampler")


class FidelityAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that records early-stopped trials as PRUNED and diverged ones as +inf (see module doc).

    ``final_step``: the value of ``step_key`` at which a trial has its final score; ``step_key``: the result key
    that says how far a trial got (training steps, or samples for the merge stage)."""

    def __init__(self, *, final_step: int, step_key: str = "step", **kwargs: Any):
        super().__init__(**kwargs)
        self.final_step = final_step
        self.step_key = step_key

    def suggest(self, trial_id: str) -> dict | None:
        params = super().suggest(trial_id)
        self._ot_trials[trial_id].set_user_attr(TUNE_TRIAL_ID, trial_id)
        return params

    def _reported_steps(self, trial_id: str) -> set[int]:
        return self.__dict__.setdefault("_steps_seen", {}).setdefault(trial_id, set())

    def _trial(self, trial_id: str) -> optuna.Trial | None:
        """The Optuna trial of a Tune trial; after a resume the searcher's own pickle may predate the trial, so
        look it up in the (journal) study by the attribute set in suggest."""
        if trial_id not in self._ot_trials:
            for frozen in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if frozen.user_attrs.get(TUNE_TRIAL_ID) == trial_id:
                    self._ot_trials[trial_id] = optuna.Trial(self._ot_study, frozen._trial_id)
        return self._ot_trials.get(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        trial = self._trial(trial_id)
        value = result.get(self.metric)
        if trial is None or trial_id in self._completed_trials or value is None or not math.isfinite(value):
            return
        step = int(result[self.step_key])
        if step not in self._reported_steps(trial_id):  # a trial's final result repeats its last evaluation
            self._reported_steps(trial_id).add(step)
            trial.report(float(value), step)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials:
            return
        trial = self._trial(trial_id)
        if trial is None:  # unknown even to the study: nothing to tell
            self._completed_trials.add(trial_id)
            return
        value = (result or {}).get(self.metric)
        if (result or {}).get("diverged"):
            self._ot_study.tell(trial, math.inf)
        elif error or value is None:
            self._ot_study.tell(trial, None, state=TrialState.FAIL)
        elif int((result or {}).get(self.step_key, 0)) < self.final_step:
            self._ot_study.tell(trial, None, state=TrialState.PRUNED)  # stopped early: its score is not final
        else:
            self._ot_study.tell(trial, float(value))
        self._completed_trials.add(trial_id)


def build_optuna_search(settings: SearcherConfig, *, space: dict[str, Any], metric: str, seed: int,
                        points_to_evaluate: list[dict] | None, storage_path: Path, study_name: str,
                        final_step: int, step_key: str = "step") -> FidelityAwareOptunaSearch:
    storage = journal_storage(storage_path)
    if _study_exists(storage, study_name):
        # A resume: the points were enqueued in the journal when the study was created (asked or still waiting
        # there); enqueuing them again would run them twice.
        points_to_evaluate = None
    return FidelityAwareOptunaSearch(
        space=space, metric=metric, mode="min", points_to_evaluate=points_to_evaluate or None,
        sampler=sampler(settings, seed), storage=storage, study_name=study_name,
        final_step=final_step, step_key=step_key)


def _study_exists(storage: JournalStorage, study_name: str) -> bool:
    try:
        storage.get_study_id_from_name(study_name)
    except KeyError:
        return False
    return True


def build_scheduler(name: str, *, metric: str, max_t: int, grace_period: int, reduction_factor: float,
                    time_attr: str = "step") -> TrialScheduler:
    """ASHA over ``time_attr``: a trial is compared only with other trials' scores at the same milestone.
    ``stop_last_trials=False`` lets a trial that reached max_t finish on its own (it saves its model then)."""
    if name == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr=time_attr, metric=metric, mode="min", max_t=max_t, grace_period=grace_period,
                         reduction_factor=reduction_factor, stop_last_trials=False)
