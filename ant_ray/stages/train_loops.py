"""What Ray Train runs on its workers: one entry point per training loop, which imports its loop when called.

A process that only launches a run (a Tune trial's process, a stage's driver) needs a function to hand to
`TorchTrainer`, not the loop's module: importing that loads the whole training stack (diffusers, the MTL methods,
the samplers: about 5 CPU-seconds per process), which only the workers use. Ray pickles these functions by
reference, so a worker imports this small module, then the loop."""

from __future__ import annotations

from typing import Any


def ant_loop(config: dict[str, Any]) -> Any:
    """ANT clustered-MTL training (``ant_ray.ant.train.train_ant``)."""
    from ant_ray.ant.train import train_ant

    return train_ant(config)


def diffusion_loop(config: dict[str, Any]) -> Any:
    """Plain diffusion training of one or more models: pretraining, DeMe specialists, warm-ups
    (``ant_ray.deme.finetune.train_diffusion``)."""
    from ant_ray.deme.finetune import train_diffusion

    return train_diffusion(config)
