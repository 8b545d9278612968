"""The main job end to end on a tiny budget: real local Ray, real MLflow (SQLite), real Optuna, real FID."""

import math

import pytest
import torch
from mlflow.tracking import MlflowClient

from ant_ray.cli import main as cli_main
from ant_ray.config import load_config
from ant_ray.deme import has_channel_projections
from ant_ray.diffusion import load_model
from ant_ray.merge import load_task_vector, state_dict_fingerprint
from ant_ray.experiments.pipeline import run_pipeline

TINY = [
    "pretrain.steps=20", "pretrain.log_every=10", "pretrain.checkpoint_every=10",
    "finetune.steps=10", "finetune.log_every=5", "finetune.checkpoint_every=10",
    "pretrain.batch_size=64", "finetune.batch_size=64",
    "fid.num_samples=100", "fid.batch_size=100", "sampler.steps=4",
    "merge_search.num_trials=3", "ray.num_cpus=4", "finetune.channel_projection=true",
]


@pytest.fixture(scope="module")
def pipeline_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = load_config("search_spaces/pipeline_digits.yaml", TINY + [f"output_dir={out}"])
    yield cfg, run_pipeline(cfg)


@pytest.mark.slow
def test_table_has_every_model(pipeline_result):
    cfg, result = pipeline_result
    assert result.metric == "fid100_domain"
    assert list(result.scores) == ["pretrained", "specialist 0 [0, 500]", "specialist 1 [500, 1000]",
                                   "DeMe ensemble (before merge)", "DeMe merged (best weights)"]
    assert all(math.isfinite(v) and v > 0 for v in result.scores.values())
    assert len(result.best_weights) == 2 and result.merge_trials == 3
    assert result.merge_images_generated == 300 and result.merge_images_to_best in (100, 200, 300)
    table = result.table()
    assert "fid100_domain" in table and "ui --output-dir " in table
    assert (result.run_dir / "summary.txt").read_text().startswith("model")


@pytest.mark.slow
def test_artifacts_on_disk(pipeline_result):
    cfg, result = pipeline_result
    merged = load_model(result.run_dir / "merged" / "model")
    assert merged.config.sample_size == 8
    assert has_channel_projections(merged)  # DeMe's projections survive merging and saving
    base_dirs = list((cfg.output_path() / "cache" / "pretrained").iterdir())
    assert len(base_dirs) == 1 and not has_channel_projections(load_model(base_dirs[0]))
    fingerprint = state_dict_fingerprint(load_model(result.run_dir / "base_with_projections").state_dict())
    for i, expected in enumerate([(0, 500), (500, 1000)]):
        tau, meta = load_task_vector(result.run_dir / "task_vectors" / f"specialist_{i}.safetensors")
        assert meta["range"] == f"{expected[0]},{expected[1]}"
        assert meta["base_fingerprint"] == fingerprint
        assert float(meta["p"]) == cfg.finetune.p
        assert any(t.abs().sum() > 0 for t in tau.values())  # the specialist really moved
        assert any(k.startswith("channel_projections.") for k in tau)


@pytest.mark.slow
def test_mlflow_runs_nest(pipeline_result):
    cfg, result = pipeline_result
    client = MlflowClient(result.tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id])
    by_stage = {}
    for run in runs:
        by_stage.setdefault(run.data.tags.get("ant_ray.stage"), []).append(run)
    assert len(by_stage["pipeline"]) == 1 and len(by_stage["finetune"]) == 2 and len(by_stage["merge_trial"]) == 3
    pipeline_id = by_stage["pipeline"][0].info.run_id
    search = by_stage["merge_search"][0]
    assert search.data.tags["mlflow.parentRunId"] == pipeline_id
    for trial in by_stage["merge_trial"]:
        assert trial.data.tags["mlflow.parentRunId"] == search.info.run_id
        assert "fid100_domain" in trial.data.metrics
    assert all(r.info.status == "FINISHED" for r in runs)
    pretrain = by_stage["pretrain"][0]
    assert {"loss_curve.png", "samples.png"} <= {a.path for a in client.list_artifacts(pretrain.info.run_id)}
    assert len(client.get_metric_history(pretrain.info.run_id, "loss")) == 2  # logged per step, every 10 steps
    specialist = by_stage["finetune"][0]
    assert "consistency" in specialist.data.metrics
    best = min(t.data.metrics["fid100_domain"] for t in by_stage["merge_trial"])
    assert result.scores["DeMe merged (best weights)"] == pytest.approx(best)


def test_cli_rejects_bad_config_before_starting(capsys, tmp_path):
    assert cli_main(["demo", "--set", "finetune.p=3", "--output-dir", str(tmp_path)]) == 2
    assert "finetune.p" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_resume_keeps_finished_specialists(pipeline_result):
    cfg, first = pipeline_result
    def task_vectors():
        # safetensors writes its header's metadata in hash-map order, so compare contents, not bytes
        return {p.name: load_task_vector(p) for p in sorted((first.run_dir / "task_vectors").iterdir())}

    before = task_vectors()
    specialist_files = sorted((first.run_dir / "finetune").rglob("*.safetensors"))
    mtimes = [p.stat().st_mtime_ns for p in specialist_files]
    resumed = run_pipeline(cfg, resume=first.run_dir)
    assert resumed.run_dir == first.run_dir
    assert [p.stat().st_mtime_ns for p in specialist_files] == mtimes  # not retrained
    after = task_vectors()
    assert after.keys() == before.keys()
    for name, (tau, meta) in after.items():
        assert meta == before[name][1]
        assert all(torch.equal(tau[k], before[name][0][k]) for k in tau)
    for key in ("pretrained", "specialist 0 [0, 500]", "DeMe ensemble (before merge)"):
        assert resumed.scores[key] == pytest.approx(first.scores[key])  # same models, same sampling seed


@pytest.mark.slow
def test_resume_refuses_another_config(pipeline_result):
    cfg, first = pipeline_result
    other = load_config("search_spaces/pipeline_digits.yaml", TINY + [f"output_dir={cfg.output_dir}", "finetune.p=0.9"])
    with pytest.raises(ValueError, match="another configuration"):
        run_pipeline(other, resume=first.run_dir)
