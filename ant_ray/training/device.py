"""The device a training worker runs on."""

from __future__ import annotations

import torch


def worker_device(device: str) -> torch.device:
    """The configured device: Ray Train's device for this worker when it runs under Ray, else cuda or cpu."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    import ray

    if ray.is_initialized():
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cuda")
