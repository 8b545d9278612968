"""Tests for ant_ray.data: every loader is checked against an independent decoding of bytes the test wrote
(or, for digits, against scikit-learn's array), and every error path against its message."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ant_ray.data import (
    DATASETS,
    DatasetError,
    ImageDataset,
    iterate_batches,
    load_dataset,
    save_image_grid,
)

# ------------------------------------------------------------------------------------------------ digits


@pytest.fixture(scope="module")
def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


def test_registry_lists_the_three_datasets() -> None:
    assert DATASETS.names() == ["cifar10", "digits", "image-folder"]


def test_digits_shape_range_labels_and_split(sklearn_digits) -> None:
    raw, target = sklearn_digits
    train = load_dataset("digits")
    test = load_dataset("digits", split="test")
    assert isinstance(train, ImageDataset) and train.name == "digits" and train.resolution == 8
    assert (len(train), len(test)) == (1618, 179)
    assert train.images.shape == (1618, 1, 8, 8) and train.images.dtype == torch.float32
    assert train.images.min() == -1.0 and train.images.max() == 1.0
    assert train.labels.dtype == torch.int64 and set(train.labels.tolist()) == set(range(10))
    # The split is by position: every 10th image is test; 0..16 maps linearly onto [-1, 1].
    is_test = np.arange(len(raw)) % 10 == 9
    expected_train = torch.tensor(raw[~is_test] / 8.0 - 1.0, dtype=torch.float32).unsqueeze(1)
    torch.testing.assert_close(train.images, expected_train, rtol=0, atol=0)
    torch.testing.assert_close(test.images[:, 0], torch.tensor(raw[is_test] / 8.0 - 1.0, dtype=torch.float32))
    assert train.labels.tolist() == target[~is_test].tolist()
    assert test.labels.tolist() == target[is_test].tolist()
    assert train.fingerprint != test.fingerprint and len(train.fingerprint) == 16


def test_digits_limit_channels_and_fingerprint(sklearn_digits) -> None:
    first = load_dataset("digits", limit=5, channels=3)
    assert first.images.shape == (5, 3, 8, 8)
    full = load_dataset("digits")
    for c in range(3):  # grayscale repeated into three equal channels
        torch.testing.assert_close(first.images[:, c], full.images[:5, 0], rtol=0, atol=0)
    assert first.labels.tolist() == full.labels[:5].tolist()
    again = load_dataset("digits", limit=5, channels=3)
    assert again.fingerprint == first.fingerprint
    others = {load_dataset("digits", limit=5).fingerprint, load_dataset("digits", limit=6, channels=3).fingerprint,
              load_dataset("digits", limit=5, channels=3, resolution=16).fingerprint}
    assert first.fingerprint not in others and len(others) == 3


@pytest.mark.parametrize("resolution", [5, 16])
def test_resize_matches_pil_bilinear(sklearn_digits, resolution: int) -> None:
    """torch's antialiased bilinear resize is checked against PIL's float-image bilinear resize, an
    independent implementation of the same filter, both shrinking (5) and enlarging (16)."""
    raw, _ = sklearn_digits
    data = load_dataset("digits", resolution=resolution, limit=4)
    assert data.images.shape == (4, 1, resolution, resolution) and data.resolution == resolution
    assert data.images.min() >= -1.0 and data.images.max() <= 1.0
    for i in range(4):
        source = Image.fromarray((raw[i] / 8.0 - 1.0).astype(np.float32), mode="F")
        expected = np.asarray(source.resize((resolution, resolution), Image.Resampling.BILINEAR))
        np.testing.assert_allclose(data.images[i, 0].numpy(), expected, atol=1e-5)


# ----------------------------------------------------------------------------------------------- cifar10

RECORD = 3073
TRAIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)]


def _cifar_records(rng: np.random.Generator, count: int) -> np.ndarray:
    records = rng.integers(0, 256, size=(count, RECORD), dtype=np.uint8)
    records[:, 0] = rng.integers(0, 10, size=count, dtype=np.uint8)
    return records


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> dict:
    """A tiny CIFAR-10 binary release: 3 records per train batch (15 images), 2 test records; written both
    as the extracted folder and as the .tar.gz archive, each under its own parent folder."""
    rng = np.random.default_rng(0)
    batches = {name: _cifar_records(rng, 3) for name in TRAIN_FILES}
    batches["test_batch.bin"] = _cifar_records(rng, 2)

    folder_parent = tmp_path_factory.mktemp("cifar_folder")
    folder = folder_parent / "cifar-10-batches-bin"
    folder.mkdir()
    for name, records in batches.items():
        (folder / name).write_bytes(records.tobytes())
    (folder / "batches.meta.txt").write_text("airplane\nautomobile\n")  # present in the real release

    archive_parent = tmp_path_factory.mktemp("cifar_archive")
    archive = archive_parent / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-bin")

    train = np.concatenate([batches[n] for n in TRAIN_FILES])
    return {"folder": folder, "folder_parent": folder_parent, "archive": archive, "archive_parent": archive_parent,
            "train": train, "test": batches["test_batch.bin"]}


def _expected_pixels(records: np.ndarray) -> np.ndarray:
    return records[:, 1:].reshape(-1, 3, 32, 32)


@pytest.mark.parametrize("where", ["folder", "folder_parent", "archive", "archive_parent"])
def test_cifar10_decodes_pixels_and_labels_exactly(cifar, where: str) -> None:
    data = load_dataset("cifar10", path=str(cifar[where]))
    records = cifar["train"]
    assert data.name == "cifar10" and data.resolution == 32
    assert data.images.shape == (15, 3, 32, 32) and data.images.dtype == torch.float32
    assert data.labels.tolist() == records[:, 0].astype(int).tolist()
    # Undo the [-1, 1] scaling and compare with the bytes we wrote: R, G, B planes, row-major.
    decoded = ((data.images + 1.0) * 127.5).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(decoded, _expected_pixels(records))
    assert data.images[0, 1, 2, 3].item() == pytest.approx(records[0, 1 + 1024 + 2 * 32 + 3] / 127.5 - 1.0)


def test_cifar10_folder_and_archive_give_the_same_fingerprint(cifar) -> None:
    from_folder = load_dataset("cifar10", path=str(cifar["folder"]))
    from_archive = load_dataset("cifar10", path=str(cifar["archive"]))
    assert from_folder.fingerprint == from_archive.fingerprint
    assert load_dataset("cifar10", path=str(cifar["folder"]), channels=1).fingerprint != from_folder.fingerprint
    assert load_dataset("cifar10", path=str(cifar["folder"]), split="test").fingerprint != from_folder.fingerprint


@pytest.mark.parametrize("where", ["folder", "archive"])
def test_cifar10_test_split_and_limit_across_batches(cifar, where: str) -> None:
    test = load_dataset("cifar10", path=str(cifar[where]), split="test")
    assert test.labels.tolist() == cifar["test"][:, 0].astype(int).tolist()
    np.testing.assert_array_equal(((test.images + 1) * 127.5).round().to(torch.uint8).numpy(),
                                  _expected_pixels(cifar["test"]))
    # 7 = batch 1 (3) + batch 2 (3) + the first record of batch 3.
    first = load_dataset("cifar10", path=str(cifar[where]), limit=7)
    assert len(first) == 7 and first.labels.tolist() == cifar["train"][:7, 0].astype(int).tolist()
    np.testing.assert_array_equal(((first.images + 1) * 127.5).round().to(torch.uint8).numpy(),
                                  _expected_pixels(cifar["train"][:7]))
    assert len(load_dataset("cifar10", path=str(cifar[where]), limit=100)) == 15


def test_cifar10_grayscale_and_resize(cifar) -> None:
    gray = load_dataset("cifar10", path=str(cifar["folder"]), channels=1)
    rgb = _expected_pixels(cifar["train"]).astype(np.float64)
    luma = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    assert gray.images.shape == (15, 1, 32, 32)
    np.testing.assert_allclose(gray.images[:, 0].numpy(), luma / 127.5 - 1.0, atol=1e-5)
    small = load_dataset("cifar10", path=str(cifar["folder"]), resolution=16)
    assert small.images.shape == (15, 3, 16, 16) and small.resolution == 16
    # An antialiased shrink preserves each image's mean up to the filter's edge handling.
    torch.testing.assert_close(small.images.mean(dim=(2, 3)), load_dataset(
        "cifar10", path=str(cifar["folder"])).images.mean(dim=(2, 3)), atol=0.02, rtol=0)


def _assert_names_layout(err: pytest.ExceptionInfo, dataset: str, path: Path | None = None) -> None:
    message = str(err.value)
    assert f"'{dataset}'" in message and "expected layout" in message, message
    if path is not None:
        assert str(path) in message, message


def test_cifar10_errors_name_dataset_path_and_layout(cifar, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("cifar10", path=str(missing))
    assert isinstance(err.value, ValueError)  # one class answers both kinds of except
    _assert_names_layout(err, "cifar10", missing)

    with pytest.raises(DatasetError) as err:
        load_dataset("cifar10")
    _assert_names_layout(err, "cifar10")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError) as err:
        load_dataset("cifar10", path=str(empty))
    _assert_names_layout(err, "cifar10", empty)

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "data_batch_1.bin").write_bytes(cifar["train"][:3].tobytes())
    with pytest.raises(DatasetError, match="missing data_batch_2.bin") as err:
        load_dataset("cifar10", path=str(partial))
    _assert_names_layout(err, "cifar10", partial)

    wrong_size = tmp_path / "wrong_size" / "cifar-10-batches-bin"
    wrong_size.mkdir(parents=True)
    for name in TRAIN_FILES:
        (wrong_size / name).write_bytes(cifar["train"][:3].tobytes())
    (wrong_size / "data_batch_4.bin").write_bytes(cifar["train"][:3].tobytes()[:-1])
    with pytest.raises(DatasetError, match="data_batch_4.bin is 9218 bytes") as err:
        load_dataset("cifar10", path=str(wrong_size.parent))
    _assert_names_layout(err, "cifar10", wrong_size)

    bad_label = tmp_path / "bad_label"
    bad_label.mkdir()
    records = cifar["test"].copy()
    records[1, 0] = 10
    (bad_label / "test_batch.bin").write_bytes(records.tobytes())
    with pytest.raises(DatasetError, match="label 10") as err:
        load_dataset("cifar10", path=str(bad_label), split="test")
    _assert_names_layout(err, "cifar10", bad_label)


def test_cifar10_archive_errors(cifar, tmp_path: Path) -> None:
    no_batches = tmp_path / "other.tar.gz"
    readme = tmp_path / "readme.txt"
    readme.write_text("not cifar")
    with tarfile.open(no_batches, "w:gz") as tar:
        tar.add(readme, arcname="cifar-10-batches-bin/readme.txt")
        tar.add(cifar["folder"] / "test_batch.bin", arcname="cifar-10-batches-bin/test_batch.bin")
    with pytest.raises(DatasetError, match="archive lacks data_batch_1.bin") as err:
        load_dataset("cifar10", path=str(no_batches))
    _assert_names_layout(err, "cifar10", no_batches)
    assert len(load_dataset("cifar10", path=str(no_batches), split="test")) == 2  # the split it has still loads

    with pytest.raises(DatasetError, match="not a readable tar archive") as err:
        load_dataset("cifar10", path=str(readme))
    _assert_names_layout(err, "cifar10", readme)


# ------------------------------------------------------------------------------------------ image-folder


def _save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _solid(height: int, width: int, color: tuple[int, int, int]) -> np.ndarray:
    return np.broadcast_to(np.array(color, dtype=np.uint8), (height, width, 3)).copy()


def test_image_folder_with_class_subfolders(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    exact = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    wide = _solid(8, 14, (255, 0, 0))
    wide[:, 3:11] = (10, 20, 30)  # the centered 8x8 square; the 3-pixel side strips must be cropped away
    _save(tmp_path / "dog" / "b.png", exact)
    _save(tmp_path / "cat" / "a.png", wide)
    _save(tmp_path / "dog" / "nested" / "c.jpg", _solid(20, 16, (200, 200, 200)))
    (tmp_path / "dog" / "notes.txt").write_text("not an image")

    data = load_dataset("image-folder", path=str(tmp_path), resolution=8)
    assert data.name == "image-folder" and data.images.shape == (3, 3, 8, 8) and data.resolution == 8
    assert data.labels.tolist() == [0, 1, 1]  # sorted paths: cat/a.png, dog/b.png, dog/nested/c.jpg
    as_bytes = ((data.images + 1) * 127.5).round().to(torch.uint8)
    assert (as_bytes[0] == torch.tensor([10, 20, 30], dtype=torch.uint8).view(3, 1, 1)).all()
    np.testing.assert_array_equal(as_bytes[1].permute(1, 2, 0).numpy(), exact)  # PNG is lossless
    assert (as_bytes[2].int() - 200).abs().max() <= 2  # JPEG is lossy, but a flat grey stays grey

    limited = load_dataset("image-folder", path=str(tmp_path), resolution=8, limit=2)
    assert limited.labels.tolist() == [0, 1] and limited.fingerprint != data.fingerprint
    gray = load_dataset("image-folder", path=str(tmp_path), resolution=8, channels=1)
    expected_gray = np.asarray(Image.fromarray(exact).convert("L"))  # PIL's own luminance
    np.testing.assert_array_equal(((gray.images[1, 0] + 1) * 127.5).round().to(torch.uint8).numpy(), expected_gray)
    assert load_dataset("image-folder", path=str(tmp_path)).images.shape == (3, 3, 32, 32)  # default 32


def test_image_folder_without_class_subfolders_has_no_labels(tmp_path: Path) -> None:
    _save(tmp_path / "top.png", _solid(6, 6, (0, 0, 0)))
    _save(tmp_path / "class_a" / "x.PNG", _solid(6, 6, (255, 255, 255)))
    data = load_dataset("image-folder", path=str(tmp_path), resolution=6)
    assert data.labels is None and len(data) == 2
    assert data.images[0].min() == 1.0 and data.images[1].max() == -1.0  # class_a/x.PNG sorts first


def test_image_folder_errors(tmp_path: Path) -> None:
    missing = tmp_path / "absent"
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("image-folder", path=str(missing))
    _assert_names_layout(err, "image-folder", missing)

    with pytest.raises(DatasetError) as err:
        load_dataset("image-folder")
    _assert_names_layout(err, "image-folder")

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("no images")
    with pytest.raises(DatasetError, match="no images found") as err:
        load_dataset("image-folder", path=str(empty))
    _assert_names_layout(err, "image-folder", empty)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="could not decode bad.png") as err:
        load_dataset("image-folder", path=str(broken))
    _assert_names_layout(err, "image-folder", broken)

    _save(broken / "fine.png", _solid(4, 4, (1, 2, 3)))
    with pytest.raises(DatasetError, match="split='test'") as err:
        load_dataset("image-folder", path=str(broken), split="test")
    _assert_names_layout(err, "image-folder", broken)

    with pytest.raises(DatasetError, match="not a folder") as err:
        load_dataset("image-folder", path=str(broken / "fine.png"))
    _assert_names_layout(err, "image-folder", broken / "fine.png")


# --------------------------------------------------------------------------------------- argument checks


def test_unknown_dataset_lists_choices() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; choose one of: cifar10, digits, image-folder"):
        load_dataset("mnist")


@pytest.mark.parametrize("kwargs, argument", [
    ({"resolution": 3}, "resolution"),
    ({"resolution": 8.0}, "resolution"),
    ({"resolution": True}, "resolution"),
    ({"channels": 2}, "channels"),
    ({"channels": 4}, "channels"),
    ({"limit": 0}, "limit"),
    ({"split": "validation"}, "split"),
])
def test_bad_arguments_name_dataset_and_argument(kwargs: dict, argument: str) -> None:
    for name in ("digits", "cifar10", "image-folder"):
        with pytest.raises(ValueError, match=rf"dataset '{name}': {argument} must be"):
            load_dataset(name, path="/does/not/matter", **kwargs)


def test_image_dataset_rejects_inconsistent_fields() -> None:
    with pytest.raises(ValueError, match="resolution"):
        ImageDataset("x", torch.zeros(2, 1, 4, 4), None, 8, "f")
    with pytest.raises(ValueError, match="labels"):
        ImageDataset("x", torch.zeros(2, 1, 4, 4), torch.zeros(3, dtype=torch.int64), 4, "f")
    with pytest.raises(ValueError, match="float32"):
        ImageDataset("x", torch.zeros(2, 1, 4, 4, dtype=torch.float64), None, 4, "f")


# ------------------------------------------------------------------------------------------ batches


def _epoch(n: int, batch: int, **kwargs) -> list[list[int]]:
    return [b.tolist() for b in iterate_batches(n, batch, **kwargs)]


def test_iterate_batches_is_deterministic_and_reshuffles_per_epoch() -> None:
    first = _epoch(50, 8, seed=3, epoch=0)
    assert first == _epoch(50, 8, seed=3, epoch=0)
    assert first != _epoch(50, 8, seed=3, epoch=1) and first != _epoch(50, 8, seed=4, epoch=0)
    assert _epoch(50, 8, seed=1, epoch=0) != _epoch(50, 8, seed=0, epoch=1)
    assert len(first) == 6 and all(len(b) == 8 for b in first)  # 50 // 8 full batches, last 2 dropped
    flat = [i for b in first for i in b]
    assert len(set(flat)) == 48 and set(flat) <= set(range(50))
    batches = list(iterate_batches(load_dataset("digits", limit=20), 4, seed=0, epoch=0))  # any Sized works
    assert all(b.dtype == torch.int64 for b in batches)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_iterate_batches_shards_disjointly_and_reassembles_the_global_batch(world_size: int) -> None:
    n, batch = 61, 12
    global_batches = _epoch(n, batch, seed=7, epoch=2)
    per_rank = [_epoch(n, batch, seed=7, epoch=2, rank=r, world_size=world_size) for r in range(world_size)]
    assert all(len(p) == len(global_batches) for p in per_rank)  # ranks stay in lock-step
    for step, global_batch in enumerate(global_batches):
        slices = [p[step] for p in per_rank]
        assert all(len(s) == batch // world_size for s in slices)
        flat = [i for s in slices for i in s]
        assert len(flat) == len(set(flat))  # disjoint
        assert flat == global_batch  # rank order reassembles the global batch


def test_iterate_batches_keep_last_covers_every_index_once() -> None:
    n, batch, world = 23, 8, 4
    per_rank = [_epoch(n, batch, seed=0, epoch=0, rank=r, world_size=world, drop_last=False) for r in range(world)]
    assert len({len(p) for p in per_rank}) == 1 and len(per_rank[0]) == 3
    assert [len(p[-1]) for p in per_rank] == [2, 2, 2, 1]  # the 7 left over, split as evenly as possible
    flat = sorted(i for p in per_rank for b in p for i in b)
    assert flat == list(range(n))


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": 10, "world_size": 3}, "divisible by world_size"),
    ({"batch_size": 4, "rank": 2, "world_size": 2}, "rank must be in"),
    ({"batch_size": 0}, "batch_size and world_size must be >= 1"),
    ({"batch_size": 40}, "fewer than batch_size=40"),
    ({"batch_size": 4, "epoch": -1}, "epoch must be >= 0"),
    ({"batch_size": 4, "seed": 1.5}, "seed must be an int"),
])
def test_iterate_batches_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    arguments = {"seed": 0, "epoch": 0} | kwargs
    with pytest.raises(ValueError, match=match):
        iterate_batches(30, **arguments)


# ------------------------------------------------------------------------------------------------- grids


def test_save_image_grid_writes_png_of_the_right_size(tmp_path: Path) -> None:
    images = torch.linspace(-1, 1, 5 * 3 * 4 * 6).reshape(5, 3, 4, 6)
    path = save_image_grid(images, tmp_path / "nested" / "grid.png", nrow=3, min_side=0)
    assert path == tmp_path / "nested" / "grid.png"
    with Image.open(path) as png:
        assert png.format == "PNG" and png.mode == "RGB"
        assert png.size == (3 * (6 + 2) + 2, 2 * (4 + 2) + 2)  # 3 columns, 2 rows, 2-pixel padding
        pixels = np.asarray(png)
    # Image 4 sits at row 1, column 1: top-left corner (2 + 6, 2 + 8).
    expected = ((images[4] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(pixels[8:12, 10:16], expected)
    assert pixels[:2].max() == 0 and pixels[8:12, 18:24].max() == 0  # padding and the empty sixth cell


def test_save_image_grid_grayscale_default_rows_and_clipping(tmp_path: Path) -> None:
    images = torch.zeros(7, 1, 5, 5)
    images[0] = 3.0
    images[1] = float("nan")
    with Image.open(save_image_grid(images, tmp_path / "gray.png", padding=0, min_side=0)) as png:
        assert png.mode == "L" and png.size == (15, 15)  # ceil(sqrt(7)) = 3 per row, 3 rows
        pixels = np.asarray(png)
    assert pixels[0, 0] == 255 and pixels[0, 5] == 128 and pixels[0, 10] == 128
    with pytest.raises(ValueError, match="images must be"):
        save_image_grid(torch.zeros(2, 2, 4, 4), tmp_path / "bad.png")
    with pytest.raises(ValueError, match="nrow"):
        save_image_grid(images, tmp_path / "bad.png", nrow=0)
    with pytest.raises(ValueError, match="min_side"):
        save_image_grid(images, tmp_path / "bad.png", min_side=-1)


def test_save_image_grid_enlarges_small_samples_by_an_integer_factor(tmp_path: Path) -> None:
    # 64 digits of 8x8 make an 82-pixel grid (8 x (8 + 2) + 2); the smallest factor reaching 256 pixels is 4.
    images = torch.rand(64, 1, 8, 8) * 2 - 1
    with Image.open(save_image_grid(images, tmp_path / "digits.png")) as png:
        assert png.size == (328, 328)
        pixels = np.asarray(png)
    with Image.open(save_image_grid(images, tmp_path / "native.png", min_side=0)) as png:
        native = np.asarray(png)
    np.testing.assert_array_equal(pixels, native.repeat(4, axis=0).repeat(4, axis=1))  # nearest neighbour
    with Image.open(save_image_grid(torch.zeros(64, 3, 32, 32), tmp_path / "cifar.png")) as png:
        assert png.size == (274, 274)  # already 256 pixels or more: kept as it is
