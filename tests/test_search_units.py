"""The search's pieces without a cluster: the `search:` config, successive-halving bookkeeping, the fidelity-aware
Optuna searcher, anchors, spaces and resumable FID streams."""

import math
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
import torch

from ant_ray.cli import main as cli_main
from ant_ray.config import ConfigError, SearcherConfig, load_config
from ant_ray.fid import StreamingFeatureStats, extend_feature_stream
from ant_ray.merge import anchor_weights
from ant_ray.search.callbacks import TrialStatusPrinter
from ant_ray.search.fidelity import Ladder, rung_sizes
from ant_ray.search import merge_stage
from ant_ray.search.merge_stage import (MergePlan, anchor_points, grid_coarse_points, grid_fine_points,
                                        parameter_names, run_merge_stage)
from ant_ray.search.searchers import FidelityAwareOptunaSearch
from ant_ray.search.space import grid_points, optuna_space

ANT_K = "search.ant.space.ant.k={type: int, low: 2, high: 4}"


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("overrides, field", [
    (["search.ant.space.ant.k={type: int, low: 0, high: 4}"], "search.ant.space[ant.k]"),
    (["search.ant.space.ant.kk={type: int, low: 1, high: 4}"], "search.ant.space[ant.kk]"),
    (["search.ant.space.finetune.p={type: float, low: 0, high: 1}"], "search.ant.space[finetune.p]"),
    (["search.ant.space.ant.method={type: categorical, choices: [uw, nope]}"], "search.ant.space[ant.method]"),
    (["search.ant.space.ant.k={type: integer, low: 1, high: 4}"], "search.ant.space[ant.k]"),
    (["search.ant.space.ant.lr={type: float, low: 0, high: 1, log: true}"], "search.ant.space[ant.lr]"),
    (["search.ant.space.ant.affinity.buckets={type: int, low: 2, high: 9}"], "search.ant.space[ant.affinity.buckets]"),
    ([ANT_K, "search.ant.scheduler.name=asha"], "search.ant"),
    ([ANT_K, "search.ant.eval_every=300"], "search.ant.eval_every"),
    ([ANT_K, "search.ant.searcher.name=grid", "search.ant.num_trials=5"], "search.ant"),
    ([ANT_K, "search.ant.searcher.name=cmaes",
      "search.ant.space.ant.method={type: categorical, choices: [uw]}"], "search.ant"),
    (["search.ant.num_trials=0"], "search.ant.num_trials"),
    (["search.deme.ranges=ant"], "search.deme.ranges"),
    (["search.merge.fidelities=[1000, 500]"], "search.merge"),
    (["search.merge.num_candidates=4"], "search.merge.task_vectors"),
    (["search.merge.task_vectors=[a.safetensors]"], "search.merge"),
    (["search={}"], "search"),
    (["search.bogus.x=1"], "search.bogus"),
])
def test_bad_search_sections_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        load_config("search_spaces/quickstart.yaml", ["search=null"] + overrides)
    assert field in str(err.value)


def test_merge_fidelities_continue_in_the_batches_every_stage_samples_in():
    merge = ["search=null", "search.merge.task_vectors=[a.safetensors]", "search.merge.base_model=b"]
    with pytest.raises(ConfigError) as err:
        load_config("search_spaces/quickstart.yaml", merge + ["search.merge.fidelities=[100, 200, 300]"])
    assert "search.merge.fidelities: [100, 200] must be multiples of fid.batch_size (250)" in str(err.value)
    assert "fid.batch_size=100" in str(err.value)
    # the last fidelity is never continued, so it may end in a part batch
    load_config("search_spaces/quickstart.yaml", merge + ["search.merge.fidelities=[250, 600]"])


def test_space_overrides_reach_dotted_keys():
    cfg = load_config("search_spaces/quickstart.yaml", [ANT_K, "search.ant.space.ant.k.high=6",
                                                       "search.ant.space.ant.weighting.name="
                                                       "{type: categorical, choices: [uniform, min-snr]}"])
    assert cfg.search.ant.space["ant.k"].high == 6
    assert cfg.search.ant.space["ant.weighting.name"].choices == ["uniform", "min-snr"]


def test_bad_search_fails_before_anything_starts(tmp_path, capsys):
    code = cli_main(["search", "search_spaces/quickstart.yaml", "--output-dir", str(tmp_path),
                     "--set", "search.ant.space.ant.k={type: int, low: 0, high: 3}"])
    assert code == 2
    assert "search.ant.space[ant.k]" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # no store, no search folder, Ray never started


def test_shipped_search_configs_validate():
    from pathlib import Path

    shipped = sorted(Path("search_spaces").glob("*.yaml"))
    assert len(shipped) >= 10
    for path in shipped:
        load_config(path)


# ------------------------------------------------------------------------------------------------ fidelity


def test_rung_sizes():
    assert rung_sizes(16, 3, 3) == [16, 6, 2]
    assert rung_sizes(8, 3, 3) == [8, 3, 1]
    assert rung_sizes(2, 4, 3) == [2, 1, 1, 1]


def test_ladder_never_ranks_across_fidelities():
    ladder = Ladder([1000, 2500, 5000])
    for name, fid in {"a": 40.0, "b": 30.0, "c": 35.0, "d": 50.0}.items():
        ladder.record(0, name, 1000, fid)
    with pytest.raises(ValueError, match="at 1000 samples"):
        ladder.record(0, "e", 5000, 1.0)  # a 5K score cannot enter the 1K rung
    with pytest.raises(ValueError, match="not scored at rung 0"):
        ladder.record(1, "e", 2500, 1.0)  # nor skip a rung
    assert ladder.promote(0, 2) == ["b", "c"]
    ladder.record(1, "b", 2500, 33.0)
    ladder.record(1, "c", 2500, 31.0)
    # rung 1 is ranked by its own scores: c now beats b, and a's lower-fidelity 40 plays no part
    assert ladder.promote(1, 1) == ["c"]
    # the winner is the best of the highest rung reached, even though b scored a lower number at 1K
    assert ladder.best() == ("c", 2500, 31.0)
    ladder.record(2, "c", 5000, 32.5)
    assert ladder.best() == ("c", 5000, 32.5)


def test_ladder_ranks_diverged_last_and_keeps_first_on_ties():
    ladder = Ladder([100])
    for name, fid in [("anchor", 10.0), ("nan", math.inf), ("later", 10.0), ("worse", 12.0)]:
        ladder.record(0, name, 100, fid)
    assert ladder.promote(0, 4) == ["anchor", "later", "worse", "nan"]


# ------------------------------------------------------------------------------------------------ anchors


def test_anchor_weights():
    assert anchor_weights(2, 0.0, 1.5) == [[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]
    assert anchor_weights(1, 0.0, 1.5) == [[1.0]]  # all three coincide for one task vector
    assert anchor_weights(3, 0.2, 1.5) == [[1.0, 1.0, 1.0], [1 / 3] * 3]  # one-hots fall outside [0.2, 1.5]
    points = anchor_points(2, ["down", "up"], 0.0, 1.5)
    assert points[1] == {"down.w0": 1.0, "down.w1": 0.0, "up.w0": 1.0, "up.w1": 0.0}
    assert parameter_names(2, None) == ["w0", "w1"]


def test_the_grid_scores_the_anchors_first():
    cfg = load_config(None, ["merge_search.weight_low=0", "merge_search.weight_high=1.5",
                             "merge_search.grid_step=0.4", "merge_search.grid_fine_step=0.2"])
    coarse = grid_coarse_points(3, None, cfg.merge_search)
    # the anchors lead, the uniform mean included; with step 0.4 none of them is a point of the grid itself
    assert [list(p.values()) for p in coarse[:5]] == anchor_weights(3, 0.0, 1.5)
    assert len(coarse) == 5 + 4 ** 3
    # the fine grid around the uniform mean: 1/3 + (-0.2, 0, 0.2, 0.4) on each axis (1/3 - 0.4 is outside the box),
    # the mean itself left out (scored already)
    fine = grid_fine_points(coarse[4], coarse, cfg.merge_search)
    assert len(fine) == 4 ** 3 - 1 and coarse[4] not in fine
    assert {round(p["w0"] - 1 / 3, 6) for p in fine} == {-0.2, 0.0, 0.2, 0.4}
    # with a step that lands on them, the anchors are scored once, not twice
    cfg = load_config(None, ["merge_search.weight_high=1.5", "merge_search.grid_step=0.25"])
    assert len(grid_coarse_points(3, None, cfg.merge_search)) == 1 + 7 ** 3  # only the uniform mean is off-grid


class _FakeRungs:
    """Stands in for `merge_stage._run_rung` (one Tune run): scores every point it is given with a smooth function
    of the weights, so the stage's planning runs without Ray."""

    def __init__(self, target, fail=0):
        self.target, self.fail, self.runs = target, fail, []

    def __call__(self, setup, context, plan, stage_dir, name, rung, fidelity, metric, param_space, *, searcher=None,
                 num_samples=1):
        if searcher is not None:  # an Optuna rung: what the searcher would propose, anchors first
            points = list(searcher._points_to_evaluate)
            points += [{p: 0.1 * i for p in context.param_names} for i in range(num_samples - len(points))]
            points = points[:num_samples - self.fail]  # as if `fail` candidates crashed
        else:
            points = param_space["point"]["grid_search"]
        self.runs.append((name, points))
        below = plan.fidelities[rung - 1] if rung else 0
        return [{"candidate": ",".join(f"{v:.10g}" for v in p.values()), "params": p, "images": fidelity - below,
                 "fid": sum((p[k] - t) ** 2 for k, t in zip(context.param_names, self.target)) + 1 / fidelity,
                 "trial_id": None} for p in points]


def _merge_stage_setup(tmp_path, overrides):
    cfg = load_config(None, [f"output_dir={tmp_path}", "fid.batch_size=250"] + overrides)
    lines = []
    setup = SimpleNamespace(cfg=cfg, search_dir=tmp_path, tracking_uri="sqlite://", experiment_id="0",
                            stage_run=SimpleNamespace(run_id="stage"), study_name="units", resume=False,
                            log=lines.append)
    return cfg, setup, lines


def test_the_grid_promotes_a_third_of_what_it_scored(tmp_path, monkeypatch):
    """Issue 19: N = 3, box [0, 1.5], steps 0.25 / 0.05, fidelities [250, 500], eta 3. Rung 1 continues
    ceil(scored / 3) of rung 0's candidates (it used to be ceil(num_candidates / 3) = 6 of 1,647)."""
    box = ["merge_search.weight_low=0", "merge_search.weight_high=1.5", "merge_search.grid_step=0.25",
           "merge_search.grid_fine_step=0.05"]
    cfg, setup, lines = _merge_stage_setup(tmp_path, box)
    rungs = _FakeRungs(target=(0.6, 0.35, 0.9))
    monkeypatch.setattr(merge_stage, "_run_rung", rungs)
    plan = MergePlan(fidelities=[250, 500], num_candidates=16, reduction_factor=3,
                     searcher=SearcherConfig(name="grid"), max_concurrent=2, cpu=1, gpu=0)
    outcome = run_merge_stage(setup, base_model=tmp_path, task_vectors=[tmp_path / f"tv{i}" for i in range(3)],
                              plan=plan, merge=cfg.merge_search)
    (coarse_name, coarse), (fine_name, fine), (rung1_name, rung1) = rungs.runs
    assert (coarse_name, fine_name, rung1_name) == ("rung0-coarse", "rung0-fine", "rung1")
    assert [list(p.values()) for p in coarse[:5]] == anchor_weights(3, 0.0, 1.5)  # the anchors first
    scored = len(coarse) + len(fine)
    assert scored > 1000 and len(rung1) == math.ceil(scored / 3)
    assert outcome.extra["rung_sizes"] == [scored, math.ceil(scored / 3)]
    assert lines[0].startswith("merge stage: 3 task vectors, candidates per rung at most [1679, 560] at [250, 500]")
    assert f"merge stage: candidates per rung [{scored}, {math.ceil(scored / 3)}] at [250, 500] samples" in lines
    assert outcome.winner["weights"] == [0.6, 0.35, 0.9]


def test_the_uniform_mean_can_win_the_grid(tmp_path, monkeypatch):
    """An anchor off the grid is scored too, so the grid cannot miss the uniform mean (1/N, ..., 1/N)."""
    cfg, setup, _ = _merge_stage_setup(tmp_path, ["merge_search.weight_low=0", "merge_search.weight_high=1.5",
                                                  "merge_search.grid_step=0.25", "merge_search.grid_fine_step=0.05"])
    monkeypatch.setattr(merge_stage, "_run_rung", _FakeRungs(target=(1 / 3, 1 / 3, 1 / 3)))
    plan = MergePlan(fidelities=[250], num_candidates=1, reduction_factor=3, searcher=SearcherConfig(name="grid"),
                     max_concurrent=2, cpu=1, gpu=0)
    outcome = run_merge_stage(setup, base_model=tmp_path, task_vectors=[tmp_path / f"tv{i}" for i in range(3)],
                              plan=plan, merge=cfg.merge_search)
    assert outcome.winner["weights"] == [1 / 3] * 3


def test_optuna_rungs_promote_a_third_of_what_was_scored(tmp_path, monkeypatch):
    """Two of 16 candidates crashed: rung 1 continues ceil(14 / 3) = 5, and the log says so."""
    cfg, setup, lines = _merge_stage_setup(tmp_path, [])
    rungs = _FakeRungs(target=(0.8, 0.2), fail=2)
    monkeypatch.setattr(merge_stage, "_run_rung", rungs)
    plan = MergePlan(fidelities=[250, 500, 1000], num_candidates=16, reduction_factor=3,
                     searcher=SearcherConfig(name="tpe", seed=0), max_concurrent=2, cpu=1, gpu=0)
    run_merge_stage(setup, base_model=tmp_path, task_vectors=[tmp_path / "tv0", tmp_path / "tv1"], plan=plan,
                    merge=cfg.merge_search)
    assert [len(points) for _, points in rungs.runs] == [14, 5, 2]
    assert [list(p.values()) for p in rungs.runs[0][1][:4]] == anchor_weights(2, 0.0, 1.5)
    assert lines[0].startswith("merge stage: 2 task vectors, candidates per rung [16, 6, 2] at [250, 500, 1000]")
    assert "merge stage: candidates per rung [14, 5, 2] at [250, 500, 1000] samples" in lines


# ------------------------------------------------------------------------------------------------ the searcher


def _searcher(final_step=100):
    space = {"x": optuna.distributions.FloatDistribution(0, 1)}
    return FidelityAwareOptunaSearch(space=space, metric="fid", mode="min", final_step=final_step,
                                     sampler=optuna.samplers.RandomSampler(seed=0))


def test_searcher_is_told_the_fidelity_of_every_score():
    searcher = _searcher()
    for trial_id in ("finished", "stopped", "diverged", "crashed"):
        searcher.suggest(trial_id)
    for trial_id in ("finished", "stopped"):
        searcher.on_trial_result(trial_id, {"fid": 50.0, "step": 50})
    searcher.on_trial_result("finished", {"fid": 40.0, "step": 100})
    searcher.on_trial_complete("finished", {"fid": 40.0, "step": 100})
    searcher.on_trial_complete("stopped", {"fid": 50.0, "step": 50})  # ASHA stopped it at step 50
    searcher.on_trial_complete("diverged", {"fid": math.inf, "step": 0, "diverged": 1})
    searcher.on_trial_complete("crashed", None, error=True)
    trials = {t.user_attrs["tune_trial_id"]: t for t in searcher._ot_study.trials}
    assert trials["finished"].state == optuna.trial.TrialState.COMPLETE and trials["finished"].value == 40.0
    assert trials["finished"].intermediate_values == {50: 50.0, 100: 40.0}
    # never COMPLETE with a low-fidelity score: pruned, its step-50 score kept as what it is
    assert trials["stopped"].state == optuna.trial.TrialState.PRUNED
    assert trials["stopped"].intermediate_values == {50: 50.0}
    assert trials["diverged"].state == optuna.trial.TrialState.COMPLETE and trials["diverged"].value == math.inf
    assert trials["crashed"].state == optuna.trial.TrialState.FAIL


def test_a_rebuilt_searcher_does_not_enqueue_its_first_points_again(tmp_path):
    """A resume builds the stage's searcher again on the same journal: the config's point, enqueued when the study
    was created, must wait there once, not twice (it would run twice)."""
    from ray import tune

    from ant_ray.search.searchers import build_optuna_search, journal_storage

    for _ in range(2):
        build_optuna_search(SearcherConfig(), space={"x": tune.uniform(0, 1)}, metric="fid", seed=0,
                            points_to_evaluate=[{"x": 0.5}], storage_path=tmp_path / "journal.log", study_name="ant",
                            final_step=10)
    storage = journal_storage(tmp_path / "journal.log")
    trials = storage.get_all_trials(storage.get_study_id_from_name("ant"))
    assert [(t.state, t.params or t.system_attrs.get("fixed_params")) for t in trials] == [
        (optuna.trial.TrialState.WAITING, {"x": 0.5})]


def test_searcher_finds_a_trial_its_pickle_forgot():
    searcher = _searcher()
    searcher.suggest("t1")
    searcher._ot_trials.clear()  # as after a restore from a searcher checkpoint older than the trial
    searcher.on_trial_result("t1", {"fid": 3.0, "step": 100})
    searcher.on_trial_complete("t1", {"fid": 3.0, "step": 100})
    (trial,) = searcher._ot_study.trials
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == 3.0


# ------------------------------------------------------------------------------------------------ spaces


def test_spaces():
    cfg = load_config("search_spaces/quickstart.yaml")
    space = cfg.search.ant.space
    assert grid_points(space) == [{"ant.k": 2, "ant.method": "uw"}, {"ant.k": 2, "ant.method": "nash_mtl"},
                                  {"ant.k": 3, "ant.method": "uw"}, {"ant.k": 3, "ant.method": "nash_mtl"}]
    dists = optuna_space(space)
    assert dists["ant.k"] == optuna.distributions.IntDistribution(2, 3)
    assert dists["ant.method"] == optuna.distributions.CategoricalDistribution(["uw", "nash_mtl"])


# ------------------------------------------------------------------------------------------------ FID streams


class _Features:
    name, feature_dim = "toy", 3

    def features(self, images):
        return images.flatten(1)[:, :3].double().numpy()


def _sampler(size, seed):
    return torch.randn(size, 1, 2, 2, generator=torch.Generator().manual_seed(seed))


def test_a_continued_stream_equals_a_fresh_one(tmp_path):
    fresh = extend_feature_stream(_sampler, None, 250, 50, _Features(), seed=7)
    first = extend_feature_stream(_sampler, None, 100, 50, _Features(), seed=7)
    first.save(tmp_path / "s.npz")
    continued = extend_feature_stream(_sampler, StreamingFeatureStats.load(tmp_path / "s.npz"), 250, 50,
                                      _Features(), seed=7)
    assert continued.n == fresh.n == 250
    a, b = continued.to_stats(), fresh.to_stats()
    np.testing.assert_allclose(a.mu, b.mu, rtol=1e-12)
    np.testing.assert_allclose(a.sigma, b.sigma, rtol=1e-10)
    with pytest.raises(ValueError, match="whole batch"):
        extend_feature_stream(_sampler, extend_feature_stream(_sampler, None, 30, 30, _Features(), 7), 100, 50,
                              _Features(), 7)


def test_a_training_trials_process_does_not_import_the_training_stack():
    """A Tune trial of the ant / deme stage only builds and watches its Ray Train run: importing the trial functions
    (as its process does, to unpickle them) and the loop entry points (as Ray Train pickles them) must not load
    diffusers, the data or the scorer, which cost every trial's process about 5 CPU-seconds."""
    import subprocess
    import sys

    code = ("import sys, ant_ray.search.trials, ant_ray.stages.train_loops, ant_ray.search.callbacks; "
            "print(sorted(m for m in ('diffusers', 'sklearn', 'ant_ray.evaluation', 'ant_ray.ant.train', "
            "'ant_ray.deme.finetune') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]", f"a trial's process imports {loaded}"


def test_the_status_line_shows_the_best_of_every_trial_including_those_a_resume_restored():
    """A resumed stage restores finished trials without completing them again: the best must still count them."""
    lines = []
    printer = TrialStatusPrinter("ant", "fid50", 20, lines.append)

    def trial(status, fid, lr, step=20):
        return SimpleNamespace(status=status, last_result={"fid50": fid, "step": step},
                               config={"point": {"ant.lr": lr}})

    restored = trial("TERMINATED", 422.29, 0.002)
    stopped = trial("TERMINATED", 100.0, 0.01, step=10)  # stopped early: its score is not a final one
    ending = trial("RUNNING", 449.37, 0.003)
    printer.on_trial_complete(0, [restored, stopped, ending], ending)
    assert lines == ["ant trials: 2 finished, 1 stopped early | best fid50 422.290 (ant.lr=0.002)"]


def test_a_resume_with_another_config_names_what_differs(tmp_path):
    from ant_ray.search.chain import prepare_search_dir

    cfg = load_config("search_spaces/quickstart.yaml", [f"output_dir={tmp_path / 'a'}"])
    search_dir, _ = prepare_search_dir(cfg, None)
    # Ray's section may change (a cluster instead of the private Ray); anything else may not
    assert prepare_search_dir(load_config("search_spaces/quickstart.yaml", [f"output_dir={tmp_path / 'a'}",
                                                                            "ray.num_cpus=8"]), search_dir)
    other = load_config("search_spaces/quickstart.yaml", [f"output_dir={tmp_path / 'b'}", "ant.lr=0.1"])
    with pytest.raises(ValueError) as err:
        prepare_search_dir(other, search_dir)
    message = str(err.value)
    assert "ant.lr: 0.002 there, 0.1 here" in message
    assert f"output_dir: '{tmp_path / 'a'}' there, '{tmp_path / 'b'}' here" in message
    assert "--resume alone" in message


def test_printed_hints_name_a_command_the_shell_will_find(monkeypatch, tmp_path):
    """scripts/demo.sh runs .venv/bin/ant-ray without activating the virtualenv: a hint then gives the path."""
    import sys
    from pathlib import Path

    from ant_ray.commands import command

    ours = Path(sys.executable).parent / "mlflow"
    assert ours.is_file()
    monkeypatch.setenv("PATH", str(ours.parent))
    assert command("mlflow") == "mlflow"
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.chdir(ours.parent.parent)
    assert command("mlflow") == str(Path(ours.parent.name) / "mlflow")
    assert command("no-such-command-here") == "no-such-command-here"
