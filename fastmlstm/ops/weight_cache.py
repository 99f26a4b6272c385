"""Values derived from weight tensors, kept while those tensors live unchanged: the one weight
cache of the backends.

A backend that derives something from a weight on every call (a packed copy for its GEMMs, a
transposed or widened copy) asks :func:`derived` instead. An entry is keyed by what the tensors it
was derived from read (their addresses and layouts) and a name for what was derived, and it is valid
while those same tensors are unchanged: same version counter (every in-place update PyTorch
tracks: optimizer steps, ``load_state_dict``, ``mul_`` under ``no_grad``), same storage (the
storage itself, not only its address), dtype, device, shape and strides. Two kinds of training
update bump no version counter: the fused CPU optimizers (``fused=True``) and writes through
``.data`` (PyTorch's word_language_model example); a ``weight_norm=False`` module trained either way
ran every forward after the first on the weights packed before it. So an optimizer step drops the
entries derived from the parameters it stepped, and a backend's backward pass (a training step is
under way) calls :func:`forget_trainable`. An entry goes away with
the storages of its tensors (weak references), so a cache never keeps a weight alive, nor what was
derived from a storage a tensor no longer has. Tensors in shared memory (``share_memory_()``,
Hogwild training) are never cached: other processes write them, which no counter here sees.

:func:`signature` and :func:`watch` are that notion of "unchanged", for callers that keep their
own entries (the module-level effective-weight cache, :mod:`fastmlstm.nn.weight_cache`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["clear", "derived", "forget_trainable", "signature", "watch"]

# key -> (weak references to the source tensors' storages, (the tensors' ids, versions, whether one
# requires grad), the derived value)
_ENTRIES: dict[tuple, tuple[tuple, tuple, Any]] = {}
# Moves at the end of every optimizer step (before _after_optimizer_step drops entries): an entry
# whose computation spans a step may be derived from the weights before it, and is not kept.
_STEPS = [0]


def signature(tensors: Sequence[torch.Tensor | None]) -> tuple | None:
    """What must stay the same for values derived from ``tensors`` to stay valid; None for tensors
    without storage (fake or functorch tensors), whose derived values are never kept."""
    try:
        return tuple(None if t is None else (t._version, t.data_ptr(), t.dtype, t.device, t.shape, t.stride())
                     for t in tensors)
    except RuntimeError:
        return None


def watch(tensors: Sequence[torch.Tensor | None], drop: Callable[[weakref.ref], None]) -> tuple | None:
    """Weak references to the storages of ``tensors``, ``drop(reference)`` called as one dies; None
    for tensors without storage.

    What is derived from a tensor must go when its storage does: while a storage lives, no other
    takes its address, so a signature's data pointer names it; once it is freed, a new storage may
    come at the same address under a tensor whose version did not move (``.data`` assignment keeps
    the counter: ``p.data = p.data * 2`` twice, or ``.half()`` then ``.float()``, may give ``p`` its
    first pointer back). Storages keep their Python object while they live, so its weak reference
    dies with the storage itself. (Not the tensors: ``torch.utils.swap_tensors``, and so
    ``module.to()`` under ``torch.__future__.set_swap_module_params_on_conversion(True)``, refuses
    a tensor with a weak reference to it.)
    """
    try:
        return tuple(None if t is None else weakref.ref(t.untyped_storage(), drop) for t in tensors)
    except (RuntimeError, TypeError, NotImplementedError):
        return None


def _shared(tensors: Sequence[torch.Tensor]) -> bool:
    return any(t.device.type == "cpu" and t.is_shared() for t in tensors)


def derived(tensors: Sequence[torch.Tensor], kind: Any, make: Callable[[], Any]) -> Any:
    """``make()``, computed once while ``tensors`` live unchanged; ``kind`` names what is derived
    (two kinds from the same tensors are two entries)."""
    sig = signature(tensors)
    if sig is None:
        return make()
    # Keyed by what the tensors read (address, dtype, device, shape, strides), valid for the same
    # tensors at the same versions: one region holds one entry however many tensor objects are
    # made to read it (a view taken per call), and the entry goes with its storages.
    key = (*(s[1:] for s in sig), kind)
    state = (tuple(map(id, tensors)), tuple(s[0] for s in sig), any(t.requires_grad for t in tensors))
    hit = _ENTRIES.get(key)
    if hit is not None and hit[1] == state:
        return hit[2]
    steps = _STEPS[0]
    value = make()
    if not _shared(tensors):
        refs = watch(tensors, lambda ref, key=key: _drop(key, ref))
        if refs is not None:
            entry = _ENTRIES[key] = (refs, state, value)
            if _STEPS[0] != steps and _ENTRIES.get(key) is entry:
                # An optimizer step ended meanwhile (in another thread): stored first, checked after,
                # so that a step ending later drops the entry itself.
                _ENTRIES.pop(key, None)
    return value


def _drop(key: tuple, ref: weakref.ref) -> None:
    """A source storage of the entry at ``key`` died: drop the entry if it is the one that referred
    to it."""
    hit = _ENTRIES.get(key)
    if hit is not None and any(r is ref for r in hit[0]):
        _ENTRIES.pop(key, None)


def clear() -> None:
    """Drop every entry."""
    _ENTRIES.clear()


def forget_trainable() -> None:
    """Drop every entry derived from a tensor that requires grad: called by a backward pass, after
    which an optimizer may write the weights where no version counter sees it (through ``.data``).
    (A weight that keeps requiring grad changes with every training step anyway: nothing derived
    from it would be used again.)"""
    for key, (refs, state, _) in _ENTRIES.copy().items():  # (a copy: entries go as storages die, meanwhile too)
        if state[2]:
            _pop(key, refs)


def _pop(key: tuple, refs: tuple) -> None:
    hit = _ENTRIES.get(key)
    if hit is not None and hit[0] is refs:
        _ENTRIES.pop(key, None)


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Drop the entries derived from the storages of the parameters an optimizer has just stepped."""
    _STEPS[0] += 1  # (two steps ending at once may move it by one: moved all the same)
    if not _ENTRIES:
        return
    try:
        stepped = {id(p.untyped_storage()) for group in optimizer.param_groups for p in group["params"]}
    except (RuntimeError, TypeError, NotImplementedError):  # tensors without storage: drop everything
        stepped = None
    for key, (refs, _, _) in _ENTRIES.copy().items():  # (a copy: entries go as storages die, meanwhile too)
        if stepped is None or any(r is not None and id(r()) in stepped for r in refs):
            _pop(key, refs)


register_optimizer_step_post_hook(_after_optimizer_step)
