"""A tiny chained search through all three stages on real local Ray, real MLflow (SQLite), Optuna and FID:
ant (a 2-point grid whose second point trains too slowly, so ASHA stops it) -> deme (ranges from the ant
winner's intervals) -> merge (successive halving over 50 -> 100 samples, anchors first) -> final score."""

import json
import math

import optuna
import pytest
from mlflow.tracking import MlflowClient

import ant_ray

from ant_ray.config import load_config
from ant_ray.diffusion import load_model
from ant_ray.search.chain import run_search
from ant_ray.search.searchers import journal_storage

TINY_SEARCH = [
    "ray.num_cpus=4", "fid.batch_size=50", "sampler.steps=4",
    # ant: 2 grid points, one after the other. lr 1e-7 leaves the model at its initialisation; 30 steps at lr 0.003
    # make this tiny model's samples worse than that (FID 545 against 388), so ASHA stops the second trial at step 30
    "ant.steps=60", "ant.batch_size=64", "ant.log_every=30", "ant.checkpoint_every=30", "ant.k=2",
    "ant.ema_decay=0.5", "search.ant.space={ant.lr: {type: categorical, choices: [1.0e-7, 0.003]}}",
    "search.ant.max_concurrent=1", "search.ant.eval_every=30", "search.ant.scheduler.grace_period=30",
    "search.ant.num_samples=100",
    # deme: one TPE trial (the config's p), N = the ant winner's k = 2 specialists side by side in one Ray Train run
    "finetune.steps=10", "finetune.batch_size=32", "finetune.log_every=5", "finetune.checkpoint_every=10",
    "finetune.resources={cpu: 0.5, num_workers: 1}", "search.deme.num_trials=1", "search.deme.max_concurrent=1",
    "search.deme.num_samples=50",
    # merge: 5 candidates at 50 samples (the 4 anchors first), the best 2 at 100
    "search.merge.fidelities=[50, 100]", "search.merge.num_candidates=5",
    "search.final.num_samples=100", "search.final.seeds=[0, 1]",
]


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    out = tmp_path_factory.mktemp("search")
    cfg = load_config("search_spaces/quickstart.yaml", TINY_SEARCH + [f"output_dir={out}"])
    yield cfg, run_search(cfg)


def _runs(cfg, result):
    client = MlflowClient(result.tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id], max_results=500)
    by_stage = {}
    for run in runs:
        by_stage.setdefault(run.data.tags.get("ant_ray.stage"), []).append(run)
    return client, runs, by_stage


def test_result_names_every_stage(search):
    cfg, result = search
    assert list(result.stages) == ["ant", "deme", "merge"]
    assert result.best["ant"] == {"ant.lr": 1e-7}
    assert set(result.best["deme"]) == {"finetune.p"}
    assert len(result.best["merge"]["weights"]) == 2  # the ant winner's k = 2 intervals -> 2 specialists
    assert result.scores["ant"][0] == "fid100_domain" and result.scores["merge"][0] == "fid100_domain"
    assert result.final.metric == "fid100_domain" and len(result.final.scores) == 2
    assert result.final.half_width is not None and math.isfinite(result.final.mean)
    assert load_model(result.winner_model).config.sample_size == 8  # saved in diffusers format
    trials = result.trials
    assert set(trials["stage"]) == {"ant", "deme", "merge"}
    # one schema for every stage, then the stages' parameters
    assert list(trials.columns) == ["stage", "trial_id", "fate", "metric", "score", "step", "fidelity", "ant.lr",
                                    "finetune.p", "w0", "w1"]
    assert trials["trial_id"].notna().all() and trials["fate"].notna().all() and trials["score"].notna().all()
    ant = trials[trials["stage"] == "ant"]
    assert list(ant["fate"]) == ["finished", "stopped_early"]  # ASHA stopped the lr=0.003 trial at step 30
    assert ant[ant["fate"] == "stopped_early"]["step"].item() == 30
    assert set(ant["metric"]) == {"fid100_domain"}
    merge = trials[trials["stage"] == "merge"]  # a candidate per row, at the last fidelity it reached
    assert len(merge) == 5 and sorted(merge["fate"]) == ["finished"] * 2 + ["stopped_early"] * 3
    assert set(merge[merge["fate"] == "finished"]["fidelity"]) == {100}
    table = result.table()
    for text in ("ant", "1 stopped early", "weights", "final: fid100_domain", "winner model", "ui --output-dir",
                 "search run (figures, trials table): http://127.0.0.1:5000/#/experiments/"):
        assert text in table


def test_mlflow_nests_search_stages_trials_and_train_runs(search):
    cfg, result = search
    client, runs, by_stage = _runs(cfg, result)
    (parent,) = by_stage["search"]
    assert parent.info.run_id == result.parent_run_id and parent.info.status == "FINISHED"
    for stage in ("ant", "deme", "merge"):
        (stage_run,) = by_stage[f"{stage}_search"]
        assert stage_run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        for trial in by_stage[f"{stage}_trial"]:
            assert trial.data.tags["mlflow.parentRunId"] == stage_run.info.run_id
    ant_trials = {r.info.run_id: r for r in by_stage["ant_trial"]}
    assert len(ant_trials) == 2 and len(by_stage["deme_trial"]) == 1
    stopped = [r for r in ant_trials.values() if r.data.tags.get("ant_ray.fate") == "stopped_early"]
    assert len(stopped) == 1 and stopped[0].info.status == "FINISHED"  # KILLED is for signals
    for trial in ant_trials.values():
        assert {"ant_ray.k", "ant_ray.method", "ant_ray.clustering", "ant_ray.fid_extractor",
                "ant_ray.fidelity"} <= set(trial.data.tags)
        assert "ant.lr" in trial.data.params
        history = client.get_metric_history(trial.info.run_id, "fid100_domain")
        steps = [m.step for m in history]
        assert steps[:1] == [30] and len(steps) == len(set(steps))  # FID at fixed steps, each once
    for train in by_stage["ant_train"]:  # a grandchild per Ray Train run
        assert train.data.tags["mlflow.parentRunId"] in ant_trials
    for deme in by_stage["deme_trial"]:
        assert {"ant_ray.p", "ant_ray.num_specialists"} <= set(deme.data.tags)
        specialists = [r for r in by_stage["finetune"] if r.data.tags["mlflow.parentRunId"] == deme.info.run_id]
        assert len(specialists) == 2 and all("loss" in r.data.metrics for r in specialists)
    promoted = [r for r in by_stage["merge_trial"] if "fid100_domain" in r.data.metrics]
    assert len(by_stage["merge_trial"]) == 5 and len(promoted) == 2  # one run per candidate, a metric per fidelity
    assert all("fid50_domain" in r.data.metrics for r in by_stage["merge_trial"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "trials.json", "samples.png", "summary.txt"} <= artifacts
    (merge_run,) = by_stage["merge_search"]
    figures = {a.path for a in client.list_artifacts(merge_run.info.run_id, "figures")}
    assert {"figures/merge_landscape.png", "figures/optimization_history.png"} <= figures
    on_parent = {a.path for a in client.list_artifacts(parent.info.run_id, "figures/merge")}
    assert {"figures/merge/merge_landscape.png", "figures/merge/optimization_history.png"} <= on_parent
    assert all(r.info.status == "FINISHED" for r in runs)
    # the saved runs view shows the searched values beside the FID columns
    views = [json.loads(json.loads(v)["state"])["selectedColumns"]
             for k, v in client.get_experiment(parent.info.experiment_id).tags.items()
             if k.startswith("mlflow.sharedViewState.ant_ray-")]
    assert any({"params.`ant.lr`", "params.`finetune.p`", "params.`w0`", "params.`w1`",
                "metrics.`fid100_domain`"} <= set(columns) for columns in views)


def test_merge_scores_the_anchors_first(search):
    cfg, result = search
    study = optuna.load_study(storage=journal_storage(result.search_dir / "optuna.journal"),
                              study_name=f"{result.search_dir.name}-merge")
    first = [[t.params["w0"], t.params["w1"]] for t in sorted(study.trials, key=lambda t: t.number)[:4]]
    assert first == [[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]
    # the searcher saw rung-0 scores only, under rung 0's metric
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) and len(study.trials) == 5
    # the winner never loses to a specialist alone at the same fidelity
    merge = result.stages["merge"].trials()  # the stage's own table: a row per candidate and rung
    top = merge[merge["rung"] == merge["rung"].max()]
    assert result.stages["merge"].best_score == top["fid"].min()
    # one model, one sample count, one score: the anchor (1, 1) is task arithmetic, which the deme trial scored in
    # its loop on the same 50 samples (same seed, same batches)
    rung0 = merge[merge["rung"] == 0]
    arithmetic = rung0[(rung0["w0"] == 1.0) & (rung0["w1"] == 1.0)]["fid"].item()
    assert arithmetic == pytest.approx(result.stages["deme"].best_score, rel=1e-4)


def test_resuming_a_finished_search_reruns_no_stage(search):
    """A chained search continues at the stage it had reached: here it had finished, so nothing runs again and
    nothing is logged again; the result is the one it saved."""
    cfg, result = search
    client = MlflowClient(result.tracking_uri)
    logged = client.get_run(result.parent_run_id).data.metrics
    lines = []
    again = run_search(cfg, resume=result.search_dir, log=lines.append)
    assert any("this search had finished: nothing to resume" in line for line in lines)
    assert again.best == result.best and again.parent_run_id == result.parent_run_id
    assert again.final.scores == result.final.scores and again.seconds == result.seconds
    assert again.table() == result.table()
    assert client.get_run(result.parent_run_id).data.metrics == logged
    assert list(again.trials["trial_id"]) == list(result.trials["trial_id"])
    assert list(again.trials["fate"]) == list(result.trials["fate"])
    from_python = ant_ray.launch_search(resume=result.search_dir)  # from Python: the folder alone
    assert from_python.best == result.best and from_python.final.scores == result.final.scores
    _, runs, by_stage = _runs(cfg, again)
    assert len(by_stage["search"]) == 1 and len(by_stage["ant_trial"]) == 2 and len(by_stage["merge_trial"]) == 5
    assert by_stage["search"][0].info.status == "FINISHED"
