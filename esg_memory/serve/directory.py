"""The served memory directory: one writing server per directory, and telling a memory from other data."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from ..persist import WriterLock, is_durable

__all__ = ["DirectoryLock", "check_memory_dir"]


class DirectoryLock(WriterLock):
    """An exclusive advisory lock (``flock``) on ``<dir>/.esg-serve.lock``: one writing server per memory.

    The durable memory's own writer lock already refuses a second writer of the memory; this one
    also covers the wrapper's files next to it (``edited_model.json``), and refuses a second
    server before it spends seconds loading models. Released on `release` or when the process dies.
    """

    FILE = ".esg-serve.lock"


def check_memory_dir(memory_dir: Path) -> bool:
    """True when ``memory_dir`` holds a saved memory; refuses a directory that holds something else."""
    saved = (memory_dir / "edited_model.json").is_file() or (memory_dir / "memory.json").is_file() \
        or is_durable(memory_dir)
    if not saved and memory_dir.exists():
        if not memory_dir.is_dir():
            raise ConfigError(f"{memory_dir} is not a directory")
        extra = [p.name for p in memory_dir.iterdir() if p.name != DirectoryLock.FILE]
        if extra:
            held = ", ".join(sorted(extra)[:5])
            raise ConfigError(f"{memory_dir} is not an esg-memory directory (it holds {held})")
    return saved
