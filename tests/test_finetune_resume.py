"""The diffusion loop on Ray Train: a run interrupted after a checkpoint and resumed ends bit-identical to an
uninterrupted run (DeMe specialist with consistency loss, probabilistic sampling and gradient accumulation)."""

import pytest
import ray
import torch

from ant_ray.config import load_config
from ant_ray.deme.finetune import sample_timesteps
from ant_ray.diffusion import build_model, load_model, save_model
from ant_ray.stages.ray_runtime import start_ray
from ant_ray.stages.diffusion_train import fit_diffusion


@pytest.fixture(scope="module")
def ray_local():
    start_ray(None, num_cpus=4)
    yield
    ray.shutdown()


def _cfg(tmp_path, steps):
    return load_config(None, [
        f"output_dir={tmp_path}", "data.resolution=8", "model.base=tiny", f"finetune.steps={steps}",
        "finetune.batch_size=32", "finetune.grad_accumulation=2", "finetune.checkpoint_every=3",
        "finetune.log_every=3", "finetune.p=0.5", "finetune.consistency_weight=1.0", "finetune.ema_decay=0.9",
        "finetune.resources={cpu: 1, num_workers: 1}"])


def test_resume_is_exact(tmp_path, ray_local):
    base = save_model(build_model("tiny", resolution=8, channels=1, seed=0), tmp_path / "base")

    # The resumed run is given other initial weights: only a real resume from the checkpoint can match.
    other = save_model(build_model("tiny", resolution=8, channels=1, seed=1), tmp_path / "other")

    def fit(steps, name, out, init=base):
        loop = {"range": [0, 500], "init_model": str(init), "teacher_model": str(base), "output_model": str(out),
                "tracking": None, "seed": 7}
        fit_diffusion(_cfg(tmp_path, steps), name=name, storage=tmp_path / "ray", section="finetune", loop=loop)
        return load_model(out).state_dict()

    straight = fit(6, "straight", tmp_path / "straight")
    fit(3, "interrupted", tmp_path / "first_half")           # stops after its step-3 checkpoint
    resumed = fit(6, "interrupted", tmp_path / "resumed", init=other)  # same name + storage: resumes at step 3
    initial = load_model(base).state_dict()
    assert any(not torch.equal(initial[k], straight[k]) for k in straight)
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)


def test_probabilistic_sampling():
    gen = torch.Generator().manual_seed(0)
    draws = [sample_timesteps(64, 1000, (200, 300), 0.3, gen) for _ in range(400)]
    whole = [d for d in draws if not ((d >= 200) & (d < 300)).all()]
    assert 0.2 < len(whole) / len(draws) < 0.4  # a batch leaves the range with probability ~p (DeMe Eq. 6)
    inside = [d for d in draws if ((d >= 200) & (d < 300)).all()]
    assert all(d.min() >= 200 and d.max() < 300 for d in inside)
    assert all(((sample_timesteps(64, 1000, (200, 300), 0.0, gen) >= 200)).all() for _ in range(10))
