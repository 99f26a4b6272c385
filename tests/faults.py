"""Fault injection for the writers' tests: every file-system step a writer takes (open for writing,
os.open, write-out with fsync, mkdir, rename/replace, unlink, rmdir, chmod, link) fails in turn,
and after each failure the previous state must still be there, byte for byte.

:func:`hunt` runs a writer with a failure injected at its 1st step, then its 2nd, ... until it runs
to completion without reaching the injected step, checking the state after every run.
:func:`flip_a_tensor_byte` damages a torch.save file as a bad disk would.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import os
import shutil
import struct
import threading
import zipfile
from pathlib import Path

import fastmlstm

# The os functions every write in the package goes through (tempfile, pathlib and shutil call them too).
WATCHED = ("open", "replace", "rename", "fsync", "mkdir", "unlink", "rmdir", "chmod", "fchmod", "link")


class Faults:
    """Context manager: the ``at``-th watched call of the main thread raises OSError(EIO); with
    ``lasting=True`` every later one does too (a disk that went away). ``fired`` says whether it did."""

    def __init__(self, at: int, *, lasting: bool = False):
        self.at, self.lasting = at, lasting
        self.calls, self.fired = 0, False
        self.steps: list[str] = []
        self._saved: dict[str, object] = {}

    def _hit(self, name: str, args) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # a test server's thread, or hashing threads: not the writer's steps
        self.calls += 1
        self.steps.append(f"{name}{tuple(str(a) for a in args[:2])}")
        if self.calls == self.at or (self.lasting and self.calls > self.at):
            self.fired = True
            raise OSError(errno.EIO, f"injected failure at step {self.calls} ({name})")

    def _wrap(self, name: str, real):
        def faulty(*args, **kwargs):
            self._hit(name, args)
            if name == "fsync":
                return None  # still a step that can fail, but the tests need no durability: spare the disk
            return real(*args, **kwargs)
        return faulty

    def _wrap_open(self, real):
        def faulty(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+"):
                self._hit("open-for-writing", (file,))
            return real(file, mode, *args, **kwargs)
        return faulty

    def __enter__(self) -> Faults:
        for name in WATCHED:
            self._saved[name] = getattr(os, name)
            setattr(os, name, self._wrap(name, getattr(os, name)))
        self._saved["builtins.open"] = builtins.open
        builtins.open = self._wrap_open(builtins.open)
        return self

    def __exit__(self, *exc) -> None:
        builtins.open = self._saved.pop("builtins.open")
        for name, real in self._saved.items():
            setattr(os, name, real)
        self._saved.clear()


def snapshot(root: Path) -> dict[str, str | None]:
    """Every file (hidden ones included) under ``root`` with its SHA-256, and every folder (None)."""
    if not root.exists():
        return {}
    state: dict[str, str | None] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        state[rel] = None if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def hunt(prepare, write, previous_ok, new_ok, *, lasting: bool = False, limit: int = 400) -> int:
    """Inject a failure at each step of ``write(state)`` in turn; returns how many steps it has.

    ``prepare()`` makes a fresh copy of the previous state and returns it; ``write(state)`` runs
    the writer on it. After a run that raised, ``previous_ok(state, error)`` checks what is left;
    after a run that completed (the writer absorbed the failure, or got past its last step),
    ``new_ok(state)`` does. Only OSError and the package's InputError may come out of a writer.
    """
    for at in range(1, limit + 1):
        state = prepare()
        with Faults(at, lasting=lasting) as faults:
            try:
                write(state)
                error = None
            except (OSError, fastmlstm.InputError) as exc:
                error = exc
        if error is not None:
            assert faults.fired, f"the writer failed with no injected failure: {error!r}"
            previous_ok(state, error)
        else:
            new_ok(state)
            if not faults.fired:
                return at - 1
    raise AssertionError(f"the writer still had steps left after {limit}")


def fresh_copy(template: Path, work: Path) -> Path:
    """A copy of folder ``template`` at ``work`` (removed first), made outside any injected fault."""
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(template, work, symlinks=True)
    return work


def flip_a_tensor_byte(path):
    """XOR one byte (0x40) in the middle of the largest tensor of a torch.save file, in place: what
    a bad disk or a bad copy does. torch reads its zip entries without checking them."""
    with zipfile.ZipFile(path) as archive:
        entry = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(entry.header_offset + 26)  # the local header's name and extra-field lengths
        name_length, extra_length = struct.unpack("<HH", f.read(4))
        f.seek(entry.header_offset + 30 + name_length + extra_length + entry.file_size // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x40]))
