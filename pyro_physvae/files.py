"""Safe file writes: atomic replacement, temporary files cleaned up, a lock per run directory.

A reader sees the old file or the complete new one, never a part; a file written here is on
disk (``fsync``) before it takes the old one's place, so that neither a killed process nor a
lost machine leaves a half-written checkpoint under its final name.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

#: Temporary files are named ``.<final name>.<random>.tmp`` beside their final name.
TMP_SUFFIX = ".tmp"


def _fsync_directory(directory: Path) -> None:
    """Make a rename within ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Create ``path`` through ``write(tmp)`` on a temporary file in the same directory and
    move it into place; if ``write`` fails, the temporary file is removed and an existing
    ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def remove_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that an interrupted :func:`atomic_write` left in
    ``directory`` (only call this while holding the directory's :class:`DirectoryLock`, so
    that no other writer is using them). Returns the paths removed."""
    removed = []
    for p in Path(directory).glob(f".*{TMP_SUFFIX}"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


class DirectoryInUse(RuntimeError):
    """Another process holds the directory's lock."""


class DirectoryLock:
    """An exclusive, advisory lock on a directory, held through an open ``.lock`` file.

    The operating system releases it when the holder exits, however it exits (a ``kill
    -9`` included), so a stale lock cannot block a later run. Use as a context manager::

        with DirectoryLock(run_dir):
            ...  # the only writer of run_dir

    Raises:
        DirectoryInUse: another process holds the lock.
    """

    NAME = ".lock"

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self) -> DirectoryLock:
        """Take the lock (creating the directory and its empty ``.lock`` file if needed)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / self.NAME, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise DirectoryInUse(f"{self.directory} is in use by another trainer; wait for "
                                     "it to finish or use another directory") from None
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
