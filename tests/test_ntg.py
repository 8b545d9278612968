"""Negative transfer gap (ANT Eq. 3): routing, and a tiny real run on local Ray with MLflow."""

import math

import pytest
from mlflow.tracking import MlflowClient

from ant_ray.config import load_config
from ant_ray.experiments.ntg import equal_intervals, routed_ranges, run_ntg


def test_routed_ranges_cover_and_route():
    assert routed_ranges((200, 400), 1000) == ([[0, 200], [200, 400], [400, 1000]], [0, 1, 0])
    assert routed_ranges((0, 500), 1000) == ([[0, 500], [500, 1000]], [1, 0])
    assert routed_ranges((500, 1000), 1000) == ([[0, 500], [500, 1000]], [0, 1])
    assert equal_intervals(5, 1000) == [(0, 200), (200, 400), (400, 600), (600, 800), (800, 1000)]


@pytest.mark.slow
def test_ntg_tiny_run(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}", "data.resolution=8", "pretrain.steps=10",
                             "pretrain.batch_size=64", "pretrain.log_every=5", "pretrain.checkpoint_every=10",
                             "fid.num_samples=50", "fid.batch_size=50", "sampler.steps=3", "ray.num_cpus=4",
                             "pretrain.resources={cpu: 1, num_workers: 1}"])
    result = run_ntg(cfg, [(0, 500), (500, 1000)])
    assert set(result.gaps) == {(0, 500), (500, 1000)}
    for interval, gap in result.gaps.items():
        assert math.isfinite(gap)
        assert gap == pytest.approx(result.mixed_fids[interval] - result.all_task_fid)
    client = MlflowClient(cfg.tracking_uri())
    run = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])[0]
    assert {"ntg.png", "ntg.txt"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "ntg_0_500" in run.data.metrics
