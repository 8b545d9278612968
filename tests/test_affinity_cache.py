"""The ant stage's task affinity for gradient clustering: measured on first use, once, and cached in the stage
folder (the measurement itself is replaced by a stand-in here: no Ray, no training)."""

from pathlib import Path

import numpy as np

from ant_ray.config import load_config
from ant_ray.search import training_stage
from ant_ray.search.trials import TrainingStageContext

SPACES = Path(__file__).resolve().parent.parent / "search_spaces"


def _fake_measurement(monkeypatch) -> list[Path]:
    """stage_affinity's stand-in: records each measurement and saves the array where the real one does."""
    measured: list[Path] = []

    def stage_affinity(cfg, run_dir, run_key, run):
        measured.append(run_dir)
        affinity = np.full((cfg.ant.affinity.buckets,) * 2, 0.5)
        (run_dir / "affinity").mkdir(parents=True, exist_ok=True)
        np.save(run_dir / "affinity" / "bucket_affinity.npy", affinity)
        return affinity, run_dir / "affinity" / "bucket_affinity.npy"

    monkeypatch.setattr(training_stage, "stage_affinity", stage_affinity)
    return measured


def test_the_affinity_is_measured_once_then_read(monkeypatch, tmp_path):
    measured = _fake_measurement(monkeypatch)
    cfg = load_config(SPACES / "ant_k.yaml")
    lines: list[str] = []
    first = training_stage.cached_stage_affinity(cfg, tmp_path, None, lines.append)
    again = training_stage.cached_stage_affinity(cfg, tmp_path, None, lines.append)  # a later trial, or a resume
    assert measured == [tmp_path] and len(lines) == 1 and np.array_equal(first, again)
    (tmp_path / "affinity" / "bucket_affinity.npy").write_bytes(b"\x93NUMPY")  # a write cut short by a crash
    training_stage.cached_stage_affinity(cfg, tmp_path, None, lines.append)
    assert measured == [tmp_path, tmp_path]


def test_only_a_trial_that_picks_gradient_measures_it(monkeypatch, tmp_path):
    measured = _fake_measurement(monkeypatch)
    given = []
    monkeypatch.setattr(training_stage.trial_functions, "ant_trial",
                        lambda config, *, context: given.append(context.affinity))
    monkeypatch.setattr(training_stage, "TrackedRun", lambda uri, run_id: None)  # no MLflow store here
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
    assert measured == [tmp_path / "ant"]
    assert given[1] == given[2] == np.full((cfg.ant.affinity.buckets,) * 2, 0.5).tolist()
    # Tune checks a restored stage's trainable by name: the wrapper keeps ant_trial's
    assert training_stage.TRIAL_FUNCTIONS["ant"].__name__ == "ant_trial"
