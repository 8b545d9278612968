"""Fréchet distance between Gaussians fitted to feature sets, and the statistics it needs.

FID(mu1, S1, mu2, S2) = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}).
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass

import numpy as np
from scipy import linalg

from ant_ray.files import CorruptFileError, publishing_file


def _as_float64_vector(value: np.ndarray, arg: str) -> np.ndarray:
    vector = np.asarray(value, dtype=np.float64)
    if vector.ndim != 1:
        raise ValueError(f"{arg} must be a 1-D mean vector, got shape {vector.shape}")
    if not np.isfinite(vector).all():
        raise ValueError(f"{arg} contains NaN or inf; check the features it was computed from")
    return vector


def _as_float64_covariance(value: np.ndarray, dim: int, arg: str) -> np.ndarray:
    matrix = np.asarray(value, dtype=np.float64)
    if matrix.shape != (dim, dim):
        raise ValueError(f"{arg} must have shape ({dim}, {dim}) to match the mean, got {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise ValueError(f"{arg} contains NaN or inf; check the features it was computed from")
    return matrix


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    The matrix square root of sigma1 @ sigma2 can fail (non-finite entries) when both covariances are
    near-singular, as with fewer samples than feature dimensions; then ``eps`` is added to both diagonals,
    the usual fix. Round-off can leave a tiny imaginary part and a tiny negative total: both are dropped.
    """
    mu1 = _as_float64_vector(mu1, "mu1")
    mu2 = _as_float64_vector(mu2, "mu2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 must have the same length, got {mu1.shape[0]} and {mu2.shape[0]}")
    dim = mu1.shape[0]
    sigma1 = _as_float64_covariance(sigma1, dim, "sigma1")
    sigma2 = _as_float64_covariance(sigma2, dim, "sigma2")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")

    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(dim) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not np.isfinite(covmean).all():
            raise ValueError(
                "the covariances are too degenerate for a matrix square root even after adding "
                f"eps={eps} to the diagonal; use more samples or a larger eps"
            )
    diff = mu1 - mu2
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(np.real(covmean))
    return max(float(distance), 0.0)


@dataclass(frozen=True)
class FeatureStats:
    """Mean, covariance (unbiased, n - 1) and sample count of a feature set."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    def __post_init__(self) -> None:
        mu = _as_float64_vector(self.mu, "mu")
        sigma = _as_float64_covariance(self.sigma, mu.shape[0], "sigma")
        if int(self.n) < 2:
            raise ValueError(f"n must be >= 2 for a covariance, got {self.n}")
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "sigma", sigma)
        object.__setattr__(self, "n", int(self.n))

    @property
    def dim(self) -> int:
        return self.mu.shape[0]

    @classmethod
    def from_features(cls, feats: np.ndarray) -> "FeatureStats":
        feats = np.asarray(feats, dtype=np.float64)
        if feats.ndim != 2 or feats.shape[0] < 2:
            raise ValueError(f"feats must be an [N, D] array with N >= 2, got shape {feats.shape}")
        sigma = np.atleast_2d(np.cov(feats, rowvar=False))  # np.cov gives a 0-d array when D == 1
        return cls(mu=feats.mean(axis=0), sigma=sigma, n=feats.shape[0])

    def frechet_distance(self, other: "FeatureStats") -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)

    def save(self, path: str | os.PathLike) -> None:
        """Write as .npz, published whole (temporary file + rename) so a concurrent reader never sees half a file."""
        with publishing_file(path) as temporary, open(temporary, "wb") as handle:
            np.savez(handle, mu=self.mu, sigma=self.sigma, n=np.int64(self.n))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureStats":
        """Read a file written by `save` (never unpickles). A truncated or garbage file is a one-line
        CorruptFileError naming it."""
        fix = "delete it; cached statistics are recomputed on the next run"
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except FileNotFoundError:
            raise
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
            raise CorruptFileError(path, f"is truncated or not an .npz file ({error})", fix) from None
        missing = {"mu", "sigma", "n"} - set(arrays)
        if missing:
            raise CorruptFileError(path, f"is not a FeatureStats file: it lacks {sorted(missing)}", fix)
        try:
            return cls(mu=arrays["mu"], sigma=arrays["sigma"], n=int(arrays["n"]))
        except (TypeError, ValueError) as error:
            raise CorruptFileError(path, f"holds invalid statistics ({error})", fix) from None


class StreamingFeatureStats:
    """Mean and covariance of features that arrive in batches, in float64, memory O(D^2) whatever N is.

    Batches are merged with Chan et al.'s pairwise update (per-batch centred sums, then a correction
    for the shift between means), which avoids the cancellation of the naive sum-of-squares formula.
    """

    def __init__(self, dim: int):
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = dim
        self.n = 0
        self._mean = np.zeros(dim, dtype=np.float64)
        self._centred_outer = np.zeros((dim, dim), dtype=np.float64)  # sum of (x - mean)(x - mean)^T

    def update(self, feats: np.ndarray) -> None:
        feats = np.asarray(feats, dtype=np.float64)
        if feats.ndim != 2 or feats.shape[1] != self.dim:
            raise ValueError(f"feats must have shape [B, {self.dim}], got {feats.shape}")
        if not np.isfinite(feats).all():
            raise ValueError("feats contains NaN or inf; check the images they were computed from")
        batch_n = feats.shape[0]
        if batch_n == 0:
            return
        batch_mean = feats.mean(axis=0)
        centred = feats - batch_mean
        batch_outer = centred.T @ centred
        total = self.n + batch_n
        delta = batch_mean - self._mean
        self._centred_outer += batch_outer + np.outer(delta, delta) * (self.n * batch_n / total)
        self._mean += delta * (batch_n / total)
        self.n = total

    def to_stats(self) -> FeatureStats:
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.n}")
        return FeatureStats(mu=self._mean.copy(), sigma=self._centred_outer / (self.n - 1), n=self.n)
