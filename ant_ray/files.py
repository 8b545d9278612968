"""Writing outputs so that no reader ever sees half of one, and reading them back with one-line errors.

Writers (`publishing_file`, `publish_text`, `publishing_folder`) fill a hidden sibling (`.NAME.tmp-XXXXXXXX`),
fsync it and then rename it onto the final name, so a path that exists is a finished output: a crash or a kill
leaves at most a hidden temporary sibling that nothing reads (safe to delete).

What a reader of the final path can see:
- a file is replaced with `os.replace`: the old file or the new one, never a mix (POSIX rename);
- a folder is replaced with Linux's `renameat2(RENAME_EXCHANGE)`, which swaps the two folders in one step: the
  path always holds the complete old folder or the complete new one. A reader that opens several files of a
  folder while it is being replaced may get some from each (our stages write each output folder once per run).
  Where that call is missing (not Linux, or a filesystem without it, e.g. some network filesystems) the old
  folder is renamed aside and the new one renamed in: for the microseconds between the two renames the path is
  absent, never partly written; a crash just there leaves the old folder as a hidden `.NAME.old-XXXXXXXX`.

Readers (`read_json`, `check_safetensors`, `read_safetensors`) turn a truncated or garbage file into a
`CorruptFileError`: one line naming the file and the fix, instead of a parser's traceback.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import secrets
import shutil
import struct
from pathlib import Path
from typing import Any, Iterator

# A safetensors file starts with an 8-byte little-endian header length; headers above this are garbage, not data.
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100
DEFAULT_FIX = "delete it and re-run the step that writes it"


class CorruptFileError(ValueError):
    """A file that exists but cannot be read (truncated, half-written, not in the expected format).

    The message is one line: the file, what is wrong with it, and the fix."""

    def __init__(self, path: str | os.PathLike, problem: str, fix: str = DEFAULT_FIX):
        self.path = Path(path)
        self.problem, self.fix = problem, fix
        one_line = " ".join(f"{self.path} {problem}; {fix}".split())  # parsers' messages may span lines
        super().__init__(one_line)

    def __reduce__(self):
        # copy and pickle (Ray moves exceptions between processes) rebuild it from these, not from its message
        return type(self), (self.path, self.problem, self.fix), self.__dict__


class DiskFull(OSError):
    """The disk filled while an output was written. The message is one line: the output, the free space on its
    filesystem, what it needed, and the fix. Nothing of the output was published (its temporary was removed)."""


_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# Writers that are not Python's own I/O (safetensors' Rust, torch's C++) report a full disk only in their text
_DISK_FULL_TEXT = ("No space left on device", "StorageFull", "Disk quota exceeded")


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or what caused it) is a full disk or an exceeded quota."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, DiskFull) or (isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS):
            return True
        if any(text in str(error) for text in _DISK_FULL_TEXT):
            return True
        error = error.__cause__ or error.__context__
    return False


def _size(path: Path) -> int:
    if path.is_symlink() or not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _megabytes(size: int) -> str:
    return f"{size / 2 ** 20:.1f} MB"


def disk_full_error(final: Path, previous: int) -> DiskFull:
    """The one-line DiskFull for an output at `final` whose temporary was removed after the disk filled;
    `previous` is the size of the version it was replacing (0 if none). What is free now (the temporary gone) is
    a lower bound of what the output needs: it did not fit in that plus what it had written."""
    existing = final.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    mount = existing
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    hint = f" (the version it replaces took {_megabytes(previous)})" if previous else ""
    return DiskFull(f"no space left on device writing {final}: it needs more than the {_megabytes(free)} free on "
                    f"{mount}{hint}; free space there (or use another output_dir) and continue with --resume "
                    "(nothing half-written was kept)")


# ----------------------------------------------------------------------------------------------------- writing
@contextlib.contextmanager
def publishing_file(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final`; when the block ends without error, that file replaces `final`.

    The writer must write to the yielded path (it does not exist yet). On error the temporary file is removed
    and `final` is untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = _unused_sibling(final, "tmp")
    try:
        yield temporary
        if not temporary.is_file():
            raise FileNotFoundError(f"nothing was written to {temporary} (the temporary file for {final})")
        _fsync_path(temporary)
        os.replace(temporary, final)
        _fsync_path(final.parent)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if is_disk_full(error) and not isinstance(error, DiskFull):
            raise disk_full_error(final, _size(final)) from error
        raise


def publish_text(final: str | os.PathLike, text: str) -> None:
    """Write a small text file (a marker, a JSON record) so that it is the old text or the new, never half."""
    with publishing_file(final) as temporary:
        temporary.write_text(text)


@contextlib.contextmanager
def publishing_folder(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; when the block ends without error, that folder replaces
    `final` as a whole (anything else that was in `final` is gone). On error the temporary folder is removed and
    `final` is untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = _unused_sibling(final, "tmp")
    temporary.mkdir()
    try:
        yield temporary
        for path in sorted(temporary.rglob("*"), reverse=True):  # files before the folders holding them
            _fsync_path(path)
        _fsync_path(temporary)
        _replace_folder(temporary, final)
        _fsync_path(final.parent)
    except BaseException as error:
        shutil.rmtree(temporary, ignore_errors=True)
        if is_disk_full(error) and not isinstance(error, DiskFull):
            raise disk_full_error(final, _size(final)) from error
        raise


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file's data to the disk (for writers that publish by their own rename or link)."""
    _fsync_path(Path(path))


def _unused_sibling(final: Path, kind: str) -> Path:
    """A hidden name beside `final` that does not exist yet. Created by the caller with the default permissions
    (tempfile's helpers would make it private to this user, and publishing would keep that)."""
    while True:
        candidate = final.with_name(f".{final.name}.{kind}-{secrets.token_hex(4)}")
        if not os.path.lexists(candidate):
            return candidate


def _fsync_path(path: Path) -> None:
    if path.is_symlink():
        return
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    except OSError as error:  # some filesystems cannot fsync a folder; the data files were flushed already
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(descriptor)


def _replace_folder(temporary: Path, final: Path) -> None:
    if not os.path.lexists(final):
        try:
            os.rename(temporary, final)
            return
        except OSError as error:  # another writer published `final` in the meantime: replace theirs
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    if _exchange(temporary, final):
        _remove(temporary)  # it now holds the old folder
        return
    old = _unused_sibling(final, "old")
    os.rename(final, old)
    os.rename(temporary, final)
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE). False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if result == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(error, f"cannot swap {first} and {second}: {os.strerror(error)}")


# ----------------------------------------------------------------------------------------------------- reading
def read_json(path: str | os.PathLike, *, fix: str = DEFAULT_FIX) -> dict:
    """The JSON object in `path`; CorruptFileError if it is not valid JSON or not an object."""
    path = Path(path)
    try:
        value = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptFileError(path, f"is not valid JSON ({error})", fix) from None
    if not isinstance(value, dict):
        raise CorruptFileError(path, f"holds a JSON {type(value).__name__}, not an object", fix)
    return value


def check_safetensors(path: str | os.PathLike, *, fix: str = DEFAULT_FIX) -> dict[str, Any]:
    """Check that `path` is a whole safetensors file (header parses; the size is exactly what the header
    describes) without reading the tensors. Returns the parsed header. FileNotFoundError if it is absent,
    CorruptFileError if it is truncated or not a safetensors file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CorruptFileError(path, f"is truncated ({size} bytes, not even a safetensors header)", fix)
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > _MAX_SAFETENSORS_HEADER or 8 + header_size > size:
            raise CorruptFileError(path, f"is truncated or not a safetensors file (header of {header_size} bytes "
                                   f"in a file of {size})", fix)
        try:
            header = json.loads(handle.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CorruptFileError(path, "is not a safetensors file (its header is not JSON)", fix) from None
    if not isinstance(header, dict):
        raise CorruptFileError(path, "is not a safetensors file (its header is not a JSON object)", fix)
    data_size = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            _, end = entry["data_offsets"]
            data_size = max(data_size, int(end))
        except (TypeError, KeyError, ValueError):
            raise CorruptFileError(path, f"is not a safetensors file (bad header entry {name!r})", fix) from None
    expected = 8 + header_size + data_size
    if size != expected:
        state = "is truncated" if size < expected else "has trailing bytes"
        raise CorruptFileError(path, f"{state} ({size} bytes, its header describes {expected})", fix)
    return header


def read_safetensors(path: str | os.PathLike, *, device: str = "cpu", fix: str = DEFAULT_FIX) -> dict:
    """All tensors of a safetensors file, after `check_safetensors`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_safetensors(path, fix=fix)
    try:
        return load_file(str(path), device=device)
    except SafetensorError as error:
        raise CorruptFileError(path, f"cannot be read as safetensors ({error})", fix) from None


def check_output_dir(path: str | os.PathLike) -> None:
    """`output_dir` must be a folder this process can write (or be creatable): a one-line ValueError otherwise,
    before anything is written."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ValueError(f"output_dir {path} is not a folder ({existing} is a file); pass --output-dir with a "
                         "folder path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"output_dir {path} is not writable ({existing} is read-only for this user); pass "
                         "--output-dir with a writable folder")
