"""Fréchet distance at Inception size: scipy's sqrtm form against the eigendecomposition form (and its torch path).

    python -m benchmarks.bench_frechet [--dim 2048] [--samples 5000] [--rounds 7] [--torch-device cpu|cuda|none]

(run from the repository root, or with ant_ray installed). Not part of the test suite.

Two covariances are estimated from ``--samples`` random feature vectors each, with a decaying spectrum (variance
1 / (i + 1) along dimension i, as real features concentrate their variance in few directions); the second set is
also mixed, scaled and shifted so that the distance is not trivial. Each round times one ``frechet_distance`` call
per method, the order alternating between rounds; printed: each method's median seconds, the median of the
per-round ratios to sqrtm with its interquartile range, and how far the values differ.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from ant_ray.fid import FeatureStats, frechet_distance
from benchmarks.round_robin import ratio_quartiles, time_round_robin


def feature_stats_pair(dim: int, samples: int, seed: int = 0) -> tuple[FeatureStats, FeatureStats]:
    rng = np.random.default_rng(seed)
    scales = 1.0 / np.sqrt(1.0 + np.arange(dim))
    first = rng.standard_normal((samples, dim)) * scales
    mixing = np.eye(dim) + 0.05 * rng.standard_normal((dim, dim)) / np.sqrt(dim)
    second = (rng.standard_normal((samples, dim)) * scales * 1.1) @ mixing + 0.02
    return FeatureStats.from_features(first), FeatureStats.from_features(second)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=2048, help="feature dimension (Inception's pool3: 2048)")
    parser.add_argument("--samples", type=int, default=5000, help="feature vectors per set")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--torch-device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device of the torch path, or 'none' to skip it (default: cuda if available)")
    args = parser.parse_args()

    stats1, stats2 = feature_stats_pair(args.dim, args.samples)
    numpy_inputs = (stats1.mu, stats1.sigma, stats2.mu, stats2.sigma)
    candidates = {
        "sqrtm": lambda step: frechet_distance(*numpy_inputs, method="sqrtm"),
        "eigh": lambda step: frechet_distance(*numpy_inputs, method="eigh"),
    }
    synchronize = lambda: None  # noqa: E731
    if args.torch_device != "none":
        device = torch.device(args.torch_device)
        # The statistics start on the device, as they would when the features were computed there.
        tensor_inputs = tuple(torch.from_numpy(x).to(device) for x in numpy_inputs)
        candidates[f"torch ({device.type})"] = lambda step: frechet_distance(*tensor_inputs)
        if device.type == "cuda":
            synchronize = lambda: torch.cuda.synchronize(device)  # noqa: E731

    values = {name: function(0) for name, function in candidates.items()}  # also warms up each path once
    print(f"{args.dim}-d covariances from {args.samples} samples each; {args.rounds} rounds, order rotating; "
          f"torch threads {torch.get_num_threads()}")
    seconds = time_round_robin(candidates, args.rounds, synchronize=synchronize)

    print(f"\n{'method':<14}{'median s':>10}{'x sqrtm (median)':>18}{'IQR':>16}")
    for name, times in seconds.items():
        q1, ratio, q3 = ratio_quartiles(times, seconds["sqrtm"])
        print(f"{name:<14}{statistics.median(times):>10.3f}{ratio:>18.3f}{f'{q1:.3f}-{q3:.3f}':>16}")

    reference = values["sqrtm"]
    print(f"\nFréchet distance (sqrtm form): {reference!r}")
    for name, value in values.items():
        if name != "sqrtm":
            print(f"  {name}: {value!r}, relative difference {abs(value - reference) / reference:.2e}")


if __name__ == "__main__":
    main()
