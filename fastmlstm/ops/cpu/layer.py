"""The whole layer on the CPU backend: input projections computed inside the time loop.

``fastmlstm.multiplicative_lstm`` (and so ``FastMLSTM``) sends CPU tensors here when the resolved
backend is ``"cpu"``. Instead of one [T, B, I] x [I, 5H] GEMM writing a [T, B, 5H] tensor that the
loop then reads back (on a CPU a large fresh tensor costs page faults, and the loop's strided reads
of it miss the caches), each step multiplies x_t [B, I] by the packed input weights tile by tile,
next to the recurrent GEMMs, in float32 (bfloat16 natively where the CPU has it): the gate GEMM runs
on [m_t | x_t] against [Wh | Wx] (one tile GEMM with K = H + I), and xm = x Wmx^T, which does not
depend on the recurrence, is one GEMM per chunk of steps. Everything else follows the recurrence
contract (:mod:`fastmlstm.ops.interface`), with one difference that only makes it more accurate: the
gate part of the input projections is never stored, so it is not rounded to a 16-bit activation
dtype before m Wh^T is added (xm is, as it is saved for the backward). The backward
returns the gradients of x and the input weights too, summed over time in float32 chunk by chunk.

These are the backend's ``layer_forward``/``layer_backward`` entries (:mod:`fastmlstm.ops.interface`);
:mod:`fastmlstm.ops.autograd` makes them one custom op with the other backends' entries.

Dimension letters: T time, B batch, I input features, H hidden.
"""

from __future__ import annotations

import torch

from .. import interface
from .recurrence import FLOAT32, NARROW_MAX_ROWS, VNNI, _dense, _ops, _optional, _packed, kernel_isa, layout, \
    portable_bf16

__all__ = ["layer_forward", "layer_backward", "step_key", "prepare_step"]


def _forward_packs(weight_ih, weight_im, weight_hh, weight_hm, lay, rows):
    """The packed weights forward_input reads for ``rows`` batch rows: Wmx^T, [Wh | Wx] and Wmh in
    layout ``lay``. Wmx^T is float32 (xm a float32 GEMM, then rounded) up to NARROW_MAX_ROWS rows
    even with VNNI weights: a bfloat16 GEMM goes through oneDNN's matmul, whose fixed cost per
    call (about 16 us at one row, against 2 us for the float32 GEMM) outweighs a generation step's
    GEMMs. Chosen by the batch, never by T, so a row's result does not depend on T."""
    xm_lay = lay if lay != VNNI or rows > NARROW_MAX_ROWS else FLOAT32
    return (_packed(weight_im, "xm", xm_lay), _packed(weight_hh, "hh", lay, weight_ih),
            _packed(weight_hm, "hm", lay))


def layer_forward(x, weight_ih, weight_im, bias, weight_hh, weight_hm, h0, c0, lengths, save_for_backward,
                  return_cell_states):
    H, I = weight_hm.shape[0], x.shape[2]
    lay = layout(x.dtype, x.shape[1], H, I)  # one layout for every GEMM of the loop; VNNI needs even K
    xm, hh, hm = _forward_packs(weight_ih, weight_im, weight_hh, weight_hm, lay, x.shape[1])
    with torch.no_grad():
        return tuple(_ops().forward_input(
            _dense(x), xm, None if bias is None else bias.contiguous(), hh, hm, _dense(h0, torch.float32),
            _dense(c0, torch.float32), None if lengths is None else lengths.contiguous(), bool(save_for_backward),
            bool(return_cell_states), interface.POISON_BUFFERS, portable_bf16(),
        ))


def step_key(dtype: torch.dtype, B: int, H: int, I: int) -> tuple:
    """What a prepared step depends on besides its weights: the packed layout and the epilogues'
    instruction set (both switchable at run time), and the batch."""
    return layout(dtype, B, H, I), kernel_isa(), B


def prepare_step(weight_ih, weight_im, bias, weight_hh, weight_hm, B: int):
    """``layer_forward`` for one step of B rows without autograd, its packed weights bound once:
    ``step(x [1, B, I], h0, c0) -> (output [1, B, H], c_n [B, H])``. Valid while the weights and
    :func:`step_key` are unchanged (the caller keys it on both)."""
    lay = layout(weight_hm.dtype, B, weight_hm.shape[0], weight_im.shape[1])
    xm, hh, hm = _forward_packs(weight_ih, weight_im, weight_hh, weight_hm, lay, B)
    bias = None if bias is None else bias.contiguous()
    forward_input = _ops().forward_input

    def step(x, h0, c0):
        output, c_n, _, _ = forward_input(_dense(x), xm, bias, hh, hm, _dense(h0, torch.float32),
                                          _dense(c0, torch.float32), None, False, False, interface.POISON_BUFFERS,
                                          portable_bf16())
        return output, c_n

    return step


def layer_backward(grad_output, grad_c_n, grad_cell_states, x, weight_ih, weight_im, weight_hh, weight_hm, h0, c0,
                   lengths, output, cell_states, act):
    dtype = output.dtype
    lay = layout(dtype, x.shape[1], weight_hm.shape[0], backward=True)
    with torch.no_grad():
        return tuple(_ops().backward_input(
            _optional(grad_output, dtype), _optional(grad_c_n, torch.float32),
            _optional(grad_cell_states, torch.float32), x.contiguous(), weight_ih.contiguous(),
            weight_im.contiguous(), _packed(weight_hh, "hh_t", lay), _packed(weight_hm, "hm_t", lay),
            h0.float().contiguous(), c0.float().contiguous(), None if lengths is None else lengths.contiguous(),
            output.contiguous(), cell_states.contiguous(), act.contiguous(), interface.POISON_BUFFERS,
            portable_bf16(),
        ))
