"""The effective-weight cache behind ``FastMLSTM.effective_weights``.

The weight norm costs a pass over every recurrent matrix; a generation or featurize loop calling the
module step by step would pay it on every call. Where no autograd graph through the weights is needed
(inference, featurize, generation, step loops, frozen parameters) and the parameters live on the
CPU, a module's effective weights are kept here while its parameters are unchanged. Training
recomputes the weight norm on every forward, under autograd, so that it is differentiated.

``FASTMLSTM_WEIGHT_CACHE`` picks how a change is detected:

- ``on`` (default): every parameter's identity, version counter, data pointer, dtype, device, shape
  and strides, and its storage (an entry goes when a storage it was computed from dies, so a new
  storage at a freed address is not taken for the old one). This sees every change PyTorch tracks:
  in-place updates (optimizer steps, ``load_state_dict``, ``p.mul_()`` under ``no_grad``), ``.data``
  assignment, ``.to()`` / ``.half()`` / ``swap_tensors``, replaced parameters
  (``load_state_dict(assign=True)``). The version counters of the cached tensors themselves are
  checked too (a caller writing into them). Besides, the cache is dropped by every forward under
  autograd, compiled or not (a training step: whatever the optimizer then does, even
  ``p.data.add_()``, is seen), by ``train()`` / ``eval()``, and by every ``torch.optim`` optimizer
  step over one of its parameters (the fused CPU optimizers, ``fused=True``, write the parameters
  without bumping their version counters). Parameters in shared memory (``share_memory()``,
  Hogwild training) are fingerprinted on every call as in ``strict``: other processes write them,
  which no counter here sees.
- ``strict``: also a fingerprint of every parameter's bytes on every call, which sees writes that
  bypass the version counter between two inference calls with neither of the above in between
  (``p.data.mul_()``, a NumPy view of a parameter, a ``vector_to_parameters`` buffer written
  later). Autograd does not track those writes either (its saved-tensor checks use the same
  counters), so the default does not pay for them: the fingerprint reads every parameter on
  every call, more than a batch-1 step costs (``bench/kernels/cpu_step.py`` measures it).
- ``off``: the weight norm on every call (and nothing kept).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..errors import InputError
from ..ops import fingerprints
from ..ops.weight_cache import signature, watch

__all__ = ["ENV_WEIGHT_CACHE", "WEIGHT_CACHE_MODES", "cached_weights", "forget"]

ENV_WEIGHT_CACHE = "FASTMLSTM_WEIGHT_CACHE"
WEIGHT_CACHE_MODES = ("on", "strict", "off")

# Values an entry keeps besides the weights (its memos), at most; the oldest goes first.
MAX_MEMOS = 16

# A tuple of MLSTMWeights (one per layer and direction), each a tuple of tensors or None.
Weights = tuple


class _Entry:
    """One module's cached weights, what they were computed from (the parameters' ids and signature,
    weak references to their storages, their fingerprints where those are checked), their autocast
    casts, and what else is derived from them (``memo``: the prepared steps of ``FastMLSTM.step``)."""

    __slots__ = ("casts", "fingerprints", "key", "memos", "refs", "versions", "weights")

    def __init__(self, key: tuple, refs: tuple, fingerprints, weights: Weights):
        self.key, self.refs = key, refs
        self.fingerprints = fingerprints
        self.weights = weights
        self.versions = _versions(weights)
        self.casts: dict[torch.dtype, tuple[Weights, tuple]] = {}
        self.memos: dict = {}

    def valid(self, key: tuple) -> bool:
        """Computed from the parameters ``key`` describes, and not written into since. (The entry
        goes when a storage it was computed from dies: a data pointer in ``key`` names a storage.)"""
        return self.key == key and _versions(self.weights) == self.versions

    def cast(self, dtype: torch.dtype, cast: Callable[[Weights, torch.dtype], Weights]) -> Weights:
        """The weights cast to ``dtype`` (for autocast), cast once and kept while intact."""
        hit = self.casts.get(dtype)
        if hit is None or _versions(hit[0]) != hit[1]:
            with torch.inference_mode(False), torch.no_grad():  # (inference_mode(False) turns grad mode on)
                weights = cast(self.weights, dtype)
            hit = self.casts[dtype] = (weights, _versions(weights))
        return hit[0]

    def memo(self, key, make: Callable[[], object]):
        """``make()``, computed once per ``key`` for these weights and dropped with them: valid while
        the entry is (the caller has just checked it, :func:`cached_weights`), and while ``key`` covers
        whatever else the value depends on."""
        hit = self.memos.get(key)
        if hit is None:
            hit = make()
            # e.g. a step per batch size seen: keep the latest. (Threads may evict at once: the keys
            # are read in one step and popped without failing where another thread was first.)
            for old in tuple(self.memos)[:max(0, len(self.memos) + 1 - MAX_MEMOS)]:
                self.memos.pop(old, None)
            self.memos[key] = hit
        return hit


_ENTRIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

# Moves at the end of every optimizer step (before _after_optimizer_step drops the entries): an entry
# whose computation spans a step may hold the weights from before it, and is not kept.
_STEPS = [0]


def _versions(weights: Weights) -> tuple:
    return tuple(None if w is None else w._version for layer in weights for w in layer)


def weight_cache_mode() -> str:
    mode = os.environ.get(ENV_WEIGHT_CACHE, "on").strip().lower() or "on"
    if mode not in WEIGHT_CACHE_MODES:
        raise InputError(f"the environment variable {ENV_WEIGHT_CACHE} must be one of {WEIGHT_CACHE_MODES}, "
                         f"got {mode!r}")
    return mode


def _fingerprints(params: list[Tensor]) -> tuple | None:
    """Fingerprints of the parameters' bytes, or None where no backend here computes them."""
    with torch.no_grad():
        return fingerprints([p.detach().contiguous() for p in params])


def forget(module: nn.Module) -> None:
    """Drop ``module``'s cached weights (the next use recomputes them)."""
    _ENTRIES.pop(module, None)


def cached_weights(module: nn.Module, compute: Callable[[], Weights]) -> _Entry | None:
    """``module``'s valid cache entry (recomputed with ``compute`` if a parameter changed), or None
    where caching does not apply: under autograd through the weights, while compiling, off the CPU,
    or with ``FASTMLSTM_WEIGHT_CACHE=off``."""
    params = [p for p in module._parameters.values() if p is not None]
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        # A forward under autograd is a training step: the parameters are about to change, maybe
        # through ``.data`` (PyTorch's word_language_model example updates them so), which no version
        # counter sees. The next inference call computes the weights afresh. (Inside torch.compile
        # too: the compiled forward replays the drop, and an eager inference call may come next.)
        forget(module)
        return None
    if torch.compiler.is_compiling():
        return None
    mode = weight_cache_mode()
    sig = signature(params)
    if sig is None:  # tensors without storage (functorch wrappers, fake tensors)
        return None
    key = (tuple(map(id, params)), sig)
    entry = _ENTRIES.get(module)
    valid = entry is not None and entry.valid(key)
    if valid and mode == "on" and entry.fingerprints is None:
        return entry  # (the key holds every parameter's device: the entry was built on the CPU)
    if mode == "off" or any(p.device.type != "cpu" for p in params):
        forget(module)  # (an entry kept would hold its weights and packed copies for nothing)
        return None
    prints = None
    if mode == "strict" or any(p.is_shared() for p in params):
        prints = _fingerprints(params)
        if prints is None:
            forget(module)
            return None
        if valid and entry.fingerprints == prints:
            return entry
    refs = watch(params, _dropper(module))
    if refs is None:
        return None
    steps = _STEPS[0]
    with torch.inference_mode(False), torch.no_grad():  # (inference_mode(False) turns grad mode on)
        weights = compute()
    entry = _ENTRIES[module] = _Entry(key, refs, prints, weights)
    now = [p for p in module._parameters.values() if p is not None]
    if _STEPS[0] != steps or (tuple(map(id, now)), signature(now)) != key:
        # Changed meanwhile (in another thread): an optimizer step ended (the weights may predate
        # it, and a fused optimizer leaves no version counter to tell), or a parameter was replaced
        # or written (compute may have read the new one: kept under the old one's key, the weights
        # came back when it did). Stored first, checked after: a step ending later drops the entry.
        _forget_entry(module, entry)
    return entry


def _forget_entry(module: nn.Module, entry: _Entry) -> None:
    if _ENTRIES.get(module) is entry:
        _ENTRIES.pop(module, None)


def _dropper(module: nn.Module) -> Callable[[weakref.ref], None]:
    """What drops ``module``'s entry when a storage it was computed from dies (without keeping the
    module alive): the storage's address may come back under a parameter whose version did not move."""
    owner = weakref.ref(module)

    def drop(ref: weakref.ref) -> None:
        module = owner()
        entry = None if module is None else _ENTRIES.get(module)
        if entry is not None and any(r is ref for r in entry.refs):
            _ENTRIES.pop(module, None)

    return drop


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Drop the entries computed from parameters an optimizer has just stepped: the fused CPU
    optimizers (``fused=True``) write them without bumping their version counters."""
    _STEPS[0] += 1  # (two steps ending at once may move it by one: moved all the same)
    if not _ENTRIES:
        return
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    # A copy of the underlying dictionary (weak references to the modules), made in one step: the
    # WeakKeyDictionary's own items() iterates in Python, and failed when another thread added or
    # dropped an entry meanwhile.
    for owner, entry in _ENTRIES.data.copy().items():
        module = owner()
        if module is not None and not stepped.isdisjoint(entry.key[0]):
            _forget_entry(module, entry)


register_optimizer_step_post_hook(_after_optimizer_step)
