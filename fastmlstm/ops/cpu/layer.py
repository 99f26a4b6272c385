"""The whole layer on the CPU backend: input projections computed inside the time loop.

``fastmlstm.multiplicative_lstm`` (and so ``FastMLSTM``) sends CPU tensors here when the resolved
backend is ``"cpu"``. Instead of one [T, B, I] x [I, 5H] GEMM writing a [T, B, 5H] tensor that the
loop then reads back (on a CPU a large fresh tensor costs page faults, and the loop's strided reads
of it miss the caches), each step multiplies x_t [B, I] by the packed input weights tile by tile,
next to the recurrent GEMMs, in float32 (bfloat16 natively where the CPU has it): the gate GEMM runs
on [m_t | x_t] against [Wh | Wx] (one tile GEMM with K = H + I), and xm = x Wmx^T, which does not
depend on the recurrence, is one GEMM per chunk of steps. Everything else follows the recurrence
contract (:mod:`fastmlstm.ops.common`), with one difference that only makes it more accurate: the
gate part of the input projections is never stored, so it is not rounded to a 16-bit activation
dtype before m Wh^T is added (xm is, as it is saved for the backward). The backward
returns the gradients of x and the input weights too, summed over time in float32 chunk by chunk.

Two ``torch.library`` custom ops with fake implementations and an autograd formula, like
:mod:`fastmlstm.ops.op`, so the layer stays opaque to autograd and torch.compile.

Dimension letters: T time, B batch, I input features, H hidden.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import common
from ..common import GATES
from .recurrence import _ops, _optional, _packed, layout, portable_bf16

__all__ = ["multiplicative_lstm", "layer_forward", "layer_backward"]


_PLAIN = (Tensor, torch.nn.Parameter)


def _no_autocast():
    # Autocast, still on while a custom op's implementation runs, would downcast float32 products.
    return torch.autocast("cpu", enabled=False)


@torch.library.custom_op("fastmlstm::cpu_layer_forward", mutates_args=())
def layer_forward(
    x: Tensor, weight_ih: Tensor, weight_im: Tensor, bias: Optional[Tensor], weight_hh: Tensor, weight_hm: Tensor,
    h0: Tensor, c0: Tensor, lengths: Optional[Tensor], save_for_backward: bool, return_cell_states: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(output [T,B,H], c_n [B,H] fp32, cell_states [T,B,H] fp32 or [0], act [T,B,6H] or [0])."""
    with _no_autocast(), torch.no_grad():
        return _forward(x, weight_ih, weight_im, bias, weight_hh, weight_hm, h0, c0, lengths, save_for_backward,
                        return_cell_states)


def _forward(x, weight_ih, weight_im, bias, weight_hh, weight_hm, h0, c0, lengths, save_for_backward,
             return_cell_states):
    H, I = weight_hm.shape[0], x.shape[2]
    lay = layout(x.dtype, x.shape[1], H, I)  # one layout for every GEMM of the loop; VNNI needs even K
    return tuple(_ops().forward_input(
        x.contiguous(), _packed(weight_im, "xm"), None if bias is None else bias.contiguous(),
        _packed(weight_hh, "hh", lay, weight_ih), _packed(weight_hm, "hm", lay), h0.float().contiguous(),
        c0.float().contiguous(), None if lengths is None else lengths.contiguous(), bool(save_for_backward),
        bool(return_cell_states), common.POISON_BUFFERS, portable_bf16(),
    ))


@layer_forward.register_fake
def _(x, weight_ih, weight_im, bias, weight_hh, weight_hm, h0, c0, lengths, save_for_backward, return_cell_states):
    T, B, _ = x.shape
    H = weight_hm.shape[0]
    keep_cells = save_for_backward or return_cell_states
    return (x.new_empty(T, B, H), c0.new_empty(B, H, dtype=torch.float32),
            c0.new_empty((T, B, H) if keep_cells else (0,), dtype=torch.float32),
            x.new_empty((T, B, 6 * H) if save_for_backward else (0,)))


@torch.library.custom_op("fastmlstm::cpu_layer_backward", mutates_args=())
def layer_backward(
    grad_output: Optional[Tensor], grad_c_n: Optional[Tensor], grad_cell_states: Optional[Tensor], x: Tensor,
    weight_ih: Tensor, weight_im: Tensor, weight_hh: Tensor, weight_hm: Tensor, h0: Tensor, c0: Tensor,
    lengths: Optional[Tensor], output: Tensor, cell_states: Tensor, act: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight_ih, grad_weight_im, grad_bias [4H], grad_weight_hh, grad_weight_hm,
    grad_h0 fp32, grad_c0 fp32)."""
    dtype = output.dtype
    lay = layout(dtype, x.shape[1], weight_hm.shape[0], backward=True)
    with _no_autocast(), torch.no_grad():
        return tuple(_ops().backward_input(
            _optional(grad_output, dtype), _optional(grad_c_n, torch.float32),
            _optional(grad_cell_states, torch.float32), x.contiguous(), weight_ih.contiguous(),
            weight_im.contiguous(), _packed(weight_hh, "hh_t", lay), _packed(weight_hm, "hm_t", lay),
            h0.float().contiguous(), c0.float().contiguous(), None if lengths is None else lengths.contiguous(),
            output.contiguous(), cell_states.contiguous(), act.contiguous(), common.POISON_BUFFERS,
            portable_bf16(),
        ))


@layer_backward.register_fake
def _(grad_output, grad_c_n, grad_cell_states, x, weight_ih, weight_im, weight_hh, weight_hm, h0, c0, lengths,
      output, cell_states, act):
    H = weight_hm.shape[0]
    return (x.new_empty(x.shape), weight_ih.new_empty(weight_ih.shape), weight_im.new_empty(weight_im.shape),
            weight_hh.new_empty(GATES * H), weight_hh.new_empty(weight_hh.shape), weight_hm.new_empty(weight_hm.shape),
            h0.new_empty(h0.shape, dtype=torch.float32), c0.new_empty(c0.shape, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, weight_ih, weight_im, bias, weight_hh, weight_hm, h0, c0, lengths, save_for_backward, return_cell_states = inputs
    out, _, cell_states, act = output
    ctx.saved = save_for_backward
    ctx.return_cell_states = return_cell_states
    ctx.has_bias = bias is not None
    ctx.h0_dtype, ctx.c0_dtype = h0.dtype, c0.dtype
    if save_for_backward:
        ctx.save_for_backward(x, weight_ih, weight_im, weight_hh, weight_hm, h0, c0, lengths, out, cell_states, act)


def _backward(ctx, grad_output, grad_c_n, grad_cell_states, grad_act):
    if not ctx.saved:
        raise RuntimeError(
            "fastmlstm: the layer ran without saving activations (save_for_backward=False); "
            "call it with save_for_backward=True to differentiate it"
        )
    x, weight_ih, weight_im, weight_hh, weight_hm, h0, c0, lengths, out, cell_states, act = ctx.saved_tensors
    if not ctx.return_cell_states:
        grad_cell_states = None  # cell_states was only saved for backward, not an output to the user
    (grad_x, grad_weight_ih, grad_weight_im, grad_bias, grad_weight_hh, grad_weight_hm, grad_h0,
     grad_c0) = layer_backward(grad_output, grad_c_n, grad_cell_states, x, weight_ih, weight_im, weight_hh,
                               weight_hm, h0, c0, lengths, out, cell_states, act)
    return (grad_x, grad_weight_ih, grad_weight_im, grad_bias if ctx.has_bias else None, grad_weight_hh,
            grad_weight_hm, grad_h0.to(ctx.h0_dtype), grad_c0.to(ctx.c0_dtype), None, None, None)


layer_forward.register_autograd(_backward, setup_context=_setup_context)


def multiplicative_lstm(x: Tensor, weight_ih: Tensor, weight_hh: Tensor, weight_im: Tensor, weight_hm: Tensor,
                        bias: Tensor | None, h0: Tensor, c0: Tensor, lengths: Tensor | None,
                        return_cell_states: bool):
    """The layer on time-major x [T, B, I] with checked inputs (``fastmlstm.multiplicative_lstm``
    checks them): h0, c0 float32 [B, H]; lengths int64 [B] or None. Returns ``(output, (h_n, c_n))``
    and, if asked, the cell states, as ``fastmlstm.multiplicative_lstm_recurrence`` does."""
    tensors = (x, weight_ih, weight_hh, weight_im, weight_hm, bias, h0, c0)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    args = (x, weight_ih, weight_im, bias, weight_hh, weight_hm, h0, c0, lengths, save, return_cell_states)
    if save or torch.compiler.is_compiling() or any(t is not None and type(t) not in _PLAIN for t in tensors):
        output, c_n, cell_states, _ = layer_forward(*args)
    elif torch.is_autocast_enabled("cpu"):
        with _no_autocast(), torch.no_grad():
            output, c_n, cell_states, _ = _forward(*args)
    else:
        # Nothing to differentiate and plain tensors: the operator itself, without the custom op's
        # Python dispatch (tens of microseconds, a good part of a generation step at small sizes).
        with torch.no_grad():
            output, c_n, cell_states, _ = _forward(*args)
    # h_n is the last output (rows past their length carry their final h there), exactly as stored.
    h_n = output[-1].to(torch.float32, copy=True) if x.shape[0] > 0 else h0.clone()
    if return_cell_states:
        return output, (h_n, c_n), cell_states
    return output, (h_n, c_n)
