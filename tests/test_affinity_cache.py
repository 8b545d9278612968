"""The ant stage's task affinity for gradient clustering: measured on first use, once, and cached in the stage
folder (the measurement itself is replaced by a stand-in here: no Ray, no training)."""

from pathlib import Path

import numpy as np

from ant_ray.config import load_config
from ant_ray.search import training_stage
from ant_ray.search.trials import TrainingStageContext

SPACES = Path(__file__).resolve().parent.parent / "search_spaces"


def _measurement(stage_dir: Path, measured: list[Path]):
    """stage_affinity's stand-in: records each measurement and saves the array where the real one does."""
    def measure():
        measured.append(stage_dir)
        affinity = np.full((4, 4), 0.5)
        (stage_dir / "affinity").mkdir(parents=True, exist_ok=True)
        np.save(stage_dir / "affinity" / "bucket_affinity.npy", affinity)
        return affinity
    return measure


def test_the_affinity_is_measured_once_then_read(tmp_path):
    measured, lines = [], []
    measure = _measurement(tmp_path, measured)
    first = training_stage.cached_stage_affinity(tmp_path, measure, lines.append)
    again = training_stage.cached_stage_affinity(tmp_path, measure, lines.append)  # a later trial, or a resume
    assert measured == [tmp_path] and len(lines) == 1 and np.array_equal(first, again)
    (tmp_path / "affinity" / "bucket_affinity.npy").write_bytes(b"\x93NUMPY")  # a write cut short by a crash
    training_stage.cached_stage_affinity(tmp_path, measure, lines.append)
    assert measured == [tmp_path, tmp_path]


def test_only_a_trial_that_picks_gradient_measures_it(monkeypatch, tmp_path):
    measured, given = [], []
    monkeypatch.setattr(training_stage, "_measure_from_trial",
                        lambda context: _measurement(Path(context.stage_dir), measured)())
    monkeypatch.setattr(training_stage.trial_functions, "ant_trial",
                        lambda config, *, context: given.append(context.affinity))
    cfg = load_config(SPACES / "ant_k.yaml")  # ant.clustering in {timestep, snr, gradient}
    assert cfg.ant.clustering != "gradient"
    context = TrainingStageContext(
        stage="ant", cfg_dump=cfg.worker_dump(), search_dir=str(tmp_path), stage_dir=str(tmp_path / "ant"),
        tracking_uri="sqlite:///unused.db", experiment_id="0", stage_run_id="r", metric="fid", num_samples=10,
        eval_every=None, cache_dir=str(tmp_path / "cache"))
    training_stage.ant_trial({"ant.k": 3, "ant.clustering": "timestep"}, context=context)
    assert measured == [] and given == [None]  # a search whose trials never pick gradient never measures
    training_stage.ant_trial({"ant.k": 3, "ant.clustering": "gradient"}, context=context)
    training_stage.ant_trial({"ant.k": 4, "ant.clustering": "gradient"}, context=context)
    assert measured == [tmp_path / "ant"] and given[1] == given[2] == np.full((4, 4), 0.5).tolist()
    # Tune checks a restored stage's trainable by name: the wrapper keeps ant_trial's
    assert training_stage.TRIAL_FUNCTIONS["ant"].__name__ == "ant_trial"
