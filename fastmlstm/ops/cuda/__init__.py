"""CUDA backend: the C++/CUDA extension compiled from ``csrc/`` (:mod:`.build` finds, builds and
loads it; :mod:`.recurrence` calls it with the contract of :mod:`fastmlstm.ops.interface`).

Importing this package compiles nothing; :func:`is_available` builds the extension on first use
(ninja, cached) and reports ``(False, reason)`` when it cannot, so that ``backend="auto"`` falls back.
"""

from __future__ import annotations

from .build import status as is_available
from .recurrence import backward, forward

__all__ = ["is_available", "forward", "backward"]
