"""What every stage of a search shares: where it runs and logs (`StageSetup`), and running or restoring one Tune
experiment (`run_tune`)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from ray import tune

from ant_ray.config import PipelineConfig
from ant_ray.search.outcome import SearchStageFailed
from ant_ray.search.tune_state import KeepStateCopy, record_retried_trials, repair_torn_state
from ant_ray.stages.ray_train import failure_cause
from ant_ray.tracking import TrackedRun


def log_line(message: str) -> None:
    """How the search reports progress: one timestamped line (a module function, so Tune can pickle callbacks)."""
    print(f"[ant_ray {time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass
class StageSetup:
    """Where a stage runs and logs."""
    cfg: PipelineConfig
    search_dir: Path
    tracking_uri: str
    experiment_id: str
    stage_run: TrackedRun
    study_name: str
    resume: bool
    log: Callable[[str], None] = log_line


def run_tune(trainable, *, name: str, storage: Path, resume: bool, param_space: dict | None,
             tune_config: tune.TuneConfig, run_config: tune.RunConfig,
             label: str, log: Callable[[str], None] = log_line) -> tune.ResultGrid:
    """Run a Tune experiment, or continue it (finished trials kept, unfinished ones resumed) if it was started.
    ``label`` names the stage in what is logged."""
    path = storage / name
    # Ctrl-C then stops the search as SIGTERM does (KeyboardInterrupt: runs marked KILLED, the --resume line).
    # Tune's own handler would end the experiment quietly, as if every running trial had been stopped early.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    if resume:
        repair_torn_state(path, log, label)
    restored = resume and tune.Tuner.can_restore(str(path))
    if restored:
        # Failed (errored) trials run again, from their last checkpoint: their cause (a full disk, a damaged file,
        # a lost node) may be gone. A diverged trial did not error (it reported +inf) and stays as it was.
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   restart_errored=False)
    else:
        run_config = replace(run_config, callbacks=[*(run_config.callbacks or []), KeepStateCopy()])
        tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)
    results = tuner.fit()
    if restored:  # the restored searcher: Tune rebuilt it from the experiment's own saved state
        record_retried_trials(_searcher(tuner._local_tuner._tune_config.search_alg), results, log, label)
    _report_failures(results, label, log)
    return results


def _searcher(search_alg):
    """The searcher inside Tune's wrappers (SearchGenerator, ConcurrencyLimiter), or None."""
    while search_alg is not None and not hasattr(search_alg, "_ot_study"):
        search_alg = getattr(search_alg, "searcher", None)
    return search_alg


def _report_failures(results: tune.ResultGrid, label: str, log: Callable[[str], None]) -> None:
    """One line per failed trial with its cause (not Ray's traceback). A cause outside the trial's configuration
    (a full disk, a damaged file) stops the search: it would fail every trial, and a --resume retries them once
    it is fixed."""
    faults = []
    for result in results:
        if result.error is None:
            continue
        reason, _, fault = failure_cause(result.error)
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        log(f"{label}: trial {trial_id} failed: {reason}")
        if fault:
            faults.append(reason)
    if faults:
        raise SearchStageFailed(f"{label}: {faults[0]}")
