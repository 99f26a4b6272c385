"""The CPU backend's buffer cache (``csrc/cpu/buffer_cache.cpp``): the memory of the activations a
training forward saves for its backward stays allocated when they die, and the next forward reuses
it instead of faulting in fresh pages (glibc maps allocations over 32 MiB anew every time).

A training loop holds between iterations the one block its next forward takes, no more than it
already held at its peak. ``$FASTMLSTM_CPU_CACHE_MB`` caps what the cache keeps (default: an eighth
of the machine's memory; ``0`` turns it off); :func:`empty_cache` gives it all back, as
``torch.cuda.empty_cache`` does on a GPU.

Example::

    >>> import fastmlstm.ops.cpu as cpu_ops
    >>> freed = cpu_ops.empty_cache()   # bytes returned to the system
    >>> cpu_ops.cached_bytes()
    0
"""

from __future__ import annotations

import argparse
import functools
import os

import torch

from ...errors import InputError
from ...options import OPTIONS
from .build import load_library

__all__ = ["ENV_CACHE_MB", "default_limit_bytes", "limit_bytes", "apply_limit", "empty_cache", "cached_bytes"]

ENV_CACHE_MB = "FASTMLSTM_CPU_CACHE_MB"
_MiB = 1 << 20


def default_limit_bytes() -> int:
    """An eighth of this machine's physical memory (2 GiB where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 8
    except (AttributeError, ValueError, OSError):
        return 2048 * _MiB


@functools.lru_cache(maxsize=None)
def _limit_from(value: str) -> int:
    value = value.strip()
    if not value:
        return default_limit_bytes()
    try:
        return OPTIONS["cpu_cache_mb"].parse(value) * _MiB
    except argparse.ArgumentTypeError as exc:  # worded by options.py
        raise InputError(f"{ENV_CACHE_MB} {exc}") from None


def limit_bytes() -> int:
    """The cache's limit now: ``$FASTMLSTM_CPU_CACHE_MB`` MiB, else :func:`default_limit_bytes`."""
    return _limit_from(os.environ.get(ENV_CACHE_MB, ""))


_applied_limit: int | None = None  # what the extension was last given


def apply_limit() -> None:
    """Hands :func:`limit_bytes` to the extension when it changed (every operator call runs this)."""
    global _applied_limit
    limit = limit_bytes()
    if limit != _applied_limit:
        load_library()
        torch.ops.fastmlstm_cpu.set_buffer_cache_limit(limit)
        _applied_limit = limit


def empty_cache() -> int:
    """Frees every block the cache holds; returns the bytes freed."""
    load_library()
    return int(torch.ops.fastmlstm_cpu.empty_buffer_cache())


def cached_bytes() -> int:
    """Bytes the cache holds now, in blocks no tensor uses."""
    load_library()
    return int(torch.ops.fastmlstm_cpu.buffer_cache_bytes())
