"""The recurrence as torch.library custom ops, so autograd and torch.compile see one opaque op.

``fastmlstm::recurrence_forward`` and ``fastmlstm::recurrence_backward`` carry the backend name as
an argument and dispatch to the backend module's ``forward``/``backward`` (contract in
:mod:`fastmlstm.ops.common`). Fake (meta) implementations give torch.compile the output shapes
without running anything; :func:`register_autograd` links the two ops.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch import Tensor

from .common import GATES

_MODULES = {
    "reference": "fastmlstm.ops.reference",
    "triton": "fastmlstm.ops.triton",
    "cuda": "fastmlstm.ops.cuda",
    "cpu": "fastmlstm.ops.cpu",
}


def _backend(name: str):
    try:
        return importlib.import_module(_MODULES[name])
    except KeyError:
        raise ValueError(f"unknown recurrence backend {name!r}") from None


def _no_autocast(ref: Tensor):
    """Backends choose their own precisions: float32 math on stored activations. Autocast, still on
    while a custom op's implementation runs, would downcast their float32 products."""
    return torch.autocast(ref.device.type, enabled=False)


@torch.library.custom_op("fastmlstm::recurrence_forward", mutates_args=())
def recurrence_forward(
    proj: Tensor, weight_hh: Tensor, weight_hm: Tensor, h0: Tensor, c0: Tensor, lengths: Optional[Tensor],
    backend: str, save_for_backward: bool, return_cell_states: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(output [T,B,H], c_n [B,H] fp32, cell_states [T,B,H] fp32 or [0], act [T,B,6H] or [0])."""
    with _no_autocast(proj):
        return _backend(backend).forward(proj, weight_hh, weight_hm, h0, c0, lengths, save_for_backward,
                                         return_cell_states)


@recurrence_forward.register_fake
def _(proj, weight_hh, weight_hm, h0, c0, lengths, backend, save_for_backward, return_cell_states):
    T, B, H5 = proj.shape
    H = H5 // 5
    output = proj.new_empty(T, B, H)
    c_n = c0.new_empty(B, H, dtype=torch.float32)
    keep_cells = save_for_backward or return_cell_states
    cell_states = c0.new_empty((T, B, H) if keep_cells else (0,), dtype=torch.float32)
    act = proj.new_empty((T, B, 6 * H) if save_for_backward else (0,))
    return output, c_n, cell_states, act


@torch.library.custom_op("fastmlstm::recurrence_backward", mutates_args=())
def recurrence_backward(
    grad_output: Optional[Tensor], grad_c_n: Optional[Tensor], grad_cell_states: Optional[Tensor],
    weight_hh: Tensor, weight_hm: Tensor, h0: Tensor, c0: Tensor, lengths: Optional[Tensor],
    output: Tensor, cell_states: Tensor, act: Tensor, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad_proj [T,B,5H], grad_weight_hh [4H,H], grad_weight_hm [H,H], grad_h0, grad_c0 [B,H] fp32)."""
    with _no_autocast(output):
        return _backend(backend).backward(grad_output, grad_c_n, grad_cell_states, weight_hh, weight_hm, h0, c0,
                                          lengths, output, cell_states, act)


@recurrence_backward.register_fake
def _(grad_output, grad_c_n, grad_cell_states, weight_hh, weight_hm, h0, c0, lengths, output, cell_states, act,
      backend):
    T, B, H = output.shape
    return (
        output.new_empty(T, B, 5 * H),
        weight_hh.new_empty(GATES * H, H),
        weight_hm.new_empty(H, H),
        h0.new_empty(B, H, dtype=torch.float32),
        c0.new_empty(B, H, dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output):
    proj, weight_hh, weight_hm, h0, c0, lengths, backend, save_for_backward, return_cell_states = inputs
    out, _, cell_states, act = output
    ctx.backend = backend
    ctx.saved = save_for_backward
    ctx.return_cell_states = return_cell_states
    ctx.proj_dtype = proj.dtype
    ctx.h0_dtype = h0.dtype
    ctx.c0_dtype = c0.dtype
    if save_for_backward:
        ctx.save_for_backward(weight_hh, weight_hm, h0, c0, lengths, out, cell_states, act)


def _backward(ctx, grad_output, grad_c_n, grad_cell_states, grad_act):
    if not ctx.saved:
        raise RuntimeError(
            "fastmlstm: the recurrence ran without saving activations (save_for_backward=False); "
            "call it with save_for_backward=True to differentiate it"
        )
    weight_hh, weight_hm, h0, c0, lengths, out, cell_states, act = ctx.saved_tensors
    if not ctx.return_cell_states:
        grad_cell_states = None  # cell_states was only saved for backward, not an output to the user
    grad_proj, grad_weight_hh, grad_weight_hm, grad_h0, grad_c0 = recurrence_backward(
        grad_output, grad_c_n, grad_cell_states, weight_hh, weight_hm, h0, c0, lengths, out, cell_states, act,
        ctx.backend,
    )
    return (grad_proj.to(ctx.proj_dtype), grad_weight_hh, grad_weight_hm, grad_h0.to(ctx.h0_dtype),
            grad_c0.to(ctx.c0_dtype), None, None, None, None)


recurrence_forward.register_autograd(_backward, setup_context=_setup_context)
