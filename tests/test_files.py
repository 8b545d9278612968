"""Outputs are published whole, and damaged files fail with one line naming the file and the fix.

Covers ant_ray.files itself and every writer that uses it: model folders (with and without channel projections),
task vectors, training checkpoints, the cached domain classifier and cached reference statistics.
"""

import multiprocessing
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

import ant_ray.files as files
from ant_ray.deme import add_channel_projections
from ant_ray.diffusion import build_model, load_model, model_is_complete, save_model
from ant_ray.files import CorruptFileError, check_safetensors, publishing_file, publishing_folder, read_json
from ant_ray.fid import DomainClassifierConfig, FeatureStats, load_or_train_domain_classifier
from ant_ray.merge import load_task_vector, save_task_vector
from ant_ray.stages.pretrain import cache_lock
from ant_ray.training import TrainingDiverged, load_training_state, save_training_state


def tiny_model(seed: int = 0):
    return build_model("tiny", resolution=8, channels=1, seed=seed)


def truncate(path: Path, keep: float = 0.5) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(int(size * keep))


def assert_one_line_naming(error: pytest.ExceptionInfo, path: Path) -> None:
    message = str(error.value)
    assert "\n" not in message, message
    assert str(path) in message, message
    assert "delete" in message, message  # the fix


def visible_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def half_writing_save_file(then):
    """A safetensors.torch.save_file that writes half of the file, then calls `then` (raise, or die)."""
    real = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        truncate(Path(filename))
        then()

    return save_file


def crash():
    raise OSError("simulated crash while writing weights")


# ------------------------------------------------------------------------------------------------- publishing
def test_publishing_file_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out" / "value.txt"
    with publishing_file(target) as temporary:
        temporary.write_text("first")
    assert target.read_text() == "first"
    with pytest.raises(RuntimeError, match="midway"):
        with publishing_file(target) as temporary:
            temporary.write_text("sec")
            raise RuntimeError("midway")
    assert target.read_text() == "first"
    assert os.listdir(target.parent) == ["value.txt"]  # the temporary file is gone too
    files.publish_text(target, "third")  # the small records and markers a resume reads
    assert target.read_text() == "third" and os.listdir(target.parent) == ["value.txt"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_publishing_folder_replaces_the_old_folder_as_a_unit(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(files, "_exchange", lambda first, second: False)
    target = tmp_path / "model"
    with publishing_folder(target) as temporary:
        (temporary / "a.txt").write_text("old")
        (temporary / "stale.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with publishing_folder(target) as temporary:
            (temporary / "a.txt").write_text("half")
            raise RuntimeError("writer died")
    assert (target / "a.txt").read_text() == "old"
    with publishing_folder(target) as temporary:
        (temporary / "a.txt").write_text("new")
    assert sorted(os.listdir(target)) == ["a.txt"] and (target / "a.txt").read_text() == "new"
    assert os.listdir(tmp_path) == ["model"]  # no temporary or old folder left behind


def test_a_reader_always_finds_a_whole_folder_while_it_is_replaced(tmp_path):
    probe_a, probe_b = tmp_path / "probe_a", tmp_path / "probe_b"
    probe_a.mkdir(), probe_b.mkdir()
    if not files._exchange(probe_a, probe_b):
        pytest.skip("this system cannot swap folders in one step (documented: a brief window without the folder)")
    target = tmp_path / "model"
    with publishing_folder(target) as temporary:
        (temporary / "weights").write_text("0")
    misses, stop = [], threading.Event()

    def read_repeatedly():
        while not stop.is_set():
            try:
                (target / "weights").read_text()
            except FileNotFoundError:
                misses.append(1)

    reader = threading.Thread(target=read_repeatedly)
    reader.start()
    try:
        for version in range(1, 200):
            with publishing_folder(target) as temporary:
                (temporary / "weights").write_text(str(version))
    finally:
        stop.set()
        reader.join()
    assert not misses and (target / "weights").read_text() == "199"


def test_published_files_keep_the_default_permissions(tmp_path):
    with publishing_file(tmp_path / "f") as temporary:
        temporary.write_text("x")
    with publishing_folder(tmp_path / "d") as temporary:
        (temporary / "g").write_text("x")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~umask


# ------------------------------------------------------------------------------------------------ model folders
def test_saved_models_are_complete_and_damage_is_one_line_naming_the_file(tmp_path):
    folder = save_model(tiny_model(), tmp_path / "model")
    assert model_is_complete(folder)
    assert not model_is_complete(tmp_path / "absent")

    weights = folder / "diffusion_pytorch_model.safetensors"
    truncate(weights)
    assert not model_is_complete(folder)
    with pytest.raises(CorruptFileError) as error:
        load_model(folder)
    assert_one_line_naming(error, weights)
    assert "truncated" in str(error.value)

    weights.write_bytes(b"\xff" * 64)  # header garbage: an absurd header length
    with pytest.raises(CorruptFileError) as error:
        load_model(folder)
    assert_one_line_naming(error, weights)


def test_garbage_config_json_is_one_line_error(tmp_path):
    folder = save_model(tiny_model(), tmp_path / "model")
    config = folder / "config.json"
    config.write_text('{"_class_name": "UNet2DModel", "sample_si')
    assert not model_is_complete(folder)
    with pytest.raises(CorruptFileError) as error:
        load_model(folder)
    assert_one_line_naming(error, config)
    config.write_text("[1, 2]")
    with pytest.raises(CorruptFileError, match="not an object"):
        load_model(folder)


def test_projection_files_are_checked_too(tmp_path):
    folder = save_model(add_channel_projections(tiny_model(), places=["mid_block"]), tmp_path / "model")
    assert model_is_complete(folder)
    projections = folder / "channel_projections.safetensors"
    truncate(projections, keep=0.9)
    with pytest.raises(CorruptFileError) as error:
        load_model(folder)
    assert_one_line_naming(error, projections)
    projections.unlink()
    with pytest.raises(CorruptFileError, match="missing beside channel_projections.json"):
        load_model(folder)


def test_a_folder_half_written_by_the_old_in_place_writer_is_not_complete(tmp_path):
    """Before atomic publishing, config.json was written first: such a folder must not count as finished."""
    folder = tmp_path / "model"
    tiny_model().save_pretrained(folder, safe_serialization=True)
    truncate(folder / "diffusion_pytorch_model.safetensors", keep=0.3)
    assert (folder / "config.json").is_file() and not model_is_complete(folder)


def test_a_writer_that_fails_midway_leaves_no_model_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors.torch, "save_file", half_writing_save_file(crash))
    with pytest.raises(OSError, match="simulated crash"):
        save_model(tiny_model(), tmp_path / "model")
    assert os.listdir(tmp_path) == []
    assert not model_is_complete(tmp_path / "model")


def _die_while_saving(folder: str, publish_first: bool) -> None:
    """Child process: optionally publish a model at `folder`, then die (no cleanup, no exception handling)
    halfway through writing another model there."""
    if publish_first:
        save_model(tiny_model(seed=1), Path(folder))
    safetensors.torch.save_file = half_writing_save_file(lambda: os._exit(17))
    save_model(tiny_model(seed=2), Path(folder))


def run_and_kill(folder: Path, publish_first: bool) -> None:
    child = multiprocessing.get_context("fork").Process(target=_die_while_saving, args=(str(folder), publish_first))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == 17


def test_a_process_killed_while_writing_a_new_model_leaves_no_folder_that_looks_complete(tmp_path):
    folder = tmp_path / "model"
    run_and_kill(folder, publish_first=False)
    assert not folder.exists() and not model_is_complete(folder)
    assert [name for name in os.listdir(tmp_path) if name.startswith(".model.tmp-")]  # ignored by every reader
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(folder)


def test_a_process_killed_while_replacing_a_model_leaves_the_old_one_intact(tmp_path):
    folder = tmp_path / "model"
    run_and_kill(folder, publish_first=True)
    assert model_is_complete(folder)
    expected = tiny_model(seed=1).state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in load_model(folder).state_dict().items())


# ------------------------------------------------------------------------------------- task vectors, checkpoints
def test_truncated_task_vector_is_one_line_error(tmp_path):
    base, finetuned = tiny_model(0).state_dict(), tiny_model(1).state_dict()
    path = tmp_path / "tv.safetensors"
    save_task_vector(path, base, finetuned, {"range": (0, 500)})
    check_safetensors(path)
    truncate(path)
    with pytest.raises(CorruptFileError) as error:
        load_task_vector(path)
    assert_one_line_naming(error, path)


def test_task_vector_writer_that_fails_leaves_no_file(tmp_path, monkeypatch):
    import ant_ray.merge.task_vectors as task_vectors

    monkeypatch.setattr(task_vectors, "save_file", half_writing_save_file(crash))
    with pytest.raises(OSError, match="simulated crash"):
        save_task_vector(tmp_path / "tv.safetensors", tiny_model(0).state_dict(), tiny_model(1).state_dict())
    assert os.listdir(tmp_path) == []


def _training_objects(seed: int):
    model = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(model.weight, float(seed))
    ema = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return model, ema, optimizer


def test_damaged_checkpoint_is_one_line_error_and_restores_nothing(tmp_path):
    folder = tmp_path / "state"
    model, ema, optimizer = _training_objects(1)
    save_training_state(folder, model=model, ema=ema, optimizer=optimizer, step=7)
    fresh_model, fresh_ema, fresh_optimizer = _training_objects(5)
    before = fresh_model.weight.detach().clone()

    damaged = folder / "optimizer.safetensors"
    truncate(damaged)
    with pytest.raises(CorruptFileError) as error:
        load_training_state(folder, model=fresh_model, ema=fresh_ema, optimizer=fresh_optimizer)
    assert_one_line_naming(error, damaged)
    assert torch.equal(fresh_model.weight, before)  # checked before anything was restored

    save_training_state(folder, model=model, ema=ema, optimizer=optimizer, step=8)  # replaces the damaged one
    assert load_training_state(folder, model=fresh_model, ema=fresh_ema, optimizer=fresh_optimizer)["step"] == 8
    (folder / "state.json").write_text("{not json")
    with pytest.raises(CorruptFileError) as error:
        load_training_state(folder, model=fresh_model, ema=fresh_ema, optimizer=fresh_optimizer)
    assert_one_line_naming(error, folder / "state.json")
    (folder / "state.json").unlink()
    with pytest.raises(CorruptFileError, match="state.json is missing"):
        load_training_state(folder, model=fresh_model, ema=fresh_ema, optimizer=fresh_optimizer)


def test_a_non_finite_state_is_never_a_checkpoint(tmp_path):
    """A loop that checks its loss every few steps may reach a checkpoint after diverging: the save refuses, and
    the previous checkpoint stays (a resume from NaN would only diverge again)."""
    folder = tmp_path / "state"
    model, ema, optimizer = _training_objects(1)
    save_training_state(folder, model=model, ema=ema, optimizer=optimizer, step=5)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"non-finite weights \(weight\); it was not saved"):
        save_training_state(folder, model=model, ema=ema, optimizer=optimizer, step=10)
    with torch.no_grad():
        model.weight[0, 0], ema.bias[0] = 1.0, float("inf")
    with pytest.raises(TrainingDiverged, match="EMA model"):
        save_training_state(folder, model=model, ema=ema, optimizer=optimizer, step=10)
    fresh = _training_objects(5)
    assert load_training_state(folder, model=fresh[0], ema=fresh[1], optimizer=fresh[2])["step"] == 5
    assert visible_entries(tmp_path) == ["state"]


# ----------------------------------------------------------------------------------------------------- caches
def test_truncated_reference_stats_are_one_line_error(tmp_path):
    path = tmp_path / "ref.npz"
    FeatureStats.from_features(np.random.default_rng(0).normal(size=(10, 3))).save(path)
    assert FeatureStats.load(path).n == 10
    truncate(path)
    with pytest.raises(CorruptFileError) as error:
        FeatureStats.load(path)
    assert_one_line_naming(error, path)
    path.write_bytes(b"garbage, not a zip archive")
    with pytest.raises(CorruptFileError) as error:
        FeatureStats.load(path)
    assert_one_line_naming(error, path)


def test_truncated_domain_classifier_cache_is_one_line_error(tmp_path):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(16, 1, 8, 8, generator=generator) * 2 - 1
    labels = torch.arange(16) % 2
    options = dict(dataset_name="toy", dataset_fingerprint="toy-1", cache_dir=tmp_path,
                   config=DomainClassifierConfig(epochs=1, batch_size=8, feature_dim=8, widths=(4, 4)))
    trained = load_or_train_domain_classifier(images, labels, **options)
    assert visible_entries(tmp_path) == sorted([trained.weights_path.name, trained.weights_path.stem + ".json"])
    truncate(trained.weights_path)
    with pytest.raises(CorruptFileError) as error:
        load_or_train_domain_classifier(images, labels, **options)
    assert_one_line_naming(error, trained.weights_path)


def test_read_json_names_the_file(tmp_path):
    path = tmp_path / "x.json"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(CorruptFileError) as error:
        read_json(path, fix="delete it")
    assert_one_line_naming(error, path)


def _build_entry_once(entry: str, log: str) -> None:
    """What `pretrained_model` does around training: check, lock, check again, build, publish."""
    target = Path(entry)
    if target.is_dir():
        return
    with cache_lock(target):
        if target.is_dir():  # built by the other run while this one waited
            with open(log, "a") as handle:
                handle.write("reused\n")
            return
        with publishing_folder(target) as temporary:
            time.sleep(1.0)  # long enough for the other process to arrive and wait
            (temporary / "weights").write_text("whole")
        with open(log, "a") as handle:
            handle.write("built\n")


def test_runs_sharing_an_output_dir_build_a_cache_entry_once(tmp_path):
    entry, log = tmp_path / "cache" / "pretrained" / "key", tmp_path / "log"
    context = multiprocessing.get_context("fork")  # the children only lock and write files
    first = context.Process(target=_build_entry_once, args=(str(entry), str(log)))
    first.start()
    deadline = time.time() + 60
    while not (tmp_path / "cache" / "locks").is_dir() and time.time() < deadline:
        time.sleep(0.05)  # the first holds the lock before the second arrives
    second = context.Process(target=_build_entry_once, args=(str(entry), str(log)))
    second.start()
    for process in (first, second):
        process.join(120)
        assert process.exitcode == 0
    assert sorted(log.read_text().split()) == ["built", "reused"]
    assert (entry / "weights").read_text() == "whole"
    assert [p.name for p in entry.parent.iterdir()] == ["key"]  # no temporary folder left beside it


# ----------------------------------------------------------------------------------------------------- full disk
def _fills_the_disk(after: int):
    """A writer that writes `after` bytes, then fails as a full disk does (Python's own I/O: OSError ENOSPC).
    (A real full disk, a 2 MB tmpfs, gives the same: checked by hand, as mounting needs root.)"""
    def write(path: Path) -> None:
        path.write_bytes(b"x" * after)
        raise OSError(28, "No space left on device")
    return write


def test_a_full_disk_is_one_line_naming_the_output_and_the_space_it_needs(tmp_path):
    final = tmp_path / "record.json"
    final.write_bytes(b"y" * 3 * 2 ** 20)  # the version being replaced: the best guess of the size needed
    with pytest.raises(files.DiskFull) as error, publishing_file(final) as temporary:
        _fills_the_disk(2 ** 20)(temporary)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"no space left on device writing {final}: ")
    assert " MB free on /" in message and "it needs more than the " in message
    assert "(the version it replaces took 3.0 MB)" in message
    assert "--resume" in message
    assert final.read_bytes() == b"y" * 3 * 2 ** 20 and visible_entries(tmp_path) == ["record.json"]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # nothing half-written is left

    # safetensors (Rust) says it only in its text; a folder output reports what it had written
    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"z" * 2 ** 20)
        raise safetensors.SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                          'message: "No space left on device" })')

    folder = tmp_path / "checkpoint"
    with pytest.raises(files.DiskFull, match=r"writing .*checkpoint: it needs more than the .* MB free on "
                                             r"/.*; free space there"), publishing_folder(folder) as temp:
        save_file({}, temp / "model.safetensors")
    assert not folder.exists() and visible_entries(tmp_path) == ["record.json"]


def test_other_write_errors_are_not_called_a_full_disk(tmp_path):
    with pytest.raises(PermissionError), publishing_file(tmp_path / "a.json"):
        raise PermissionError(13, "Permission denied")
    assert not files.is_disk_full(OSError(5, "Input/output error"))
    assert files.is_disk_full(RuntimeError("write failed")) is False
