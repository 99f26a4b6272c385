"""What the CPU and CUDA extension loaders share: a prebuilt library if it is fresh, else a
first-use build; the outcome remembered per process; one exception with the reason and the fix.

Each loader (:mod:`fastmlstm.ops.cpu.build`, :mod:`fastmlstm.ops.cuda.build`) keeps what differs:
where its sources and build go, its compiler flags, its preflight checks and its build.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger("fastmlstm")

__all__ = ["ExtensionUnavailable", "load_prebuilt_or_build", "outcome", "library_or_raise"]


class ExtensionUnavailable(RuntimeError):
    """The extension cannot be loaded or built here; the message says why and what to do."""


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


def library_or_raise(result: tuple[str | None, str]) -> str:
    path, reason = result
    if path is None:
        raise ExtensionUnavailable(reason)
    return path
