"""What the CPU and CUDA extension loaders share: a prebuilt library if it is fresh, else a
first-use build; the outcome remembered per process; one exception with the reason and the fix.

Each loader (:mod:`fastmlstm.ops.cpu.build`, :mod:`fastmlstm.ops.cuda.build`) keeps what differs:
where its sources and build go, its compiler flags, its preflight checks and its build.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.machinery
import logging
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

logger = logging.getLogger("fastmlstm")

__all__ = [
    "ExtensionUnavailable",
    "aot_library",
    "build_with_torch",
    "compiler_errors",
    "entry_points",
    "library_or_raise",
    "load_prebuilt_or_build",
    "outcome",
    "place_key",
]


class ExtensionUnavailable(RuntimeError):
    """The extension cannot be loaded or built here; the message says why and what to do."""


def aot_library(package_dir: Path, module: str) -> Path | None:
    """The ahead-of-time build ``package_dir/<module><extension suffix>`` (setup.py's), if there is one."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = package_dir / f"{module}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def place_key(src_dir: Path) -> str:
    """A short hash of where a build's inputs live: the sources' folder and this torch's installation
    (its headers and libraries). torch's ninja file names both, so two checkouts, or two environments,
    sharing a build folder rebuilt it each in turn, every process waiting on the other's build."""
    where = f"{src_dir.resolve()}|{Path(torch.__file__).resolve().parent}"
    return hashlib.sha256(where.encode()).hexdigest()[:8]


def compiler_errors(error: BaseException, skip: Callable[[str], bool] = lambda line: False) -> str:
    """Up to 12 lines of a failed build's output to show: the diagnostics ("file:line: error: ..."), not
    ninja's echo of every command line (nor lines ``skip`` names); its last lines where none match."""
    lines = [line.rstrip() for line in str(error).splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"\berror\b", line, re.IGNORECASE)
              and not line.startswith("Error building extension") and " -c " not in line and not skip(line)]
    return "\n".join((errors or lines[-12:])[:12]) or type(error).__name__


@contextlib.contextmanager
def _build_guard(name: str, build_dir: Path):
    """Hold ``build_dir``'s build for this process, and clear a lock a killed build left behind.

    torch's own lock (``build_dir/lock``, a file that exists while a build runs) stays behind when the
    building process is killed, and every later load then waits for it forever. Beside it, every
    build here holds an advisory lock (``flock``) on ``build_dir/fastmlstm.build-lock``, which the
    operating system releases when its holder dies: once this process holds it, no live build of
    fastmlstm's is under way, so a torch lock found then was left by a dead process and is removed.
    Where ``fcntl`` does not exist (Windows) only torch's lock is used, as before."""
    try:
        import fcntl
    except ImportError:  # no flock here: torch's lock alone
        yield
        return
    torch_lock = build_dir / "lock"
    with open(build_dir / "fastmlstm.build-lock", "a") as guard:
        try:
            fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # torch's load() would wait in silence
            logger.warning("fastmlstm: another process is building the %s library in %s; waiting for it",
                           name, build_dir)
            fcntl.flock(guard, fcntl.LOCK_EX)
        try:
            if torch_lock.exists():
                logger.warning("fastmlstm: removing %s, left by a build that was killed", torch_lock)
                torch_lock.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)


def build_with_torch(name: str, sources: Iterable[Path], build_dir: Path, *, announce: Callable[[], str | None],
                     failure: Callable[[BaseException, Path], str], **flags) -> str:
    """Build and load the operator library ``name`` with :func:`torch.utils.cpp_extension.load` into
    ``build_dir``, one process at a time (:func:`_build_guard`); ``announce()`` (asked once this
    process holds the build: a log line if the build will compile, else None) and ``flags``
    (``extra_cflags`` and the like) are the caller's.
    A failed build logs the compiler's whole output and raises :class:`ExtensionUnavailable` with
    ``failure(exc, build_dir)``, the reason and the fix."""
    from torch.utils import cpp_extension

    build_dir.mkdir(parents=True, exist_ok=True)
    with _build_guard(name, build_dir):
        if (line := announce()) is not None:
            logger.warning("%s", line)
        try:
            return str(cpp_extension.load(name=name, sources=[str(p) for p in sources],
                                          build_directory=str(build_dir), is_python_module=False, verbose=False,
                                          **flags))
        except Exception as exc:
            reason = failure(exc, build_dir)
            logger.warning("fastmlstm: %s\nFull compiler output:\n%s", reason, exc)
            raise ExtensionUnavailable(reason) from exc


def load_prebuilt_or_build(kind: str, prebuilt: Path | None, fresh: Callable[[Path], bool],
                           build: Callable[[], str]) -> str:
    """Load ``prebuilt`` (the ahead-of-time library) when it exists, is not older than the sources
    (``fresh``; a wheel without sources counts as fresh) and loads; otherwise ``build()`` it."""
    if prebuilt is not None:
        try:
            is_fresh = fresh(prebuilt)
        except (ExtensionUnavailable, OSError):  # a wheel without sources: the prebuilt library is all there is
            is_fresh = True
        if is_fresh:
            try:
                torch.ops.load_library(str(prebuilt))
                return str(prebuilt)
            except Exception as exc:  # built against another torch, say
                logger.warning("fastmlstm: the prebuilt %s extension %s does not load (%s); building it again",
                               kind, prebuilt, exc)
        else:
            logger.warning("fastmlstm: the prebuilt %s extension %s is older than its sources; building it again",
                           kind, prebuilt)
    return build()


def outcome(load: Callable[[], str]) -> tuple[str | None, str]:
    """(path, "") or (None, reason) of ``load()``; anything unexpected still must not break
    ``backend="auto"``, so every exception becomes a reason."""
    try:
        return load(), ""
    except ExtensionUnavailable as exc:
        return None, str(exc)
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


def entry_points(load: Callable[[], str]):
    """An extension loader's public pair ``(load_library, status)`` and the cached outcome behind both,
    for a loader whose ``load()`` returns the loaded library's path or raises. ``load`` runs at most
    once per process (a failed build is not retried); the outcome has ``cache_clear``."""

    @functools.cache
    def cached() -> tuple[str | None, str]:
        return outcome(load)

    def load_library() -> str:
        """Load the extension (building it on first use) and return the path of the loaded library.

        Raises :class:`ExtensionUnavailable` with the reason and the fix.
        """
        return library_or_raise(cached())

    def status() -> tuple[bool, str]:
        """``(True, "")`` once the extension is loaded, else ``(False, reason)``."""
        path, reason = cached()
        return path is not None, reason

    return load_library, status, cached


def library_or_raise(result: tuple[str | None, str]) -> str:
    path, reason = result
    if path is None:
        raise ExtensionUnavailable(reason)
    return path
