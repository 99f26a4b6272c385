"""Triton backend: fused per-step kernels (:mod:`.fused_step`) driven over time by :mod:`.recurrence`,
launched with the configs :mod:`.configs` picks (its rule, or the GPU-measured table :mod:`.tuned`).

Importing this package imports Triton (and compiles nothing); the registry imports it on first use
and reports the backend unusable when that fails.
"""

from __future__ import annotations

from .recurrence import backward, forward

__all__ = ["is_available", "forward", "backward"]


def is_available() -> tuple[bool, str]:
    return True, ""  # importing this package (and with it Triton) succeeded
