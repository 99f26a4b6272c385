"""The effective-weight cache behind ``FastMLSTM.effective_weights``.

The weight norm costs a pass over every recurrent matrix; a generation or featurize loop calling the
module step by step would pay it on every call. Where no autograd graph through the weights is needed
(inference, featurize, generation, step loops, frozen parameters) and the parameters live on the
CPU, a module's effective weights are kept here while its parameters are unchanged. Training
recomputes the weight norm on every forward, under autograd, so that it is differentiated.

``FASTMLSTM_WEIGHT_CACHE`` picks how a change is detected:

- ``on`` (default): every parameter's identity, version counter, storage pointer, dtype, device,
  shape and strides. This sees every change PyTorch tracks: in-place updates (optimizer steps,
  ``load_state_dict``, ``p.mul_()`` under ``no_grad``), ``.data`` assignment, ``.to()`` /
  ``.half()`` / ``swap_tensors``, replaced parameters (``load_state_dict(assign=True)``). The
  version counters of the cached tensors themselves are checked too (a caller writing into them).
  Besides, the cache is dropped by every forward under autograd (a training step: whatever the
  optimizer then does, even ``p.data.add_()``, is seen) and by ``train()`` / ``eval()``.
- ``strict``: also a fingerprint of every parameter's bytes on every call, which sees writes that
  bypass the version counter between two inference calls with neither of the above in between
  (``p.data.mul_()``, a NumPy view of a parameter, a ``vector_to_parameters`` buffer written
  later). Autograd does not track those writes either (its saved-tensor checks use the same
  counters), so the default does not pay for them: the fingerprint reads every parameter on
  every call, more than a batch-1 step costs (``bench/kernels/cpu_step.py`` measures it).
- ``off``: the weight norm on every call.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..ops import fingerprints
from ..ops.weight_cache import signature

__all__ = ["ENV_WEIGHT_CACHE", "WEIGHT_CACHE_MODES", "cached_weights", "forget"]

ENV_WEIGHT_CACHE = "FASTMLSTM_WEIGHT_CACHE"
WEIGHT_CACHE_MODES = ("on", "strict", "off")

# Values an entry keeps besides the weights (its memos), at most; the oldest goes first.
MAX_MEMOS = 16

# A tuple of MLSTMWeights (one per layer and direction), each a tuple of tensors or None.
Weights = tuple


class _Entry:
    """One module's cached weights, the key they were computed under, their autocast casts, and
    what else is derived from them (``memo``: the prepared steps of ``FastMLSTM.step``)."""

    __slots__ = ("key", "fingerprints", "weights", "versions", "casts", "memos")

    def __init__(self, key, fingerprints, weights: Weights):
        self.key = key
        self.fingerprints = fingerprints
        self.weights = weights
        self.versions = _versions(weights)
        self.casts: dict[torch.dtype, tuple[Weights, tuple]] = {}
        self.memos: dict = {}

    def intact(self) -> bool:
        return _versions(self.weights) == self.versions

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
            if len(self.memos) >= MAX_MEMOS:  # e.g. a step per batch size seen: keep the latest
                del self.memos[next(iter(self.memos))]
            hit = self.memos[key] = make()
        return hit


_ENTRIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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
    if torch.compiler.is_compiling():
        return None
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        # A forward under autograd is a training step: the parameters are about to change, maybe
        # through ``.data`` (PyTorch's word_language_model example updates them so), which no version
        # counter sees. The next inference call computes the weights afresh.
        forget(module)
        return None
    mode = weight_cache_mode()
    if mode == "off":
        return None
    sig = signature(params)
    if sig is None:  # tensors without storage (functorch wrappers, fake tensors)
        return None
    key = (tuple(map(id, params)), sig)
    entry = _ENTRIES.get(module)
    if mode == "on" and entry is not None and entry.key == key and entry.fingerprints is None and entry.intact():
        return entry  # (the key holds every parameter's device: the entry was built on the CPU)
    if any(p.device.type != "cpu" for p in params):
        return None
    prints = None
    if mode == "strict":
        prints = _fingerprints(params)
        if prints is None:
            return None
        if entry is not None and entry.key == key and entry.fingerprints == prints and entry.intact():
            return entry
    with torch.inference_mode(False), torch.no_grad():  # (inference_mode(False) turns grad mode on)
        weights = compute()
    entry = _ENTRIES[module] = _Entry(key, prints, weights)
    return entry
