"""Feature extractors for FID, registered by name in ``FEATURE_EXTRACTORS``.

- ``inception``: clean-fid's Inception-v3 (clean mode): images go to [0, 255], through clean-fid's "clean"
  resize to 299x299 (PIL bicubic; reproduced batched with torch's antialiased bicubic, which is a port of
  PIL's resampler), then the 2048-d pool features. Needs the weights file clean-fid downloads.
- ``domain``: the penultimate layer of a small CNN trained on the dataset's labels (fully offline).

Every extractor has ``name`` (used in metric names), ``feature_dim``, ``cache_key`` (changes whenever the
features would change; part of the reference-statistics cache key) and
``features(images [N, C, H, W] in [-1, 1]) -> np.ndarray [N, feature_dim]``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from cleanfid.downloads_helper import inception_url as INCEPTION_URL

from ant_ray.fid.domain_classifier import (
    DomainClassifierConfig,
    TrainedDomainClassifier,
    load_or_train_domain_classifier,
)
from ant_ray.registry import Registry

INCEPTION_FILENAME = "inception-2015-12-05.pt"
# clean-fid hard-codes this folder for the weights (features.feature_extractor); we look in the same place.
DEFAULT_INCEPTION_DIR = "/tmp"
OFFLINE_ENV_VAR = "ANT_RAY_OFFLINE"
_DOWNLOAD_TIMEOUT_S = 60


class InceptionUnavailable(RuntimeError):
    """The Inception weights are not on this machine and could not be downloaded."""


class ImageDatasetLike(Protocol):
    name: str
    images: torch.Tensor  # float [N, C, H, W] in [-1, 1]
    labels: torch.Tensor | None  # int64 [N]
    resolution: int


class FeatureExtractor(Protocol):
    name: str
    feature_dim: int
    cache_key: str

    def features(self, images: torch.Tensor) -> np.ndarray: ...


def dataset_fingerprint(dataset: ImageDatasetLike) -> str:
    """The dataset's own ``fingerprint`` when it has one (ant_ray.data.ImageDataset), else a hash of its
    images and labels."""
    own = getattr(dataset, "fingerprint", None)
    if isinstance(own, str) and own:
        return own
    digest = hashlib.sha256()
    images = dataset.images.detach().to(device="cpu", dtype=torch.float32).contiguous()
    digest.update(str(tuple(images.shape)).encode())
    digest.update(images.numpy().tobytes())
    if dataset.labels is not None:
        digest.update(dataset.labels.detach().to(device="cpu", dtype=torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a float [N, C, H, W] tensor in [-1, 1], got {got}")


# ------------------------------------------------------------------------------------------- inception


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV_VAR, "").strip().lower() in ("1", "true", "yes")


def _unavailable(path: Path, reason: str) -> InceptionUnavailable:
    return InceptionUnavailable(
        f"Inception weights are not available at {path} ({reason}). Pre-stage the file on every node "
        f"(download {INCEPTION_URL} and copy it to {path}), or use the offline 'domain' feature extractor."
    )


def ensure_inception_weights(weights_dir: str | os.PathLike = DEFAULT_INCEPTION_DIR) -> Path:
    """Path of the Inception weights, downloading them first if absent and allowed.

    With ANT_RAY_OFFLINE=1 an absent file fails at once, without touching the network. A download goes to
    a temporary file that is renamed into place, so a failed or concurrent download never leaves a
    truncated file where clean-fid would load it.
    """
    path = Path(weights_dir) / INCEPTION_FILENAME
    if path.is_file():
        return path
    if _offline():
        raise _unavailable(path, f"the file is absent and {OFFLINE_ENV_VAR}=1 forbids downloading it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=INCEPTION_FILENAME, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                with urllib.request.urlopen(INCEPTION_URL, timeout=_DOWNLOAD_TIMEOUT_S) as response:
                    shutil.copyfileobj(response, out)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    except OSError as err:  # URLError, HTTPError, timeouts and disk errors are all OSErrors
        raise _unavailable(path, f"the file is absent and downloading it failed: {err}") from err
    return path


def clean_resize_299(images_0_255: torch.Tensor) -> torch.Tensor:
    """clean-fid's "clean" resize (PIL bicubic on float32 images, clipped to [0, 255]) for a whole batch.

    torch's antialiased bicubic reproduces PIL's filter (a = -0.5, support widened when shrinking,
    weights renormalised at the borders); tests check it against clean-fid's per-image function.
    """
    resized = F.interpolate(images_0_255, size=(299, 299), mode="bicubic", align_corners=False, antialias=True)
    return resized.clamp(0.0, 255.0)


class InceptionFeatureExtractor:
    name = "inception"
    feature_dim = 2048
    cache_key = "clean-" + INCEPTION_FILENAME.removesuffix(".pt")

    def __init__(
        self,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        weights_dir: str | os.PathLike = DEFAULT_INCEPTION_DIR,
    ):
        from cleanfid.inception_torchscript import InceptionV3W

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        path = ensure_inception_weights(weights_dir)
        try:
            # clean-fid's own wrapper (as build_feature_extractor("clean") makes it, without DataParallel):
            # it applies Inception's (x - 128) / 128 normalisation and returns the 2048-d pool features.
            self._model = InceptionV3W(str(path.parent), download=False, resize_inside=False).to(self.device).eval()
        except (RuntimeError, ValueError, OSError) as err:  # torch.jit.load on a corrupt or partial file
            raise _unavailable(path, f"the file exists but could not be loaded, perhaps truncated: {err}") from err

    def features(self, images: torch.Tensor) -> np.ndarray:
        _check_images(images)
        if images.shape[1] not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels for Inception, got {images.shape[1]}")
        chunks = []
        with torch.no_grad():
            for batch in images.split(self.batch_size):
                batch = batch.to(device=self.device, dtype=torch.float32).clamp(-1.0, 1.0)
                batch = batch.expand(-1, 3, -1, -1)  # grey -> RGB; a no-op for 3 channels
                feats = self._model(clean_resize_299((batch + 1.0) * 127.5))
                chunks.append(feats.detach().to("cpu", torch.float64).numpy())
        return np.concatenate(chunks) if chunks else np.zeros((0, self.feature_dim))


# ---------------------------------------------------------------------------------------------- domain


class DomainFeatureExtractor:
    name = "domain"

    def __init__(self, trained: TrainedDomainClassifier, device: str | torch.device = "cpu", batch_size: int = 512):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.trained = trained
        self.model = trained.model.to(self.device).eval()
        dataset = trained.description["dataset"]
        self.channels = int(dataset["channels"])
        self.resolution = int(dataset["resolution"])
        self.feature_dim = int(trained.description["architecture"]["feature_dim"])
        self.train_accuracy = trained.train_accuracy
        self.cache_key = "domain-" + trained.weights_sha256[:16]

    @classmethod
    def build(
        cls,
        dataset: ImageDatasetLike,
        cache_dir: str | os.PathLike,
        device: str | torch.device = "cpu",
        config: DomainClassifierConfig = DomainClassifierConfig(),
    ) -> "DomainFeatureExtractor":
        trained = load_or_train_domain_classifier(
            dataset.images,
            dataset.labels,
            dataset_name=dataset.name,
            dataset_fingerprint=dataset_fingerprint(dataset),
            cache_dir=cache_dir,
            config=config,
        )
        return cls(trained, device=device)

    def features(self, images: torch.Tensor) -> np.ndarray:
        _check_images(images)
        expected = (self.channels, self.resolution, self.resolution)
        if tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images must be [N, {expected[0]}, {expected[1]}, {expected[2]}] like the dataset the 'domain' "
                f"extractor was trained on, got {tuple(images.shape)}"
            )
        chunks = []
        with torch.no_grad():
            for batch in images.split(self.batch_size):
                feats = self.model.features(batch.to(device=self.device, dtype=torch.float32))
                chunks.append(feats.detach().to("cpu", torch.float64).numpy())
        return np.concatenate(chunks) if chunks else np.zeros((0, self.feature_dim))


# -------------------------------------------------------------------------------------------- registry

ExtractorBuilder = Callable[..., FeatureExtractor]
FEATURE_EXTRACTORS: Registry[ExtractorBuilder] = Registry("feature extractor")


@FEATURE_EXTRACTORS.register("inception")
def _build_inception(
    *, dataset: ImageDatasetLike | None, cache_dir: Any, device: str | torch.device
) -> FeatureExtractor:
    return InceptionFeatureExtractor(device=device)


@FEATURE_EXTRACTORS.register("domain")
def _build_domain(
    *, dataset: ImageDatasetLike | None, cache_dir: Any, device: str | torch.device
) -> FeatureExtractor:
    if dataset is None:
        raise ValueError("the 'domain' feature extractor is trained on the dataset: pass dataset=...")
    if cache_dir is None:
        raise ValueError("the 'domain' feature extractor caches its trained weights: pass cache_dir=...")
    return DomainFeatureExtractor.build(dataset, cache_dir, device=device)


def build_feature_extractor(
    name: str,
    *,
    dataset: ImageDatasetLike | None = None,
    cache_dir: str | os.PathLike | None,
    device: str | torch.device = "cpu",
) -> FeatureExtractor:
    """Build a registered extractor: ``inception`` (needs the weights file) or ``domain`` (needs a labelled
    ``dataset`` and a ``cache_dir`` for the trained weights)."""
    return FEATURE_EXTRACTORS.get(name)(dataset=dataset, cache_dir=cache_dir, device=device)
