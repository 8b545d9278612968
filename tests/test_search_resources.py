"""The search's resource check against a cluster's size, without starting Ray."""

from pathlib import Path

import ray

from ant_ray.config import load_config
from ant_ray.search import chain

SPACES = Path(__file__).resolve().parent.parent / "search_spaces"


def test_deme_merge_fits_its_own_ray_without_a_concurrency_note(monkeypatch, capsys):
    # deme_merge.yaml's deme stage is one trial: it must not claim that 2 concurrent trials overflow ray.num_cpus
    cfg = load_config(SPACES / "deme_merge.yaml")
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": float(cfg.ray.num_cpus)})
    chain._check_resources(cfg)
    assert "max_concurrent" not in capsys.readouterr().out
    # the check itself still speaks when a stage's concurrent trials do not fit
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 1.0 + cfg.finetune.resources.cpu * 2 + 0.5})
    chain._check_resources(cfg.model_copy(update={"search": cfg.search.model_copy(update={
        "deme": cfg.search.deme.model_copy(update={"max_concurrent": 2})})}))
    assert "search.deme.max_concurrent=2 trials need" in capsys.readouterr().out
