"""What the terminal shows: ant_ray's own progress lines, not Ray's internals.

Ray forwards every worker's output to the driver with a "(RayTrainWorker pid=...)" prefix, including Ray Train's
report and checkpoint lines, a PreemptionWatcher error on every run start, the placement-group cleaner's warning
after a stopped trial, and the dedup notice. By default the driver keeps the lines ant_ray writes itself (shown
without the prefix) and whatever is not known noise (errors stay visible); `ant-ray --verbose` (ANT_RAY_VERBOSE=1)
shows everything as Ray prints it. The raylet's worker-count warnings reach the driver another way; the private
local Ray is configured so that they do not fire (ray_runtime.start_ray)."""

from __future__ import annotations

import logging
import os
import re
import sys

# Noise that comes with a traceback, which goes too: Train V2's warning when busy CPUs delay its resource request
# (logged with exc_info), and Python's note on an exception it ignored, e.g. Ray's SystemExit when Tune stops a
# reused trial process at the end of a merge rung
NOISE_WITH_TRACEBACK = ("Failed to send resource request", "Exception ignored in")
# Lines Ray prints that say nothing a user of ant_ray needs (all still in Ray's log files).
RAY_NOISE = (
    "Reporting training result", "Checkpoint successfully created", "Setting up process group",
    "Started training worker group", "world_rank=", "Attempting to start training worker group",
    "Requesting resources", "PreemptionWatcher", "PYTHON worker processes have been started",
    "Ray deduplicates logs", "repeated", "has constructor arguments",
    "UserWarning: The reported value is ignored", "optuna_warn(", "Creating initial MLflow database tables",
    "Updating database tables",
    # Train V2's detached PlacementGroupCleaner, after a scheduler stopped a trial (its controller went with it)
    "Cleaning up placement group",
    *NOISE_WITH_TRACEBACK,
)
OWN_PREFIX = "["  # ant_ray's lines start with "[ant_ray ...]" or "[<run name>] ..."
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*: ")  # "ray.exceptions.GetTimeoutError: ...", a traceback's end


def without_noise(lines: list[str]) -> list[str]:
    """The lines that are neither Ray's noise nor the traceback that follows a NOISE_WITH_TRACEBACK line."""
    kept: list[str] = []
    after_noise = in_traceback = False
    for line in lines:
        if any(noise in line for noise in RAY_NOISE):
            after_noise, in_traceback = any(noise in line for noise in NOISE_WITH_TRACEBACK), False
            continue
        if after_noise and line.startswith("Traceback"):
            in_traceback = True
            continue
        if in_traceback and (line.startswith((" ", "\t")) or not line.strip()):
            continue
        ends_traceback = in_traceback and _EXCEPTION_LINE.match(line)
        after_noise = in_traceback = False
        if not ends_traceback:
            kept.append(line)
    return kept


class SyncRaceFilter(logging.Filter):
    """Drops Tune's error when its background copy of the experiment state to the storage folder finds a temporary
    file gone: Tune writes each state file as a `-tmp-` file and renames it, and a copy that listed the folder just
    before a rename fails on the old name. The next copy takes the renamed file. Any other failure to save the state
    still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (record.getMessage().startswith("Saving experiment state to storage")
                    and isinstance(error, FileNotFoundError) and "-tmp-" in str(error))


def verbose() -> bool:
    return os.environ.get("ANT_RAY_VERBOSE", "0") == "1"


def quiet_driver_logs() -> None:
    """Python loggers of the libraries the driver uses: warnings and errors only, and Tune's own progress tables
    off (ant_ray prints a compact status instead), unless verbose."""
    if verbose():
        return
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the legacy reporter honours verbose=0
    for name in ("mlflow", "optuna", "ray.tune", "ray.train", "ray.air", "ray.data", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR if name.startswith("ray.tune") else logging.WARNING)
    state_logger = logging.getLogger("ray.tune.execution.experiment_state")
    if not any(isinstance(f, SyncRaceFilter) for f in state_logger.filters):
        state_logger.addFilter(SyncRaceFilter())
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def install_worker_log_filter() -> None:
    """Replace Ray's printer of forwarded worker output with one that drops Ray's noise (after ray.init)."""
    if verbose():
        return
    from ray._private import worker

    def print_filtered(data: dict) -> None:
        lines = without_noise(data.get("lines", []))
        own = [line for line in lines if line.startswith(OWN_PREFIX)]
        other = [line for line in lines if not line.startswith(OWN_PREFIX)]
        if own:  # not deduplicated: concurrent runs print similar lines, and each is wanted
            worker.print_worker_logs({**data, "lines": own}, sys.stderr if data.get("is_err") else sys.stdout,
                                     ignore_prefix=True)
        if other:
            worker.print_to_stdstream({**data, "lines": other}, ignore_prefix=False)

    dispatcher = worker.global_worker_stdstream_dispatcher
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ant_ray_print_logs", print_filtered)
