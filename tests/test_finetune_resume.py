"""The diffusion loop on Ray Train: N specialists side by side in one run (a worker each, or several in turn in one
worker), each bit-identical to training it alone, and exact resume from the run's joint checkpoint."""

import pytest

from conftest import shared_ray
import torch

from ant_ray.config import load_config
from ant_ray.deme.finetune import sample_timesteps
from ant_ray.diffusion import build_model, load_model, save_model
from ant_ray.deme.finetune import train_diffusion
from ant_ray.stages.ray_train import fit


@pytest.fixture(scope="module")
def ray_local():
    shared_ray()
    yield


def _cfg(tmp_path, steps):
    return load_config(None, [
        f"output_dir={tmp_path}", "data.resolution=8", "model.base=tiny", f"finetune.steps={steps}",
        "finetune.batch_size=32", "finetune.grad_accumulation=2", "finetune.checkpoint_every=3",
        "finetune.log_every=3", "finetune.p=0.5", "finetune.consistency_weight=1.0", "finetune.ema_decay=0.9",
        "finetune.resources={cpu: 1, num_workers: 1}"])


def test_probabilistic_sampling():
    gen = torch.Generator().manual_seed(0)
    draws = [sample_timesteps(64, 1000, (200, 300), 0.3, gen) for _ in range(400)]
    whole = [d for d in draws if not ((d >= 200) & (d < 300)).all()]
    assert 0.2 < len(whole) / len(draws) < 0.4  # a batch leaves the range with probability ~p (DeMe Eq. 6)
    inside = [d for d in draws if ((d >= 200) & (d < 300)).all()]
    assert all(d.min() >= 200 and d.max() < 300 for d in inside)
    assert all(((sample_timesteps(64, 1000, (200, 300), 0.0, gen) >= 200)).all() for _ in range(10))


@pytest.mark.slow
@pytest.mark.parametrize("per_worker", [1, 2])
def test_specialists_side_by_side_equal_specialists_alone(tmp_path, ray_local, per_worker):
    """One Ray Train run with two worker groups (or one worker training both in turn) trains exactly what a separate
    run of one specialist trains (each keeps its own seed, data order and checkpoint files), also when that run is
    interrupted after a checkpoint and resumed: bit-identical, with consistency loss, probabilistic sampling and
    gradient accumulation. The resumed run is given other initial weights, so only a real resume from the joint
    checkpoint can match."""
    base = save_model(build_model("tiny", resolution=8, channels=1, seed=0), tmp_path / "base")
    other = save_model(build_model("tiny", resolution=8, channels=1, seed=1), tmp_path / "other")

    def spec(i, out, init=base):
        return {"range": [0, 500] if i == 0 else [500, 1000], "init_model": str(init), "teacher_model": str(base),
                "output_model": str(out), "tracking": None, "seed": 10 + i}

    def train(models, name, steps):
        run_cfg = _cfg(tmp_path, steps)
        fit(train_diffusion, {"pipeline": run_cfg.worker_dump(), "section": "finetune", "name": name,
                              "models": models, "models_per_worker": per_worker if len(models) > 1 else 1,
                              "evaluation": None},
            name=name, storage=tmp_path / "ray", resources=run_cfg.finetune.resources, models=len(models))

    train([spec(i, tmp_path / f"half_{i}") for i in range(2)], "joint", steps=3)  # stops after its step-3 checkpoint
    train([spec(i, tmp_path / f"joint_{i}", other) for i in range(2)], "joint", steps=4)  # resumes both at step 3
    train([spec(1, tmp_path / "alone_1")], "alone", steps=4)  # specialist 1 (worker group 1) on its own
    joint, alone = load_model(tmp_path / "joint_1").state_dict(), load_model(tmp_path / "alone_1").state_dict()
    initial = load_model(base).state_dict()
    assert any(not torch.equal(initial[k], alone[k]) for k in alone)
    for key in alone:
        torch.testing.assert_close(joint[key], alone[key], rtol=0, atol=0, msg=key)


def test_specialists_trained_in_turn_by_one_worker_equal_specialists_alone(tmp_path):
    """finetune.specialists_per_worker: one worker trains three specialists in turn (its own seed, data order,
    teacher and range each), and specialist 1 comes out bit-identical to a run that trains it alone. Ray Train's
    local mode (num_workers 0) runs both in this process, so nothing but the packing differs."""
    base = save_model(build_model("tiny", resolution=8, channels=1, seed=0), tmp_path / "base")
    ranges = [[0, 300], [300, 700], [700, 1000]]

    def spec(i, out):
        return {"range": ranges[i], "init_model": str(base), "teacher_model": str(base), "output_model": str(out),
                "tracking": None, "seed": 10 + i}

    run_cfg = load_config(None, [
        f"output_dir={tmp_path}", "data.resolution=8", "data.limit=256", "model.base=tiny", "finetune.steps=4",
        "finetune.batch_size=32", "finetune.grad_accumulation=2", "finetune.checkpoint_every=2",
        "finetune.log_every=2", "finetune.p=0.5", "finetune.consistency_weight=1.0", "finetune.ema_decay=0.9",
        "finetune.resources={cpu: 1, num_workers: 0}", "finetune.specialists_per_worker=3"])
    for name, models, per_worker in [("packed", [spec(i, tmp_path / f"packed_{i}") for i in range(3)], 3),
                                     ("alone", [spec(1, tmp_path / "alone_1")], 1)]:
        fit(train_diffusion, {"pipeline": run_cfg.worker_dump(), "section": "finetune", "name": name,
                              "models": models, "models_per_worker": per_worker, "evaluation": None},
            name=name, storage=tmp_path / "ray", resources=run_cfg.finetune.resources, models=len(models))
    packed = [load_model(tmp_path / f"packed_{i}").state_dict() for i in range(3)]
    alone = load_model(tmp_path / "alone_1").state_dict()
    initial = load_model(base).state_dict()
    assert all(any(not torch.equal(initial[k], state[k]) for k in state) for state in packed)
    assert any(not torch.equal(packed[0][k], packed[1][k]) for k in alone)  # the three really differ
    for key in alone:
        torch.testing.assert_close(packed[1][key], alone[key], rtol=0, atol=0, msg=key)


def test_packing_specialists_needs_single_worker_groups():
    with pytest.raises(Exception, match="specialists_per_worker=2 needs finetune.resources.num_workers 1"):
        load_config(None, ["finetune.specialists_per_worker=2", "finetune.resources={cpu: 1, num_workers: 2}"])
