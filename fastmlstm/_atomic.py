"""Atomic file writes: a reader, or a crash, sees either the old file or the complete new one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import torch

from .errors import MissingInputError

__all__ = ["atomic_save", "atomic_write"]


def _file_mode() -> int:
    """The mode ``open()`` would give a new file now: 0o666 less the process umask. Linux shows the
    umask in /proc; elsewhere the only way to read it is to set it, so it is set straight back."""
    try:
        with open("/proc/self/status") as status:
            umask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, suffix: str = ".tmp"):
    """Open a temporary file beside ``path`` for writing; on success fsync it and rename it over
    ``path`` (then fsync the directory); on any error remove it and leave ``path`` untouched.

    The file gets the permissions a plain ``open(path, "w")`` would (the umask applies), not the
    owner-only mode of a temporary file.

    Example::

        with atomic_write("model.pt") as f:
            torch.save(state, f)
    """
    path = Path(path)
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=directory)
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise MissingInputError(f"cannot save {path}: directory {directory} does not exist")
    with atomic_write(path) as f:
        torch.save(obj, f)
