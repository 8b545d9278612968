"""Fréchet distance between Gaussians fitted to feature sets, and the statistics it needs.

FID(mu1, S1, mu2, S2) = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}).

The last term is computed from symmetric eigendecompositions by default (``method="eigh"``): at Inception's
2048 dimensions that is 3-6x faster on a CPU than the matrix square root of S1 S2 that clean-fid takes
(benchmarks/bench_frechet.py), for the same value to round-off. ``method="sqrtm"`` keeps that textbook form for reference. Torch tensors (or a
``device``) select the same eigendecomposition in torch, so features that live on a GPU are scored there.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
from scipy import linalg

from ant_ray.files import CorruptFileError, publishing_file

FRECHET_METHODS = ("eigh", "sqrtm")

# A covariance is symmetric; round-off in how it was accumulated (float32 on a GPU, say) leaves far less
# asymmetry than this, relative to its largest entry.
_SYMMETRY_RTOL = 1e-5


def _all_finite(array: np.ndarray | torch.Tensor) -> bool:
    if isinstance(array, torch.Tensor):
        return bool(torch.isfinite(array).all())
    return bool(np.isfinite(array).all())


def _check_vector(vector: np.ndarray | torch.Tensor, arg: str) -> None:
    if vector.ndim != 1 or vector.shape[0] == 0:
        raise ValueError(f"{arg} must be a non-empty 1-D mean vector, got shape {tuple(vector.shape)}")
    if not _all_finite(vector):
        raise ValueError(f"{arg} contains NaN or inf; check the features it was computed from")


def _check_covariance(matrix: np.ndarray | torch.Tensor, dim: int, arg: str) -> None:
    if tuple(matrix.shape) != (dim, dim):
        raise ValueError(f"{arg} must have shape ({dim}, {dim}) to match the mean, got {tuple(matrix.shape)}")
    if not _all_finite(matrix):
        raise ValueError(f"{arg} contains NaN or inf; check the features it was computed from")


def _check_gaussians(mu1, sigma1, mu2, sigma2) -> None:
    """Shapes and values of two (mean, covariance) pairs, numpy arrays or torch tensors alike."""
    _check_vector(mu1, "mu1")
    _check_vector(mu2, "mu2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 must have the same length, got {mu1.shape[0]} and {mu2.shape[0]}")
    _check_covariance(sigma1, mu1.shape[0], "sigma1")
    _check_covariance(sigma2, mu1.shape[0], "sigma2")


def _symmetrised(matrix: np.ndarray | torch.Tensor, arg: str) -> np.ndarray | torch.Tensor:
    """(S + S^T) / 2, after checking S is symmetric up to round-off: an eigendecomposition for symmetric
    matrices reads one triangle only, so a matrix that is not a covariance would give a silently wrong value."""
    asymmetry, scale = float(abs(matrix - matrix.T).max()), float(abs(matrix).max())
    if asymmetry > _SYMMETRY_RTOL * scale:
        raise ValueError(f"{arg} is not symmetric (max |S - S^T| = {asymmetry:.3g}, max |S| = {scale:.3g}); "
                         "a covariance matrix is")
    return (matrix + matrix.T) / 2


def _as_float64_vector(value: np.ndarray, arg: str) -> np.ndarray:
    vector = np.asarray(value, dtype=np.float64)
    _check_vector(vector, arg)
    return vector


def _as_float64_covariance(value: np.ndarray, dim: int, arg: str) -> np.ndarray:
    matrix = np.asarray(value, dtype=np.float64)
    _check_covariance(matrix, dim, arg)
    return matrix


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^{1/2}) for symmetric PSD S1, S2.

    With S1 = U diag(l) U^T and H = U diag(sqrt(l)), the symmetric PSD matrix H^T S2 H is similar to
    S1^{1/2} S2 S1^{1/2} and so has the eigenvalues of S1 S2; their square roots sum to the trace. Round-off
    makes tiny eigenvalues of a singular (fewer samples than dimensions) covariance slightly negative: clipped to 0.
    """
    eigenvalues, eigenvectors = np.linalg.eigh(sigma1)
    half = eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))  # scales column j by sqrt(l_j)
    inner = half.T @ sigma2 @ half
    inner_eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2)  # only the values: cheaper than eigh
    return float(np.sqrt(np.clip(inner_eigenvalues, 0.0, None)).sum())


def _trace_sqrt_product_torch(sigma1: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """``_trace_sqrt_product_eigh`` in torch, on the tensors' device."""
    eigenvalues, eigenvectors = torch.linalg.eigh(sigma1)
    half = eigenvectors * eigenvalues.clamp(min=0.0).sqrt()
    inner = half.T @ sigma2 @ half
    return torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0.0).sqrt().sum()


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    """tr((S1 S2)^{1/2}) from scipy's matrix square root, as clean-fid computes it; ``eps`` on both diagonals
    when the square root is not finite (near-singular covariances)."""
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not np.isfinite(covmean).all():
            raise ValueError(
                "the covariances are too degenerate for a matrix square root even after adding "
                f"eps={eps} to the diagonal; use more samples or a larger eps"
            )
    # Round-off can leave a tiny imaginary part: dropped.
    return float(np.trace(np.real(covmean)))


def _degenerate_error(eps: float) -> ValueError:
    return ValueError(f"the eigendecomposition did not converge even after adding eps={eps} to the diagonals; "
                      "use more samples or a larger eps")


def frechet_distance(
    mu1: np.ndarray | torch.Tensor,
    sigma1: np.ndarray | torch.Tensor,
    mu2: np.ndarray | torch.Tensor,
    sigma2: np.ndarray | torch.Tensor,
    eps: float = 1e-6,
    method: str = "eigh",
    device: torch.device | str | None = None,
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64.

    ``method="eigh"`` (default) takes tr((S1 S2)^{1/2}) from symmetric eigendecompositions; it needs
    symmetric covariances (checked) and handles singular ones, as with fewer samples than dimensions, without
    help. ``method="sqrtm"`` takes scipy's matrix square root of S1 S2 (clean-fid's form, slower) and numpy inputs.

    ``eps`` is a fallback, unused when the first attempt succeeds: it is added to both diagonals and the
    square-root term recomputed when sqrtm gives non-finite entries, or when an eigendecomposition does not
    converge (rare; LAPACK's LinAlgError). The trace terms always use the covariances as given.

    Torch tensors among the inputs, or a ``device``, select ``frechet_distance_torch``: the eigh form in torch
    on that device (a GPU where the features live there). A tiny negative total from round-off becomes 0.
    """
    if method not in FRECHET_METHODS:
        raise ValueError(f"method must be one of {', '.join(FRECHET_METHODS)}, got {method!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if device is not None or any(isinstance(x, torch.Tensor) for x in (mu1, sigma1, mu2, sigma2)):
        if method != "eigh":
            raise ValueError(f"method={method!r} takes numpy arrays and runs on the CPU; only 'eigh' runs in torch")
        return frechet_distance_torch(mu1, sigma1, mu2, sigma2, eps=eps, device=device)

    mu1, sigma1, mu2, sigma2 = (np.asarray(x, dtype=np.float64) for x in (mu1, sigma1, mu2, sigma2))
    _check_gaussians(mu1, sigma1, mu2, sigma2)
    if method == "sqrtm":
        root_trace = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
    else:
        sigma1, sigma2 = _symmetrised(sigma1, "sigma1"), _symmetrised(sigma2, "sigma2")
        try:
            root_trace = _trace_sqrt_product_eigh(sigma1, sigma2)
        except np.linalg.LinAlgError:
            offset = np.eye(sigma1.shape[0]) * eps
            try:
                root_trace = _trace_sqrt_product_eigh(sigma1 + offset, sigma2 + offset)
            except np.linalg.LinAlgError as error:
                raise _degenerate_error(eps) from error
    diff = mu1 - mu2
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * root_trace
    return max(float(distance), 0.0)


def frechet_distance_torch(
    mu1: np.ndarray | torch.Tensor,
    sigma1: np.ndarray | torch.Tensor,
    mu2: np.ndarray | torch.Tensor,
    sigma2: np.ndarray | torch.Tensor,
    eps: float = 1e-6,
    device: torch.device | str | None = None,
) -> float:
    """``frechet_distance``'s eigh form in torch float64 on ``device``: by default the device of the first tensor
    among the inputs, else the CPU. Inputs elsewhere are copied there. Same checks, same ``eps`` fallback."""
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    inputs = (mu1, sigma1, mu2, sigma2)
    if device is None:
        device = next((x.device for x in inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))
    mu1, sigma1, mu2, sigma2 = (torch.as_tensor(x, dtype=torch.float64, device=device) for x in inputs)
    _check_gaussians(mu1, sigma1, mu2, sigma2)
    sigma1, sigma2 = _symmetrised(sigma1, "sigma1"), _symmetrised(sigma2, "sigma2")
    try:
        root_trace = _trace_sqrt_product_torch(sigma1, sigma2)
    except torch.linalg.LinAlgError:
        offset = torch.eye(sigma1.shape[0], dtype=torch.float64, device=device) * eps
        try:
            root_trace = _trace_sqrt_product_torch(sigma1 + offset, sigma2 + offset)
        except torch.linalg.LinAlgError as error:
            raise _degenerate_error(eps) from error
    diff = mu1 - mu2
    distance = diff @ diff + sigma1.trace() + sigma2.trace() - 2.0 * root_trace
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
        arrays = _read_npz(path, fix)
        missing = {"mu", "sigma", "n"} - set(arrays)
        if missing:
            raise CorruptFileError(path, f"is not a FeatureStats file: it lacks {sorted(missing)}", fix)
        try:
            return cls(mu=arrays["mu"], sigma=arrays["sigma"], n=int(arrays["n"]))
        except (TypeError, ValueError) as error:
            raise CorruptFileError(path, f"holds invalid statistics ({error})", fix) from None


def _read_npz(path: str | os.PathLike, fix: str) -> dict[str, np.ndarray]:
    """The arrays of an .npz file, never unpickling; a truncated or garbage file is a CorruptFileError naming it
    and ``fix``."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
        raise CorruptFileError(path, f"is truncated or not an .npz file ({error})", fix) from None


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

    def save(self, path: str | os.PathLike) -> None:
        """The running state (not just mean and covariance), so a later call can continue the same stream;
        published whole like every file the project writes."""
        with publishing_file(path) as temporary, open(temporary, "wb") as handle:
            np.savez(handle, n=np.int64(self.n), mean=self._mean, centred_outer=self._centred_outer)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "StreamingFeatureStats":
        fix = "delete it; the stream starts again"
        arrays = _read_npz(path, fix)
        if {"n", "mean", "centred_outer"} - set(arrays):
            raise CorruptFileError(path, "is not a saved feature stream", fix)
        running = cls(int(arrays["mean"].shape[0]))
        running.n = int(arrays["n"])
        running._mean = arrays["mean"].astype(np.float64)
        running._centred_outer = arrays["centred_outer"].astype(np.float64)
        return running

