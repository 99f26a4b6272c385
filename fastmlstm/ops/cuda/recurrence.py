"""The CUDA backend's forward and backward: the contract of :mod:`fastmlstm.ops.interface` on top of
the extension's operators ``torch.ops.fastmlstm_cuda.forward`` / ``.backward`` (``csrc/mlstm.cpp``).

The C++ side checks every input strictly (device, dtype, shape, contiguity) and launches everything
on the current CUDA stream; this layer only brings the contract's inputs into the exact layout the
operators require (contiguous, float32 state), which costs nothing when they already are.

Dimension letters: T time, B batch, H hidden.
"""

from __future__ import annotations

import torch

from .. import interface
from .build import load_library


def _ops():
    load_library()
    return torch.ops.fastmlstm_cuda


def _optional(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype).contiguous()


def forward(proj, weight_hh, weight_hm, h0, c0, lengths, save_for_backward, return_cell_states):
    ops = _ops()
    # The operators have no autograd formula of their own: they run below autograd (op.py's custom
    # op owns the backward), so they are always called without recording a graph.
    with torch.no_grad():
        output, c_n, cell_states, act = ops.forward(
            proj.contiguous(), weight_hh.contiguous(), weight_hm.contiguous(),
            h0.float().contiguous(), c0.float().contiguous(),
            interface.row_major_lengths(lengths),
            bool(save_for_backward), bool(return_cell_states), interface.POISON_BUFFERS,
        )
    return output, c_n, cell_states, act


def backward(grad_output, grad_c_n, grad_cell_states, weight_hh, weight_hm, h0, c0, lengths,
             output, cell_states, act):
    ops = _ops()
    dtype = output.dtype
    with torch.no_grad():
        grad_proj, grad_weight_hh, grad_weight_hm, grad_h0, grad_c0 = ops.backward(
            _optional(grad_output, dtype), _optional(grad_c_n, torch.float32),
            _optional(grad_cell_states, torch.float32),
            weight_hh.contiguous(), weight_hm.contiguous(), h0.float().contiguous(), c0.float().contiguous(),
            interface.row_major_lengths(lengths),
            output.contiguous(), cell_states.contiguous(), act.contiguous(), interface.POISON_BUFFERS,
        )
    return grad_proj, grad_weight_hh, grad_weight_hm, grad_h0, grad_c0
