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
