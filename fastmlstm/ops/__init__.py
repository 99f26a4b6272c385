"""The recurrence of the multiplicative LSTM: one door into every backend.

- :mod:`.registry`: the backends, listed once (name -> package, devices, what each needs), and
  ``resolve_backend`` (``"auto"``, ``FASTMLSTM_BACKEND``, fallbacks).
- :mod:`.interface`: the contract every backend implements (shapes, dtypes, saved values).
- :mod:`.autograd`: the custom ops, their fakes and autograd formulas, written once.
- :mod:`.weight_cache`: values derived from weights, kept while the weights are unchanged.
- :mod:`.verdicts`: the on-disk verdicts (parity and speed, per device and software) that switch
  on kernels no CPU can check; :mod:`.capture`: CUDA graphs behind one interface with a CPU
  stand-in; :mod:`._extension`: what the CPU and CUDA extension loaders share.
- the backends, siblings with the same file roles: :mod:`.reference` (the specification),
  :mod:`.cpu`, :mod:`.triton`, :mod:`.cuda`.

Everything outside this package reaches the backends through :func:`sequence`, :func:`layer` and
:func:`layer_step` (:func:`step_key` and :func:`prepare_step` for callers that keep prepared steps,
and the registry's functions); nothing outside imports a backend's internals.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from . import registry
from .autograd import layer_forward, no_autocast, sequence_forward
from .interface import accumulation_dtype, has_layer, has_sequence_step, has_step
from .registry import (
    BACKENDS,
    REGISTRY,
    BackendUnavailableError,
    available_backends,
    backend_status,
    resolve_backend,
)
from .weight_cache import derived

__all__ = [
    "BACKENDS",
    "REGISTRY",
    "BackendUnavailableError",
    "available_backends",
    "backend_status",
    "fingerprints",
    "layer",
    "layer_step",
    "prepare_sequence_step",
    "prepare_step",
    "resolve_backend",
    "sequence",
    "step_key",
]

_PLAIN = (Tensor, torch.nn.Parameter)
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def _transformed() -> bool:
    """Whether a ``torch.func`` transform (grad, vmap, jacrev, ...) is running. Those refuse the
    custom ops (their autograd formulas come from ``register_autograd``, which the transforms do
    not accept in torch 2.13), and no kernel reads their wrapped tensors: the recurrence runs as
    the reference backend's plain loop of PyTorch operators, which every transform handles."""
    return _functorch_active()


def _direct(tensors) -> bool:
    """Whether the backend can be called without the custom op: nothing to differentiate, no
    tracing, plain tensors, not on the meta device (whose shapes the op's fake gives; a backend
    there would enter autocast on "meta", which has none). That skips the op's Python dispatch
    (tens of microseconds, a good part of a generation step at small sizes)."""
    return not _needs_grad(tensors) and not torch.compiler.is_compiling() and not tensors[0].is_meta and \
        all(t is None or type(t) in _PLAIN for t in tensors) and not _transformed()


def sequence(proj: Tensor, weight_hh: Tensor, weight_hm: Tensor, h0: Tensor, c0: Tensor, lengths: Tensor | None,
             backend: str, return_cell_states: bool):
    """The recurrence on checked inputs (:mod:`.interface`'s ``forward``) with a concrete backend:
    ``(output [T, B, H], c_n [B, H], cell_states [T, B, H] when asked for or kept for the backward,
    else [0])``, differentiable. An empty batch (B = 0) runs on ``reference``: the kernels have no
    rows to divide among threads (the CPU backend's divide by B). Under a ``torch.func`` transform
    the reference's loop runs outside the custom op (:func:`_transformed`)."""
    if proj.shape[1] == 0:
        backend = "reference"
    tensors = (proj, weight_hh, weight_hm, h0, c0, lengths)
    if _transformed():
        with no_autocast(proj.device.type):
            output, c_n, cell_states, _ = registry.module("reference").forward(*tensors, False, return_cell_states)
    elif _direct(tensors):
        with no_autocast(proj.device.type), torch.no_grad():
            output, c_n, cell_states, _ = registry.module(backend).forward(*tensors, False, return_cell_states)
    else:
        output, c_n, cell_states, _ = sequence_forward(*tensors, backend, _needs_grad(tensors), return_cell_states)
    return output, c_n, cell_states


def prepare_sequence_step(backend: str, weight_hh: Tensor, weight_hm: Tensor, B: int):
    """``backend``'s one-step recurrence of B rows with these weights bound
    (:data:`.interface.SEQUENCE_STEP_ENTRY`): ``step(proj [1, B, 5H], h0, c0) -> (output [1, B, H],
    c_n [B, H])``, outside autograd, on checked inputs (proj in the weights' dtype, h0 and c0
    float32, all contiguous); valid while the weights are unchanged. None where the backend
    prepares no steps, or where anything would need autograd or tracing (then :func:`sequence`)."""
    module = registry.module(backend)
    if B < 1 or not has_sequence_step(module) or not _direct((weight_hh, weight_hm)):
        return None
    return module.prepare_sequence_step(weight_hh, weight_hm, B)


def _needs_grad(tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def layer(x: Tensor, weight_ih: Tensor, weight_hh: Tensor, weight_im: Tensor, weight_hm: Tensor,
          bias: Tensor | None, h0: Tensor, c0: Tensor, lengths: Tensor | None, backend: str,
          return_cell_states: bool):
    """The whole layer on checked time-major inputs x [T, B, I] with a concrete backend: the
    backend's own layer where it has one (input projections inside its time loop), else one GEMM
    for every step's projections and :func:`sequence`. Returns what :func:`sequence` returns."""
    module = registry.module(backend)
    if x.shape[1] > 0 and x.shape[2] > 0 and has_layer(module) and not _transformed():
        tensors = (x, weight_ih, weight_im, bias, weight_hh, weight_hm, h0, c0, lengths)
        if _direct(tensors):
            with no_autocast(x.device.type), torch.no_grad():
                output, c_n, cell_states, _ = module.layer_forward(*tensors, False, return_cell_states)
        else:
            output, c_n, cell_states, _ = layer_forward(*tensors, backend, _needs_grad(tensors), return_cell_states)
        return output, c_n, cell_states
    H = weight_hm.shape[0]
    # All input projections of all steps in one GEMM: [T*B, I] x [I, 5H], in the weights' dtype
    # (the interface's contract) even under autocast, which would round them alone to 16 bits.
    weight = torch.cat([weight_ih, weight_im], dim=0)
    full_bias = None if bias is None else torch.cat([bias, bias.new_zeros(H)])
    autocast = torch._C._is_any_autocast_enabled() and not x.is_meta  # (nn.LSTM asks the same; "meta" has none)
    with no_autocast(x.device.type) if autocast else contextlib.nullcontext():
        proj = torch.nn.functional.linear(x, weight, full_bias)
    return sequence(proj, weight_hh, weight_hm, h0, c0, lengths, backend, return_cell_states)


def step_key(backend: str, dtype: torch.dtype, B: int, H: int, I: int) -> tuple | None:
    """What ``backend``'s prepared step of B rows (:func:`prepare_step`) depends on besides its
    weights, for a layer of H units with I inputs (B, I > 0); None where the backend prepares no
    steps. Whoever keeps prepared steps keys them on this and on the weights."""
    module = registry.module(backend)
    if B == 0 or I == 0 or not has_step(module):
        return None
    return ("step", backend, *module.step_key(dtype, B, H, I))


def prepare_step(backend: str, weight_ih: Tensor, weight_hh: Tensor, weight_im: Tensor, weight_hm: Tensor,
                 bias: Tensor | None, B: int):
    """``backend``'s step of B rows with these weights bound (:data:`.interface.STEP_ENTRIES`):
    ``step(x [1, B, I], h0, c0) -> (output [1, B, H], c_n [B, H])``, outside autograd, on checked
    inputs; valid while the weights and :func:`step_key` are unchanged."""
    return registry.module(backend).prepare_step(weight_ih, weight_im, bias, weight_hh, weight_hm, B)


def layer_step(x: Tensor, weight_ih: Tensor, weight_hh: Tensor, weight_im: Tensor, weight_hm: Tensor,
               bias: Tensor | None, h0: Tensor, c0: Tensor, backend: str):
    """One step of :func:`layer` on checked inputs x [B, I]: ``(output [B, H], c_n [B, H])``.
    Where nothing needs autograd and the backend prepares steps, the prepared step is kept while
    the weights are unchanged (:mod:`.weight_cache`): in a generation loop the Python between the
    caller and the kernel is a good part of a step."""
    weights = (weight_ih, weight_im, bias, weight_hh, weight_hm)
    key = step_key(backend, x.dtype, x.shape[0], weight_hm.shape[0], x.shape[1])
    if key is not None and _direct((x, *weights, h0, c0)):
        step = derived([w for w in weights if w is not None], (*key, bias is None),
                       lambda: prepare_step(backend, weight_ih, weight_hh, weight_im, weight_hm, bias, x.shape[0]))
        if torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type):
            with no_autocast(x.device.type), torch.no_grad():
                output, c_n = step(x.unsqueeze(0), h0, c0)
        else:  # entering the two contexts would cost more than the rest of this function
            output, c_n = step(x.unsqueeze(0), h0, c0)
    else:
        output, c_n, _ = layer(x.unsqueeze(0), weight_ih, weight_hh, weight_im, weight_hm, bias, h0, c0, None,
                               backend, False)
    return output[0], c_n


def fingerprints(tensors: list[Tensor]) -> tuple[int, ...] | None:
    """64-bit fingerprints of contiguous CPU tensors' bytes (position dependent, not
    cryptographic), or None where no backend here computes them (the CPU extension does)."""
    if not backend_status("cpu", "cpu")[0]:
        return None
    return registry.module("cpu").fingerprints(tensors)


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of h_n, c_n and the cell states for activations of ``dtype``."""
    return accumulation_dtype(dtype)
