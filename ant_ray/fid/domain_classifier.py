"""A small CNN classifier trained on the dataset's own labelled images; its penultimate layer is the
feature space of the offline ``domain`` FID (Inception weights cannot be downloaded on every machine).

Training is deterministic (fixed seed, deterministic torch ops, CPU, fixed epochs) so that two machines
that build it from the same data get the same network. The result is cached under a directory the caller
passes: ``<name>.safetensors`` (weights, with the description in the safetensors metadata) and
``<name>.json`` (the same description for people: architecture, dataset fingerprint, resolution, channels,
training accuracy). The first process to publish a file wins; every process then uses the published one,
so concurrent trials agree on the extractor.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import safe_open, save_file
from torch import nn

from ant_ray.files import CorruptFileError, check_safetensors, fsync_file, read_safetensors

CACHE_FORMAT_VERSION = 1


class DomainClassifier(nn.Module):
    """conv(3x3) -> conv(3x3, stride 2) -> conv(3x3) -> 4x4 average pool -> linear embedding -> classes.

    ``features`` is the embedding before its ReLU: pre-activations have no dead (always zero) dimensions,
    which would make the feature covariance exactly singular.
    """

    def __init__(
        self, in_channels: int, num_classes: int, widths: tuple[int, int] = (16, 32), feature_dim: int = 128
    ):
        super().__init__()
        narrow, wide = widths
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, narrow, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(narrow, wide, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(wide, wide, 3, padding=1),
            nn.ReLU(),
            # A fixed 4x4 grid makes the embedding size independent of the image resolution.
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
        )
        self.embed = nn.Linear(wide * 16, feature_dim)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(feature_dim, num_classes))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.body(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


@dataclass(frozen=True)
class DomainClassifierConfig:
    widths: tuple[int, int] = (16, 32)
    feature_dim: int = 128
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    # Bounds the one-off CPU training time on large datasets (a seeded subset; digits is far below it).
    max_train_images: int = 20_000

    def __post_init__(self) -> None:
        if len(self.widths) != 2 or min(self.widths) < 1:
            raise ValueError(f"widths must be two positive channel counts, got {self.widths}")
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        for arg in ("feature_dim", "epochs", "batch_size", "max_train_images"):
            value = getattr(self, arg)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg} must be a positive int, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass(frozen=True)
class TrainedDomainClassifier:
    model: DomainClassifier  # on the CPU, in eval mode
    description: dict[str, Any]  # what the JSON file holds
    weights_path: Path

    @property
    def train_accuracy(self) -> float:
        return float(self.description["train_accuracy"])

    @property
    def weights_sha256(self) -> str:
        return str(self.description["weights_sha256"])


@contextlib.contextmanager
def _deterministic_torch(seed: int) -> Iterator[None]:
    """Seed, force deterministic kernels and one CPU thread, then restore the caller's RNG and settings.

    One thread: float reductions then do not depend on the node's core count (so nodes agree on the
    weights), these small convolutions gain little from more, and concurrent trials on a node do not
    oversubscribe it (two threads under contention trained ~6x slower than one in our measurements).
    """
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    previous_threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(previous_threads)
            torch.use_deterministic_algorithms(previous, warn_only=previous_warn_only)


def _validate_training_data(images: torch.Tensor, labels: torch.Tensor | None, dataset_name: str) -> int:
    if labels is None:
        raise ValueError(
            f"dataset {dataset_name!r} has no labels, so the 'domain' feature extractor cannot be trained; "
            "use the 'inception' extractor instead, or give the images labels (for an image folder, put each "
            "image under a class subfolder: root/<class name>/...)"
        )
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float [N, C, H, W] tensor, got {images.dtype} {tuple(images.shape)}")
    if labels.dim() != 1 or labels.shape[0] != images.shape[0] or labels.dtype != torch.int64:
        raise ValueError(f"labels must be an int64 [N={images.shape[0]}] tensor, "
                         f"got {labels.dtype} {tuple(labels.shape)}")
    if images.shape[0] < 2:
        raise ValueError(f"dataset {dataset_name!r} has {images.shape[0]} images; the 'domain' extractor needs more")
    if labels.min() < 0:
        raise ValueError(f"labels must be class indices >= 0, got {int(labels.min())}")
    num_classes = int(labels.max()) + 1
    if torch.unique(labels).numel() < 2:
        raise ValueError(f"dataset {dataset_name!r} has a single class; the 'domain' extractor needs >= 2 classes "
                         "(or use the 'inception' extractor)")
    return num_classes


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "dataset"


def _train(
    model: DomainClassifier, images: torch.Tensor, labels: torch.Tensor, config: DomainClassifierConfig
) -> float:
    """Adam + cross-entropy for a fixed number of epochs; returns accuracy on the training images."""
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    n = images.shape[0]
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, config.batch_size):
            index = order[start:start + config.batch_size]
            loss = nn.functional.cross_entropy(model(images[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, n, 1024):
            logits = model(images[start:start + 1024])
            correct += int((logits.argmax(dim=1) == labels[start:start + 1024]).sum())
    return correct / n


def _publish_once(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final`` unless another process published ``final`` first (then keep theirs)."""
    try:
        os.link(tmp, final)  # atomic and fails if final exists: first writer wins
    except FileExistsError:
        pass
    except OSError:  # filesystems without hard links
        if not final.exists():
            os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def _write_json_atomically(description: dict[str, Any], path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(description, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_published(weights_path: Path, json_path: Path) -> TrainedDomainClassifier:
    fix = "delete it; it is a cache and is rebuilt on the next run"
    check_safetensors(weights_path, fix=fix)
    with safe_open(str(weights_path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if "description" not in metadata:
        raise CorruptFileError(weights_path, "has no 'description' metadata (not written by ant_ray.fid)", fix)
    try:
        description = json.loads(metadata["description"])
        arch = description["architecture"]
        with torch.random.fork_rng(devices=[]):  # the random init is overwritten: don't consume the caller's RNG
            model = DomainClassifier(arch["in_channels"], arch["num_classes"], tuple(arch["widths"]),
                                     arch["feature_dim"])
    except (json.JSONDecodeError, TypeError, KeyError, ValueError) as error:
        raise CorruptFileError(weights_path, f"has an unreadable 'description' metadata ({error!r})", fix) from None
    # The weights hash covers the file actually published, so every user of it reports the same value.
    description["weights_sha256"] = _file_sha256(weights_path)
    model.load_state_dict(read_safetensors(weights_path, device="cpu", fix=fix))
    model.eval()
    if not json_path.exists():  # the publisher may have died between the two files
        _write_json_atomically(description, json_path)
    return TrainedDomainClassifier(model=model, description=description, weights_path=weights_path)


def load_or_train_domain_classifier(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    dataset_name: str,
    dataset_fingerprint: str,
    cache_dir: str | os.PathLike,
    config: DomainClassifierConfig = DomainClassifierConfig(),
) -> TrainedDomainClassifier:
    """Return the cached classifier for these inputs, training and publishing it first if absent.

    images: float [N, C, H, W] in [-1, 1] (any device; training runs on the CPU for determinism).
    labels: int64 [N] class indices, or None (then a ValueError names the fixes).
    """
    num_classes = _validate_training_data(images, labels, dataset_name)
    assert labels is not None
    _, channels, height, width = images.shape
    if height != width:
        raise ValueError(f"images must be square, got {height}x{width}")
    architecture = {
        "type": "DomainClassifier",
        "in_channels": int(channels),
        "num_classes": num_classes,
        "widths": list(config.widths),
        "feature_dim": config.feature_dim,
    }
    dataset = {
        "name": dataset_name,
        "fingerprint": dataset_fingerprint,
        "resolution": int(height),
        "channels": int(channels),
        "num_images": int(images.shape[0]),
    }
    identity = {"format": CACHE_FORMAT_VERSION, "architecture": architecture, "dataset": dataset,
                "training": asdict(config)}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    cache_dir = Path(cache_dir)
    stem = f"domain_{_slug(dataset_name)}_{height}px_{key}"
    weights_path = cache_dir / f"{stem}.safetensors"
    json_path = cache_dir / f"{stem}.json"
    if weights_path.exists():
        return _load_published(weights_path, json_path)

    train_images = images.detach().to(device="cpu", dtype=torch.float32)
    train_labels = labels.detach().to(device="cpu")
    with _deterministic_torch(config.seed):
        if train_images.shape[0] > config.max_train_images:
            subset = torch.randperm(train_images.shape[0])[: config.max_train_images]
            train_images, train_labels = train_images[subset], train_labels[subset]
        model = DomainClassifier(channels, num_classes, config.widths, config.feature_dim)
        accuracy = _train(model, train_images.contiguous(), train_labels, config)

    description = {**identity, "cache_key": key, "train_accuracy": accuracy,
                   "num_train_images": int(train_images.shape[0])}
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=stem, suffix=".tmp.safetensors")
    os.close(fd)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, tmp, metadata={"description": json.dumps(description, sort_keys=True)})
    fsync_file(tmp)  # on the disk before it gets its final name
    _publish_once(Path(tmp), weights_path)
    return _load_published(weights_path, json_path)
