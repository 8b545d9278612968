"""Image datasets for diffusion training, loaded whole into memory as float32 NCHW tensors in [-1, 1].

Three sources, registered by name in ``DATASETS``:

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (works offline; the test-suite dataset).
- ``cifar10``: the official CIFAR-10 *binary* release, read with ``numpy.frombuffer`` (never pickle),
  straight from ``cifar-10-binary.tar.gz`` or from its extracted ``cifar-10-batches-bin/`` folder.
- ``image-folder``: any folder of PNG/JPEG files, optionally one subfolder per class.

Also here: ``iterate_batches`` (deterministic shuffled, rank-sharded index batches for training loops) and
``save_image_grid`` (a PNG contact sheet for sample artifacts). Nothing in this module knows about Ray or
MLflow; the only files it touches are the paths it is given.
"""

from __future__ import annotations

import hashlib
import io
import math
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sized

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from ant_ray.registry import Registry

__all__ = [
    "DATASETS",
    "DatasetError",
    "DatasetNotFoundError",
    "ImageDataset",
    "iterate_batches",
    "load_dataset",
    "save_image_grid",
]


class DatasetError(ValueError):
    """A dataset could not be loaded as asked; the message names the dataset, the path and the expected layout."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """The dataset's path does not exist (catchable as ValueError or as FileNotFoundError)."""


@dataclass
class ImageDataset:
    name: str
    images: torch.Tensor  # float32 [N, C, H, W] in [-1, 1]
    labels: torch.Tensor | None  # int64 [N] or None
    resolution: int
    fingerprint: str  # changes whenever the source bytes, split, limit, resolution or channels change

    def __post_init__(self) -> None:
        if self.images.dtype != torch.float32 or self.images.dim() != 4:
            raise ValueError(f"images must be a float32 [N, C, H, W] tensor, got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if tuple(self.images.shape[2:]) != (self.resolution, self.resolution):
            raise ValueError(f"images are {tuple(self.images.shape[2:])}, expected resolution {self.resolution}")
        if self.labels is not None and (self.labels.dtype != torch.int64
                                        or tuple(self.labels.shape) != (self.images.shape[0],)):
            raise ValueError(f"labels must be int64 [{self.images.shape[0]}], got {self.labels.dtype} "
                             f"{tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return int(self.images.shape[0])


# A loader takes already-validated arguments: (path, resolution or None, channels or None, limit, split).
DatasetLoader = Callable[[str | None, int | None, int | None, int | None, str], ImageDataset]
DATASETS: Registry[DatasetLoader] = Registry("dataset")

_SPLITS = ("train", "test")
# Images are converted and resized in chunks so that CIFAR-10 at a large resolution never needs a second
# full-size float copy in memory.
_CHUNK = 2048


def load_dataset(
    name: str,
    *,
    path: str | None = None,
    resolution: int | None = None,
    channels: int | None = None,
    limit: int | None = None,
    split: str = "train",
) -> ImageDataset:
    """Load a registered dataset into memory.

    resolution: output side length (>= 4); None keeps the dataset's native size (8 digits, 32 cifar10,
    32 image-folder). channels: 1 or 3; None keeps the native count (1 digits, 3 otherwise).
    limit: keep only the first ``limit`` images of the split (deterministic; for quick runs).
    """
    loader = DATASETS.get(name)  # unknown names raise a ValueError listing the choices
    if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int)
                                   or resolution < 4):
        raise ValueError(f"dataset {name!r}: resolution must be an int >= 4 (or None for the native size), "
                         f"got {resolution!r}")
    if channels is not None and (isinstance(channels, bool) or channels not in (1, 3)):
        raise ValueError(f"dataset {name!r}: channels must be 1 or 3 (or None for the native count), "
                         f"got {channels!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"dataset {name!r}: limit must be a positive int (or None for all images), got {limit!r}")
    if split not in _SPLITS:
        raise ValueError(f"dataset {name!r}: split must be one of {', '.join(_SPLITS)}, got {split!r}")
    return loader(path, resolution, channels, limit, split)


# ----------------------------------------------------------------------------------------------- helpers


def _fingerprint(hasher: Any, **settings: object) -> str:
    """Finish a sha256 of the source bytes with the settings that change the tensor; 16 hex chars suffice
    to tell cache entries apart."""
    for key in sorted(settings):
        hasher.update(f"|{key}={settings[key]}".encode())
    return hasher.hexdigest()[:16]


def _resize(images: torch.Tensor, resolution: int) -> torch.Tensor:
    if images.shape[-1] == resolution and images.shape[-2] == resolution:
        return images
    # antialias only matters when shrinking; it keeps downsampled images from aliasing. Bilinear weights are
    # non-negative, so the result stays in [-1, 1] up to float rounding, which the clamp removes.
    resized = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False,
                            antialias=True)
    return resized.clamp_(-1.0, 1.0)


def _uint8_planes_to_tensor(pixels: np.ndarray, channels: int, resolution: int) -> torch.Tensor:
    """uint8 [N, 3, H, W] RGB planes -> float32 [N, channels, resolution, resolution] in [-1, 1]."""
    out = torch.empty((pixels.shape[0], channels, resolution, resolution), dtype=torch.float32)
    # ITU-R BT.601 luma, the weights PIL uses for mode "L", so cifar10 and image-folder agree on grayscale.
    luma = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32).view(1, 3, 1, 1)
    for start in range(0, pixels.shape[0], _CHUNK):
        # np.array copies: the source may be a read-only frombuffer view, which torch refuses to share.
        chunk = torch.from_numpy(np.array(pixels[start:start + _CHUNK])).to(torch.float32)
        if channels == 1:
            chunk = (chunk * luma).sum(dim=1, keepdim=True)
        out[start:start + _CHUNK] = _resize(chunk / 127.5 - 1.0, resolution)
    return out


def _missing_path_error(dataset: str, layout: str) -> DatasetError:
    return DatasetError(f"dataset {dataset!r} needs path=...; expected layout: {layout}")


# ------------------------------------------------------------------------------------------------ digits


@DATASETS.register("digits")
def _load_digits(path: str | None, resolution: int | None, channels: int | None, limit: int | None,
                 split: str) -> ImageDataset:
    """scikit-learn's 1797 8x8 digits (values 0..16), labels 0..9. ``path`` is ignored (the data ships
    inside scikit-learn). Deterministic 90/10 split by position: every 10th image (index % 10 == 9) is
    "test" (179 images), the rest "train" (1618 images)."""
    from sklearn.datasets import load_digits  # imported here: scikit-learn takes about a second to import

    bunch = load_digits()
    raw = np.ascontiguousarray(bunch.images, dtype=np.float64)  # [1797, 8, 8]
    targets = np.ascontiguousarray(bunch.target, dtype=np.int64)
    is_test = np.arange(raw.shape[0]) % 10 == 9
    keep = np.flatnonzero(is_test if split == "test" else ~is_test)[:limit]
    raw, targets = raw[keep], targets[keep]

    channels = 1 if channels is None else channels
    resolution = 8 if resolution is None else resolution
    images = torch.from_numpy(raw).to(torch.float32).unsqueeze(1) / 8.0 - 1.0  # 0..16 -> [-1, 1]
    images = _resize(images, resolution).repeat(1, channels, 1, 1).contiguous()

    hasher = hashlib.sha256(raw.tobytes())
    hasher.update(targets.tobytes())
    fingerprint = _fingerprint(hasher, dataset="digits", split=split, resolution=resolution, channels=channels)
    return ImageDataset("digits", images, torch.from_numpy(targets), resolution, fingerprint)


# ----------------------------------------------------------------------------------------------- cifar10

_CIFAR_FOLDER = "cifar-10-batches-bin"
_CIFAR_ARCHIVE = "cifar-10-binary.tar.gz"
_CIFAR_RECORD = 1 + 3 * 32 * 32  # one label byte, then the R, G and B planes of a 32x32 image
_CIFAR_BATCHES = {
    "train": [f"data_batch_{i}.bin" for i in range(1, 6)],
    "test": ["test_batch.bin"],
}
_CIFAR_LAYOUT = (
    f"the official binary release: {_CIFAR_ARCHIVE}, or its extracted folder {_CIFAR_FOLDER}/ holding "
    f"data_batch_1.bin .. data_batch_5.bin and test_batch.bin (records of {_CIFAR_RECORD} bytes: 1 label "
    f"byte + 3072 bytes of R, G, B planes), or the parent folder of either"
)


def _cifar_error(path: Path | str, problem: str, missing: bool = False) -> DatasetError:
    cls = DatasetNotFoundError if missing else DatasetError
    return cls(f"dataset 'cifar10' at {str(path)!r}: {problem}; expected layout: {_CIFAR_LAYOUT}")


def _check_record_size(where: Path | str, name: str, size: int) -> None:
    # The official batches hold 10000 records each; any positive whole number of records is accepted so that
    # trimmed copies (and small test fixtures) load too.
    if size <= 0 or size % _CIFAR_RECORD:
        raise _cifar_error(where, f"{name} is {size} bytes, not a positive multiple of the {_CIFAR_RECORD}-byte "
                                  f"record (truncated or not the binary version?)")


def _read_cifar_folder(folder: Path, names: list[str], limit: int | None) -> list[bytes]:
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise _cifar_error(folder, f"missing {', '.join(missing)}")
    for name in names:
        _check_record_size(folder, name, (folder / name).stat().st_size)
    chunks, remaining = [], math.inf if limit is None else limit * _CIFAR_RECORD
    for name in names:
        if remaining <= 0:
            break
        with open(folder / name, "rb") as f:
            data = f.read() if remaining == math.inf else f.read(int(remaining))
        chunks.append(data)
        remaining -= len(data)
    return chunks


def _read_cifar_archive(archive: Path, names: list[str], limit: int | None) -> list[bytes]:
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as err:
        raise _cifar_error(archive, f"not a readable tar archive ({err})") from None
    with tar:
        # Match on the file name alone so that archives repacked without the top folder load too.
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        missing = [n for n in names if n not in members]
        if missing:
            raise _cifar_error(archive, f"the archive lacks {', '.join(missing)}")
        for name in names:
            _check_record_size(archive, name, members[name].size)
        chunks, remaining = [], math.inf if limit is None else limit * _CIFAR_RECORD
        for name in names:
            if remaining <= 0:
                break
            stream = tar.extractfile(members[name])
            assert stream is not None  # regular files always have a stream
            data = stream.read() if remaining == math.inf else stream.read(int(remaining))
            chunks.append(data)
            remaining -= len(data)
    return chunks


def _locate_cifar(path: Path) -> tuple[str, Path]:
    """('folder' | 'archive', location) for an archive, the batches folder, or the parent of either."""
    if not path.exists():
        raise _cifar_error(path, "path does not exist", missing=True)
    if path.is_file():
        return "archive", path
    if any((path / n).exists() for names in _CIFAR_BATCHES.values() for n in names):
        return "folder", path
    if (path / _CIFAR_FOLDER).is_dir():
        return "folder", path / _CIFAR_FOLDER
    if (path / _CIFAR_ARCHIVE).is_file():
        return "archive", path / _CIFAR_ARCHIVE
    raise _cifar_error(path, f"found neither the .bin batches, a {_CIFAR_FOLDER}/ folder nor {_CIFAR_ARCHIVE}")


@DATASETS.register("cifar10")
def _load_cifar10(path: str | None, resolution: int | None, channels: int | None, limit: int | None,
                  split: str) -> ImageDataset:
    """CIFAR-10 binary: split "train" = data_batch_1..5 in order, "test" = test_batch. Labels 0..9."""
    if path is None:
        raise _missing_path_error("cifar10", _CIFAR_LAYOUT)
    kind, where = _locate_cifar(Path(path).expanduser())
    names = _CIFAR_BATCHES[split]
    chunks = (_read_cifar_folder if kind == "folder" else _read_cifar_archive)(where, names, limit)
    raw = b"".join(chunks)
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.size and labels.max() > 9:
        raise _cifar_error(where, f"found label {int(labels.max())} > 9 (not the CIFAR-10 binary version?)")

    channels = 3 if channels is None else channels
    resolution = 32 if resolution is None else resolution
    images = _uint8_planes_to_tensor(records[:, 1:].reshape(-1, 3, 32, 32), channels, resolution)
    fingerprint = _fingerprint(hashlib.sha256(raw), dataset="cifar10", split=split, resolution=resolution,
                               channels=channels)
    return ImageDataset("cifar10", images, torch.from_numpy(labels), resolution, fingerprint)


# ------------------------------------------------------------------------------------------ image-folder

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_FOLDER_LAYOUT = (
    "a folder holding .png/.jpg/.jpeg files (searched recursively); for labels put every image under a "
    "class subfolder, root/<class name>/..., with no images directly in root"
)


def _folder_error(path: Path | str, problem: str, missing: bool = False) -> DatasetError:
    cls = DatasetNotFoundError if missing else DatasetError
    return cls(f"dataset 'image-folder' at {str(path)!r}: {problem}; expected layout: {_FOLDER_LAYOUT}")


def _center_square(image: Image.Image, resolution: int) -> Image.Image:
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    # PIL's bilinear filter widens its support when shrinking, i.e. it antialiases like the torch path above.
    return square.resize((resolution, resolution), Image.Resampling.BILINEAR)


@DATASETS.register("image-folder")
def _load_image_folder(path: str | None, resolution: int | None, channels: int | None, limit: int | None,
                       split: str) -> ImageDataset:
    """Every PNG/JPEG under ``path`` (recursive, sorted by relative path), center-cropped to a square and
    resized to ``resolution`` (default 32). channels default 3 (RGB); 1 converts to luminance ("L").
    Labels: when every image sits under a first-level subfolder of ``path``, the sorted subfolder names
    are the classes 0..K-1 (computed from all images, so ``limit`` does not renumber them); otherwise
    None. The folder *is* the split: only split="train" is accepted; point path at another folder for test
    images."""
    if path is None:
        raise _missing_path_error("image-folder", _FOLDER_LAYOUT)
    root = Path(path).expanduser()
    if not root.exists():
        raise _folder_error(root, "path does not exist", missing=True)
    if not root.is_dir():
        raise _folder_error(root, "path is a file, not a folder")
    if split != "train":
        raise _folder_error(root, f"split={split!r} is not supported (the folder is the split); pass "
                                  f"split='train' with path set to the folder of the images you want")
    files = sorted((p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise _folder_error(root, "no images found")

    relative = [p.relative_to(root) for p in files]
    labelled = all(len(r.parts) >= 2 for r in relative)
    classes = sorted({r.parts[0] for r in relative}) if labelled else []
    class_index = {c: i for i, c in enumerate(classes)}

    channels = 3 if channels is None else channels
    resolution = 32 if resolution is None else resolution
    mode = "L" if channels == 1 else "RGB"
    selected = list(zip(files, relative))[:limit]
    pixels = np.empty((len(selected), resolution, resolution, channels), dtype=np.uint8)
    hasher = hashlib.sha256()
    for i, (file, rel) in enumerate(selected):
        data = file.read_bytes()
        # The relative path is hashed too: it carries the label.
        hasher.update(rel.as_posix().encode() + b"\0" + len(data).to_bytes(8, "little") + data)
        try:
            with Image.open(io.BytesIO(data)) as image:
                image = ImageOps.exif_transpose(image).convert(mode)  # honour camera rotation tags
                square = _center_square(image, resolution)
        except (UnidentifiedImageError, OSError) as err:
            raise _folder_error(root, f"could not decode {rel.as_posix()} ({err})") from None
        pixels[i] = np.asarray(square, dtype=np.uint8).reshape(resolution, resolution, channels)

    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0
    labels = (torch.tensor([class_index[r.parts[0]] for _, r in selected], dtype=torch.int64)
              if labelled else None)
    fingerprint = _fingerprint(hasher, dataset="image-folder", resolution=resolution, channels=channels)
    return ImageDataset("image-folder", images.contiguous(), labels, resolution, fingerprint)


# -------------------------------------------------------------------------------------- batches and grids


def _epoch_seed(seed: int, epoch: int) -> int:
    # Hashing (seed, epoch) rather than adding them keeps (seed=1, epoch=0) and (seed=0, epoch=1) apart.
    digest = hashlib.sha256(f"ant_ray.iterate_batches:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def iterate_batches(
    dataset: Sized | int,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield this rank's int64 index tensors for one epoch.

    ``batch_size`` is the GLOBAL batch size (summed over ranks) and must be divisible by ``world_size``.
    Every epoch draws one permutation of range(len(dataset)) from (seed, epoch) alone; global batch k is
    perm[k*batch_size:(k+1)*batch_size] and rank r gets the r-th of its world_size contiguous slices. So the
    ranks' slices are disjoint, their union is the global batch, and the global batches do not depend on
    world_size. With drop_last=False the final short batch is split by ``torch.tensor_split`` (sizes differ
    by at most one; a rank gets an empty tensor when fewer images than ranks are left) so every rank still
    yields the same number of batches, which keeps collective calls matched.
    """
    n = dataset if isinstance(dataset, int) and not isinstance(dataset, bool) else len(dataset)  # type: ignore[arg-type]
    for arg, value in (("batch_size", batch_size), ("world_size", world_size), ("seed", seed),
                       ("epoch", epoch), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{arg} must be an int, got {value!r}")
    if batch_size < 1 or world_size < 1:
        raise ValueError(f"batch_size and world_size must be >= 1, got {batch_size} and {world_size}")
    if batch_size % world_size:
        raise ValueError(f"batch_size is the global batch and must be divisible by world_size: "
                         f"{batch_size} % {world_size} != 0; pick a multiple of {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if n < 1:
        raise ValueError("dataset is empty: there is nothing to iterate")
    if drop_last and n < batch_size:
        raise ValueError(f"dataset has {n} images, fewer than batch_size={batch_size} with drop_last=True, so "
                         f"no batch would be produced; lower batch_size or pass drop_last=False")

    generator = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
    permutation = torch.randperm(n, generator=generator)
    per_rank = batch_size // world_size

    def batches() -> Iterator[torch.Tensor]:
        for start in range(0, n, batch_size):
            global_batch = permutation[start:start + batch_size]
            if global_batch.numel() == batch_size:
                yield global_batch[rank * per_rank:(rank + 1) * per_rank].clone()
            elif not drop_last:
                yield torch.tensor_split(global_batch, world_size)[rank].clone()

    return batches()


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, *,
                    padding: int = 2, min_side: int = 256) -> Path:
    """Write images (float [N, C, H, W] in [-1, 1], C = 1 or 3, any device) as one PNG grid and return its
    path. ``nrow`` is the number of images per row (default ceil(sqrt(N))); cells are separated and framed by
    ``padding`` black pixels, so the grid is cols*(W+padding)+padding pixels wide. The grid is then enlarged by
    the smallest integer factor that makes its shorter side at least ``min_side`` pixels, each pixel becoming a
    square block (nearest neighbour), so that 8x8 samples are large enough to judge; ``min_side=0`` keeps the
    native size. Values outside [-1, 1] are clipped and NaN shows as mid-grey, so a diverged model still leaves
    an inspectable artifact."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] < 1 \
            or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a [N, C, H, W] tensor with N >= 1 and C in (1, 3), got {shape}")
    n, c, h, w = images.shape
    if nrow is None:
        nrow = math.ceil(math.sqrt(n))
    if isinstance(nrow, bool) or not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"nrow (images per row) must be a positive int, got {nrow!r}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an int >= 0, got {padding!r}")
    if isinstance(min_side, bool) or not isinstance(min_side, int) or min_side < 0:
        raise ValueError(f"min_side must be an int >= 0, got {min_side!r}")
    cols = min(nrow, n)
    rows = math.ceil(n / cols)

    # PNG encoding happens on the host, so this is the one place that moves data off the accelerator.
    pixels = images.detach().to(device="cpu", dtype=torch.float32)
    pixels = torch.nan_to_num(pixels, nan=0.0, posinf=1.0, neginf=-1.0).clamp(-1.0, 1.0)
    pixels = ((pixels + 1.0) * 127.5).round().to(torch.uint8)
    grid = torch.zeros((c, rows * (h + padding) + padding, cols * (w + padding) + padding), dtype=torch.uint8)
    for i in range(n):
        top = padding + (i // cols) * (h + padding)
        left = padding + (i % cols) * (w + padding)
        grid[:, top:top + h, left:left + w] = pixels[i]

    scale = max(1, math.ceil(min_side / min(grid.shape[1:])))
    if scale > 1:
        grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    array = np.ascontiguousarray(grid.permute(1, 2, 0).numpy())
    # A 2-D uint8 array becomes mode "L", an [H, W, 3] one mode "RGB".
    image = Image.fromarray(array[:, :, 0] if c == 1 else array)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path
