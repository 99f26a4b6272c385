"""Triton backend: fused per-step kernels (:mod:`.fused_step`) driven over time by :mod:`.recurrence`,
launched with the configs :mod:`.configs` picks (its rule, or the GPU-measured table :mod:`.tuned`)."""

from __future__ import annotations


def is_available() -> tuple[bool, str]:
    try:
        from . import recurrence  # noqa: F401  (compiles nothing; checks that triton imports)
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def forward(*args, **kwargs):
    from .recurrence import forward as _forward

    return _forward(*args, **kwargs)


def backward(*args, **kwargs):
    from .recurrence import backward as _backward

    return _backward(*args, **kwargs)
