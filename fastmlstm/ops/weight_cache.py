"""Values derived from weight tensors, kept while those tensors live unchanged: the one weight
cache of the backends.

A backend that derives something from a weight on every call (a packed copy for its GEMMs, a
transposed or widened copy) asks :func:`derived` instead. An entry is keyed by the identities of
the tensors it was derived from and a name for what was derived, and it is valid while every one
of those tensors is alive and unchanged: same version counter (every in-place update PyTorch tracks:
optimizer steps, ``load_state_dict``, ``mul_`` under ``no_grad``), same storage, dtype, device,
shape and strides. An entry goes away with its tensors (weak references), so a cache never keeps a
weight alive.

:func:`signature` is that notion of "unchanged", for callers that keep their own entries (the
module-level effective-weight cache, :mod:`fastmlstm.nn.weight_cache`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["derived", "signature", "clear"]

# key -> (weak references to the source tensors, their signature, the derived value)
_ENTRIES: dict[tuple, tuple[tuple[weakref.ref, ...], tuple, Any]] = {}


def signature(tensors: Sequence[torch.Tensor | None]) -> tuple | None:
    """What must stay the same for values derived from ``tensors`` to stay valid; None for tensors
    without storage (fake or functorch tensors), whose derived values are never kept."""
    try:
        return tuple(None if t is None else (t._version, t.data_ptr(), t.dtype, t.device, t.shape, t.stride())
                     for t in tensors)
    except RuntimeError:
        return None


def derived(tensors: Sequence[torch.Tensor], kind: Any, make: Callable[[], Any]) -> Any:
    """``make()``, computed once while ``tensors`` live unchanged; ``kind`` names what is derived
    (two kinds from the same tensors are two entries)."""
    key = (*(id(t) for t in tensors), kind)
    sig = signature(tensors)
    hit = _ENTRIES.get(key)
    if hit is not None and sig is not None and hit[1] == sig and all(r() is t for r, t in zip(hit[0], tensors)):
        return hit[2]
    value = make()
    if sig is not None:
        refs = tuple(weakref.ref(t, lambda _, key=key: _ENTRIES.pop(key, None)) for t in tensors)
        _ENTRIES[key] = (refs, sig, value)
    return value


def clear() -> None:
    """Drop every entry."""
    _ENTRIES.clear()
