"""Crash-safe file and directory writes, and hardened reads: public, `index` and `esg_memory` both use them.

A save must never leave a half-written directory where a good one was: we write into a
sibling temp directory, fsync every file and the directory, then swap it in with renames.
If the process dies between the two renames, the previous version is still on disk under
``<name>.old`` and `recover_dir` puts it back on the next load.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "NotRegularFileError",
    "NotReplaceableError",
    "atomic_directory",
    "atomic_write_bytes",
    "check_replaceable",
    "fsync_dir",
    "read_regular_file",
    "recover_dir",
]


class NotRegularFileError(OSError):
    """A file a loader must read is a FIFO, a device or a directory (reading it could block or never end)."""


def read_regular_file(path: str | os.PathLike) -> bytes:
    """The bytes of a regular file (symlinks followed); a FIFO, device or directory is refused unread.

    A hostile directory could name ``/dev/zero`` (a read that never ends) or a FIFO (an open that
    never returns) where a data file should be; ``O_NONBLOCK`` keeps the open itself from blocking.
    Reads at most one byte more than the size ``fstat`` reports, so a file growing meanwhile shows
    up as a size mismatch rather than an endless read.
    """
    fd = os.open(os.fspath(path), os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(f"{os.fspath(path)!r} is not a regular file")
        chunks, left = [], st.st_size + 1
        while left > 0:
            b = os.read(fd, min(left, 1 << 24))
            if not b:
                break
            chunks.append(b)
            left -= len(b)
        return b"".join(chunks)
    finally:
        os.close(fd)


class NotReplaceableError(FileExistsError):
    """The target of a directory save exists and is not something that save may replace."""


def check_replaceable(path: str | os.PathLike, marker: str | None = None) -> None:
    """Refuse to let a save replace anything but a missing path, an empty directory or its own kind.

    ``atomic_directory`` swaps the target out as a whole and deletes it, so a mistyped path must
    never be a file, a device, a symlink, or (with ``marker``) a non-empty directory without the
    ``marker`` file that every directory of that kind has (``memory.json``, ``index.json``, ...).
    """
    path = Path(path)
    if "\x00" in str(path):
        raise NotReplaceableError(f"{str(path)!r}: a path cannot contain NUL")
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        raise NotReplaceableError(f"{str(path)!r} exists and is not a directory; refusing to replace it")
    if marker is not None and not (path / marker).is_file() and any(path.iterdir()):
        raise NotReplaceableError(
            f"{str(path)!r} is a non-empty directory without {marker!r}, not one written here; "
            "refusing to replace it (choose a new or empty directory)"
        )


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory entry so renames inside it survive a power cut."""
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see either the old file or the whole new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def recover_dir(path: str | os.PathLike) -> None:
    """Undo a swap interrupted between its two renames (``path`` gone, ``path.old`` kept)."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    if not path.exists() and old.is_dir():
        os.rename(old, path)
        fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, marker: str | None = None) -> Iterator[Path]:
    """Yield an empty temp directory; on success it replaces ``path`` as a whole.

    On an exception nothing at ``path`` changes and the temp directory is removed. ``path`` must
    pass `check_replaceable` (with ``marker``), else `NotReplaceableError` before anything is written.
    """
    check_replaceable(path, marker)
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    check_replaceable(path, marker)  # what recover_dir put back
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        old = path.with_name(path.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            os.rename(path, old)
        os.rename(tmp, path)
        fsync_dir(path.parent)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
