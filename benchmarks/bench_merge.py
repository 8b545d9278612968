"""Merge cost at DeMe's CIFAR-10 scale: google/ddpm-cifar10-32's UNet2DModel (35.7M parameters), N finetuned copies.

    python -m benchmarks.bench_merge [--models 4] [--repeats 10] [--device cpu|cuda] [--ties] [--projections]

(run from the repository root, or with ant_ray installed).

Prints the time of each step a merge-weight search pays: the one-off task-vector setup, then per candidate
`TaskVectorMerger.merge` (flat and per-layer-group weights) and loading the result into the model.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from ant_ray.deme.projection import add_channel_projections
from ant_ray.diffusion import build_model
from ant_ray.merge import TaskVectorMerger, state_dict_fingerprint

LAYER_GROUPS = {"down": "down_blocks.", "mid": "mid_block.", "up": "up_blocks.", "other": ""}


def timed(function, repeats: int, device: torch.device) -> list[float]:
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def report(name: str, seconds: list[float]) -> None:
    print(f"{name:<44} median {statistics.median(seconds) * 1000:8.1f} ms   min {min(seconds) * 1000:8.1f} ms"
          f"   ({len(seconds)} calls)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=4, help="number of finetuned copies N (DeMe uses 4)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ties", action="store_true", help="also time TIES (trimming at setup, then merges)")
    parser.add_argument("--projections", action="store_true", help="add DeMe channel projections to the model")
    args = parser.parse_args()
    device = torch.device(args.device)

    torch.manual_seed(0)
    unet = build_model("ddpm-cifar10", resolution=32, channels=3)
    parameters = sum(parameter.numel() for parameter in unet.parameters())
    print(f"ddpm-cifar10 UNet2DModel: {parameters:,} parameters")
    if not 35_700_000 <= parameters <= 35_800_000:
        raise SystemExit(f"expected google/ddpm-cifar10-32's ~35.7M parameters, built {parameters:,}")
    if args.projections:
        add_channel_projections(unet)
        total = sum(parameter.numel() for parameter in unet.parameters())
        print(f"with channel projections: {total:,} parameters (+{total - parameters:,})")
    unet.to(device)
    base = {key: tensor.detach().clone() for key, tensor in unet.state_dict().items()}
    finetuned = []
    for index in range(args.models):
        generator = torch.Generator(device=device).manual_seed(index)
        finetuned.append({key: tensor + 1e-3 * torch.randn(tensor.shape, generator=generator, device=device)
                          if tensor.is_floating_point() else tensor for key, tensor in base.items()})
    print(f"N = {args.models} perturbed copies on {device}; torch threads: {torch.get_num_threads()}")

    report("state_dict_fingerprint(base)", timed(lambda: state_dict_fingerprint(base), 3, device))
    merger = None

    def build():
        nonlocal merger
        merger = TaskVectorMerger(base, finetuned, layer_groups=LAYER_GROUPS)

    setups = timed(build, 2, device)
    report("TaskVectorMerger setup (linear)", setups)
    flat = [1.0 / args.models] * args.models
    grouped = {name: [0.1 * (i + 1) + 0.05 * g for i in range(args.models)] for g, name in enumerate(LAYER_GROUPS)}
    merger.merge(flat)  # first call touches the output pages
    report("merge(flat weights)", timed(lambda: merger.merge(flat), args.repeats, device))
    report("merge(per-layer-group weights)", timed(lambda: merger.merge(grouped), args.repeats, device))
    target = copy.deepcopy(unet)
    report("merge + load_state_dict into the model",
           timed(lambda: target.load_state_dict(merger.merge(flat)), args.repeats, device))

    if args.ties:
        del merger
        ties = None

        def build_ties():
            nonlocal ties
            ties = TaskVectorMerger(base, finetuned, method="ties", density=0.2)

        report("TaskVectorMerger setup (ties, global trim)", timed(build_ties, 1, device))
        ties.merge(flat)
        report("ties merge(flat weights)", timed(lambda: ties.merge(flat), max(2, args.repeats // 3), device))


if __name__ == "__main__":
    main()
