"""CUDA backend: the C++/CUDA extension compiled from ``csrc/`` (:mod:`.build` finds, builds and
loads it; :mod:`.recurrence` calls it with the contract of :mod:`fastmlstm.ops.common`).

Importing this package compiles nothing; :func:`is_available` builds the extension on first use
(ninja, cached) and reports ``(False, reason)`` when it cannot, so that ``backend="auto"`` falls back.
"""

from __future__ import annotations


def is_available() -> tuple[bool, str]:
    from .build import status

    return status()


def forward(*args, **kwargs):
    from .recurrence import forward as _forward

    return _forward(*args, **kwargs)


def backward(*args, **kwargs):
    from .recurrence import backward as _backward

    return _backward(*args, **kwargs)
