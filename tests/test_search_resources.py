"""The search's resource check against a cluster's size, without starting Ray."""

from pathlib import Path

import ray

from ant_ray.config import load_config
from ant_ray.search import chain

SPACES = Path(__file__).resolve().parent.parent / "search_spaces"


def test_a_one_trial_stage_gets_no_concurrency_note(monkeypatch, capsys):
    # deme_merge.yaml's and cifar10_deme_merge.yaml's deme stages are one trial each (the latter with the default
    # max_concurrent of 2): neither may claim that 2 concurrent trials overflow the cluster
    for name in ("deme_merge.yaml", "cifar10_deme_merge.yaml"):
        cfg = load_config(SPACES / name)
        one_trial = cfg.search.deme.resources.cpu + cfg.finetune.resources.cpu * cfg.finetune.num_specialists
        monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": one_trial + 0.5, "GPU": 8.0})
        chain._check_resources(cfg)
        assert "max_concurrent" not in capsys.readouterr().out, name


def test_the_note_speaks_when_concurrent_trials_do_not_fit(monkeypatch, capsys):
    cfg = load_config(SPACES / "quickstart.yaml")  # 4 ant trials, 2 at a time
    one_trial = cfg.search.ant.resources.cpu + cfg.ant.resources.cpu * max(1, cfg.ant.resources.num_workers)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": one_trial * 1.5})
    chain._check_resources(cfg.model_copy(update={"search": cfg.search.model_copy(update={"deme": None,
                                                                                        "merge": None})}))
    assert f"search.ant.max_concurrent={cfg.search.ant.max_concurrent} trials need" in capsys.readouterr().out
