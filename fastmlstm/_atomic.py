"""Atomic writes: a reader, or a crash, sees either the old files or the complete new ones.

Two tools:

* :func:`atomic_write` / :func:`atomic_save` replace one file: a temporary file beside it, fsync,
  one rename.
* :class:`FileSet` replaces a *set* of files in a folder as one step (a saved model's
  ``config.json`` + ``model.safetensors``, the released layout's 15 arrays, a dataset's extracted
  files). How, so that a failure at any step leaves the previous set in place:

  - a folder that does not exist yet is written whole under a hidden name beside it
    (``.<name>.fastmlstm-new-XXXX``) and renamed into place: it appears complete or not at all;
  - in an existing folder the new files are first written in full into ``.fastmlstm-txn/new/``
    inside it; a journal (``.fastmlstm-txn/journal.json``, the list of files) is written; the
    current files are moved into ``.fastmlstm-txn/old/`` and the new ones into place; removing the
    journal is the commit. An error before the commit moves the old files back, so the folder is
    byte-identical to before. If even that fails (or the process dies), the journal stays, and
    :func:`committed_path` tells a reader where each file of the previous set is; the next
    :class:`FileSet` on the folder puts them back first.

  The folder itself is never moved or replaced, so its other files, its permissions, a mount on it
  or a process working inside it are left alone; only the files named in the set are touched.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import InputError, MissingInputError

try:
    import fcntl
except ImportError:  # Windows has no advisory locks: concurrent writers of one folder are not serialized
    fcntl = None

__all__ = ["DirectoryInTheWayError", "FileSet", "UnwritableError", "atomic_save", "atomic_write", "committed_path",
           "folder_lock", "fsync_directory", "interrupted", "make_directory", "recover", "TXN_DIR"]

TXN_DIR = ".fastmlstm-txn"
_JOURNAL = "journal.json"
logger = logging.getLogger("fastmlstm")


class DirectoryInTheWayError(InputError, IsADirectoryError):
    """A file was to be written where a directory is. An InputError (the path is the user's), and
    still the IsADirectoryError (an OSError) that callers catching OSError expect."""


class UnwritableError(InputError, OSError):
    """A file could not be written: a full disk, a read-only file system, no permission. An
    InputError (the user's to fix, reported in one line), and still the OSError, with the cause's
    ``errno`` and ``strerror``, that callers catching OSError expect."""

    def __init__(self, message: str, cause: OSError | None = None):
        super().__init__(message)
        if cause is not None:
            self.errno, self.strerror = cause.errno, cause.strerror

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class _Recording:
    """A file whose ``write`` keeps the OSError it raised: ``torch.save`` turns a failed write (a
    full disk) into a RuntimeError of its own ("unexpected pos ...") that does not say why."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.file.flush()


def _umask() -> int:
    """The process umask. Linux shows it in /proc; elsewhere the only way to read it is to set it,
    so it is set straight back."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
        return umask


def _file_mode() -> int:
    """The mode ``open()`` would give a new file now: 0o666 less the process umask."""
    return 0o666 & ~_umask()


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make the renames in ``directory`` durable where the OS allows (not every system can fsync a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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
    if path.is_dir():  # else the rename fails, naming the temporary file instead of the user's path
        raise DirectoryInTheWayError(f"cannot write {path}: it is a directory (give a file name)")
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
    fsync_directory(directory)


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise MissingInputError(f"cannot save {path}: directory {directory} does not exist")
    with atomic_write(path) as f:
        recording = _Recording(f)
        try:
            torch.save(obj, recording)
        except RuntimeError:
            if recording.error is None:
                raise
            raise recording.error from None  # the OSError (e.g. ENOSPC) that made torch's write fail


def make_directory(path: str | os.PathLike, what: str = "folder") -> list[Path]:
    """Create folder ``path`` and its missing parents; returns the folders it created, outermost first.

    Raises InputError naming the path when it cannot be a folder (a file is in the way, no
    permission, a read-only file system), instead of the bare OSError.
    """
    path = Path(path)
    missing = []
    probe = path
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise InputError(f"cannot use {path} as the {what}: {probe} is a file, not a folder")
    created = []
    for folder in reversed(missing):
        try:
            os.mkdir(folder)
        except FileExistsError:
            if not folder.is_dir():
                raise InputError(f"cannot use {path} as the {what}: {folder} is a file, not a folder") from None
            continue
        except OSError as exc:
            raise InputError(f"cannot create the {what} {folder}: {exc.strerror or exc}") from None
        created.append(folder)
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError(f"cannot write into the {what} {path}: permission denied")
    return created


def _remove_created(created: list[Path]) -> None:
    """Remove the folders :func:`make_directory` created, innermost first, where they are still empty."""
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def interrupted(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds an unfinished :class:`FileSet` replacement (its journal)."""
    return (Path(folder) / TXN_DIR / _JOURNAL).is_file()


def _journal(folder: Path) -> list[str]:
    try:
        names = json.loads((folder / TXN_DIR / _JOURNAL).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:  # committed (or rolled back) since the caller saw it: no replacement is unfinished
        return []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{folder / TXN_DIR / _JOURNAL} (the record of an unfinished write) cannot be read "
                         f"({exc}); remove {folder / TXN_DIR} after checking the folder by hand") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise InputError(f"{folder / TXN_DIR / _JOURNAL} is not a list of files; remove {folder / TXN_DIR} "
                         "after checking the folder by hand")
    return names


def committed_path(folder: str | os.PathLike, name: str) -> Path | None:
    """Where the last completely written version of ``folder/name`` is, or None if there is none.

    Normally ``folder/name`` itself. While a :class:`FileSet` replacement is unfinished (a failure
    it could not undo, or a killed process), the previous version: moved aside to
    ``.fastmlstm-txn/old/`` already, still in place, or absent if the set is adding the file.
    """
    folder = Path(folder)
    real = folder / name
    if not interrupted(folder) or name not in _journal(folder):
        return real if real.exists() else None
    old, new = folder / TXN_DIR / "old" / name, folder / TXN_DIR / "new" / name
    if old.exists():
        return old
    if new.exists():  # not moved in yet: whatever is at the real name is the previous version
        return real if real.exists() else None
    return None  # moved in, and nothing was there before


def _roll_back(folder: Path) -> None:
    """Put the files of an unfinished replacement back as they were, then drop the journal."""
    txn = folder / TXN_DIR
    for name in _journal(folder):
        old, new, real = txn / "old" / name, txn / "new" / name, folder / name
        if old.exists():
            os.replace(old, real)
        elif not new.exists():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(real)
    fsync_directory(folder)
    os.unlink(txn / _JOURNAL)


def _recover(folder: Path) -> None:
    """Undo an unfinished replacement and remove the staging folder of an earlier one."""
    txn = folder / TXN_DIR
    if interrupted(folder):
        logger.warning("fastmlstm: %s holds an unfinished write; putting its previous files back", folder)
        _roll_back(folder)
    if txn.exists():
        shutil.rmtree(txn)


def recover(folder: str | os.PathLike) -> None:
    """Put back the previous files of a :class:`FileSet` replacement in ``folder`` that could not
    finish (nor undo itself), and clear what it left; nothing happens to a folder without one."""
    folder = Path(folder)
    if (folder / TXN_DIR).exists():
        with folder_lock(folder):
            _recover(folder)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, waiting: str | None = None, *, shared: bool = False):
    """Hold an exclusive advisory lock on ``folder`` itself (no lock file is left behind), or with
    ``shared`` a shared one: what a reader of a :class:`FileSet`'s files holds, so that it reads
    them before or after a replacement, never while one is halfway (a writer holds the exclusive
    lock from start to commit). If another process holds it, log ``waiting`` (when given) and
    wait. Where the system has no such locks (Windows, some network file systems) this does nothing."""
    fd = None
    if fcntl is not None:
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        with contextlib.suppress(OSError):
            fd = os.open(folder, os.O_RDONLY)
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                if waiting:
                    logger.warning("%s", waiting)
                fcntl.flock(fd, mode)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


# What a write into an open file fails with for want of room (never a read of the caller's).
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


class FileSet:
    """Replace a set of files in ``folder`` (created if needed) as one atomic step.

    Use as a context manager; write each file with :meth:`open` (a binary file) or :meth:`write`.
    On a clean exit the set replaces the files of the same names; on an exception, nothing in the
    folder has changed. Files of the folder that are not in the set are never touched.

    Example::

        with FileSet("exported") as files:
            files.write("config.json", b"{}")
            with files.open("weights.bin") as f:
                f.write(data)
    """

    def __init__(self, folder: str | os.PathLike, *, what: str = "folder"):
        self.folder = Path(folder)
        self.what = what
        self.names: list[str] = []
        self._created: list[Path] = []
        self._lock = contextlib.ExitStack()
        self._stage: Path | None = None
        self._fresh = False

    def __enter__(self) -> FileSet:
        folder = self.folder
        if folder.exists():
            if not folder.is_dir():
                raise InputError(f"cannot write the {self.what} {folder}: it is a file, not a folder")
            self._enter_existing()
            return self
        if folder.is_symlink():  # else the staged folder's rename onto the link fails (NotADirectoryError)
            raise InputError(f"cannot write the {self.what} {folder}: it is a symbolic link to "
                             f"{os.readlink(folder)}, which does not exist")
        self._created = make_directory(folder.parent, self.what) if str(folder.parent) else []
        try:
            self._stage = Path(tempfile.mkdtemp(prefix=f".{folder.name}.fastmlstm-new-", dir=folder.parent))
        except OSError as exc:
            _remove_created(self._created)
            raise InputError(f"cannot write the {self.what} {folder}: {exc.strerror or exc}") from None
        self._fresh = True
        return self

    def _enter_existing(self) -> None:
        if not os.access(self.folder, os.W_OK | os.X_OK):
            raise InputError(f"cannot write into the {self.what} {self.folder}: permission denied")
        self._lock.enter_context(folder_lock(self.folder))
        try:
            _recover(self.folder)
            os.mkdir(self.folder / TXN_DIR)
            try:
                os.mkdir(self.folder / TXN_DIR / "new")
            except BaseException:
                with contextlib.suppress(OSError):
                    os.rmdir(self.folder / TXN_DIR)
                raise
        except BaseException:
            self._lock.close()
            raise
        self._stage = self.folder / TXN_DIR / "new"

    def _target(self, name: str) -> Path:
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts or parts[0] == TXN_DIR:
            raise InputError(f"{name!r} is not a file name inside {self.folder}")
        if name in self.names:
            raise InputError(f"{name!r} is written twice into {self.folder}")
        self.names.append(name)
        path = self._stage / name
        if len(parts) > 1:
            path.parent.mkdir(parents=True, exist_ok=True)
        return path

    @contextlib.contextmanager
    def open(self, name: str):
        """A binary file to write ``name`` (a path relative to the folder) into; fsynced on close. A
        write that fails for want of room (a full disk, a quota, a file size limit, a read-only file
        system) is an :class:`UnwritableError` naming the file, not a bare OSError."""
        try:
            with open(self._target(name), "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            if isinstance(exc, InputError) or exc.errno not in _NO_ROOM:
                raise  # (a read error of the caller's source, say: not this file's to report)
            raise UnwritableError(f"cannot write {self.folder / name}: {exc.strerror or exc} (what was there is "
                                  "unchanged)", exc) from None

    def write(self, name: str, data: bytes) -> None:
        """Write ``data`` as file ``name`` of the set."""
        with self.open(name) as f:
            f.write(data)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._commit()
            else:
                self._abort()
        finally:
            self._lock.close()

    def _abort(self) -> None:
        if not self._fresh and interrupted(self.folder):
            return  # a roll-back that failed: the journal and the staged files tell readers where things are
        with contextlib.suppress(OSError):  # without a journal nothing in it is needed any more
            shutil.rmtree(self._stage if self._fresh else self.folder / TXN_DIR)
        if self._fresh:
            _remove_created(self._created)

    def _commit(self) -> None:
        try:
            self._refuse_folders_in_the_way()
            for directory in {(self._stage / n).parent for n in self.names}:
                fsync_directory(directory)
            if self._fresh and self._rename_fresh():
                return
            self._swap()
        except BaseException:
            self._abort()
            raise

    def _refuse_folders_in_the_way(self) -> None:
        """A folder (not a link) of the user's where a file of the set goes is theirs: the swap would
        move it aside with the replaced files and delete it. Refused before anything changes."""
        for name in self.names:
            path = self.folder / name
            if path.is_dir() and not path.is_symlink():
                raise InputError(f"cannot write {path}: a folder of that name is in the way; move it out of "
                                 f"{self.folder}")

    def _rename_fresh(self) -> bool:
        """Rename the staged folder into place; False when the folder appeared meanwhile (another
        writer): the staged files then replace its files like any existing folder's."""
        os.chmod(self._stage, 0o777 & ~_umask())  # what mkdir would give, not mkdtemp's owner-only mode
        try:
            os.rename(self._stage, self.folder)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not self.folder.is_dir():
                raise
        else:
            fsync_directory(self.folder.parent)
            return True
        staged, self._fresh = self._stage, False
        try:
            self._enter_existing()
            os.rmdir(self._stage)
            os.rename(staged, self._stage)
        except BaseException:
            with contextlib.suppress(OSError):
                shutil.rmtree(staged)
            raise
        return False

    def _swap(self) -> None:
        folder, txn = self.folder, self.folder / TXN_DIR
        with atomic_write(txn / _JOURNAL, "w") as f:
            json.dump({"files": self.names}, f)
        try:
            made: list[Path] = []
            for name in self.names:
                if os.path.lexists(folder / name):
                    (txn / "old" / name).parent.mkdir(parents=True, exist_ok=True)
                    os.rename(folder / name, txn / "old" / name)
            for name in self.names:
                if Path(name).parent != Path("."):
                    made += make_directory((folder / name).parent)
                os.rename(txn / "new" / name, folder / name)
            fsync_directory(folder)
            os.unlink(txn / _JOURNAL)  # the commit: from here on the new set is the folder's
        except BaseException:
            with contextlib.suppress(Exception):  # if this fails too, the journal tells readers and the next writer
                _roll_back(folder)
                _remove_created(made)
            raise
        fsync_directory(txn)
        try:
            shutil.rmtree(txn)
        except OSError as exc:  # the new set is in place; the old copies are cleared by the next write
            logger.warning("fastmlstm: could not remove %s (%s); it holds the replaced files only", txn, exc)
