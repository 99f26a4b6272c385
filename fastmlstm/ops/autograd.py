"""The recurrence's two entry points as ``torch.library`` custom ops, written once for every
backend: autograd and ``torch.compile`` see one opaque op each, whose fake (meta) implementation
gives the output shapes without running anything.

- ``fastmlstm::sequence_forward`` / ``sequence_backward``: the recurrence on precomputed input
  projections (every backend's ``forward``/``backward``).
- ``fastmlstm::layer_forward`` / ``layer_backward``: the whole layer from its input x (the
  ``layer_forward``/``layer_backward`` of backends that have them; :mod:`fastmlstm.ops.interface`).

Each op carries the backend's name as an argument and calls that backend's package, found in the
registry (:func:`fastmlstm.ops.registry.module`). :func:`_link` registers the autograd formula of
both pairs the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from . import registry
from .interface import GATES, accumulation_dtype

__all__ = ["sequence_forward", "sequence_backward", "layer_forward", "layer_backward", "no_autocast"]


def no_autocast(device_type: str):
    """Backends choose their own precisions: accumulation-dtype math on stored activations.
    Autocast, still on while a custom op's implementation runs, would downcast their products."""
    return torch.autocast(device_type, enabled=False)


def _forward_fake(like: Tensor, c0: Tensor, T: int, B: int, H: int, save: bool, cells: bool):
    acc = accumulation_dtype(like.dtype)
    keep_cells = save or cells
    return (like.new_empty(T, B, H), c0.new_empty(B, H, dtype=acc),
            c0.new_empty((T, B, H) if keep_cells else (0,), dtype=acc),
            like.new_empty((T, B, 6 * H) if save else (0,)))


@torch.library.custom_op("fastmlstm::sequence_forward", mutates_args=())
def sequence_forward(
    proj: Tensor, weight_hh: Tensor, weight_hm: Tensor, h0: Tensor, c0: Tensor, lengths: Optional[Tensor],
    backend: str, save_for_backward: bool, return_cell_states: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(output [T,B,H], c_n [B,H], cell_states [T,B,H] or [0], act [T,B,6H] or [0])."""
    with no_autocast(proj.device.type):
        return registry.module(backend).forward(proj, weight_hh, weight_hm, h0, c0, lengths, save_for_backward,
                                                return_cell_states)


@sequence_forward.register_fake
def _(proj, weight_hh, weight_hm, h0, c0, lengths, backend, save_for_backward, return_cell_states):
    T, B, H5 = proj.shape
    return _forward_fake(proj, c0, T, B, H5 // 5, save_for_backward, return_cell_states)


@torch.library.custom_op("fastmlstm::sequence_backward", mutates_args=())
def sequence_backward(
    grad_output: Optional[Tensor], grad_c_n: Optional[Tensor], grad_cell_states: Optional[Tensor],
    weight_hh: Tensor, weight_hm: Tensor, h0: Tensor, c0: Tensor, lengths: Optional[Tensor],
    output: Tensor, cell_states: Tensor, act: Tensor, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad_proj [T,B,5H], grad_weight_hh [4H,H], grad_weight_hm [H,H], grad_h0, grad_c0 [B,H])."""
    with no_autocast(output.device.type):
        return registry.module(backend).backward(grad_output, grad_c_n, grad_cell_states, weight_hh, weight_hm, h0,
                                                 c0, lengths, output, cell_states, act)


@sequence_backward.register_fake
def _(grad_output, grad_c_n, grad_cell_states, weight_hh, weight_hm, h0, c0, lengths, output, cell_states, act,
      backend):
    T, B, H = output.shape
    acc = accumulation_dtype(output.dtype)
    return (output.new_empty(T, B, 5 * H), weight_hh.new_empty(GATES * H, H), weight_hm.new_empty(H, H),
            h0.new_empty(B, H, dtype=acc), c0.new_empty(B, H, dtype=acc))


@torch.library.custom_op("fastmlstm::layer_forward", mutates_args=())
def layer_forward(
    x: Tensor, weight_ih: Tensor, weight_im: Tensor, bias: Optional[Tensor], weight_hh: Tensor, weight_hm: Tensor,
    h0: Tensor, c0: Tensor, lengths: Optional[Tensor], backend: str, save_for_backward: bool,
    return_cell_states: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(output [T,B,H], c_n [B,H], cell_states [T,B,H] or [0], act [T,B,6H] or [0])."""
    with no_autocast(x.device.type):
        return registry.module(backend).layer_forward(x, weight_ih, weight_im, bias, weight_hh, weight_hm, h0, c0,
                                                      lengths, save_for_backward, return_cell_states)


@layer_forward.register_fake
def _(x, weight_ih, weight_im, bias, weight_hh, weight_hm, h0, c0, lengths, backend, save_for_backward,
      return_cell_states):
    T, B, _ = x.shape
    return _forward_fake(x, c0, T, B, weight_hm.shape[0], save_for_backward, return_cell_states)


@torch.library.custom_op("fastmlstm::layer_backward", mutates_args=())
def layer_backward(
    grad_output: Optional[Tensor], grad_c_n: Optional[Tensor], grad_cell_states: Optional[Tensor], x: Tensor,
    weight_ih: Tensor, weight_im: Tensor, weight_hh: Tensor, weight_hm: Tensor, h0: Tensor, c0: Tensor,
    lengths: Optional[Tensor], output: Tensor, cell_states: Tensor, act: Tensor, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight_ih, grad_weight_im, grad_bias [4H], grad_weight_hh, grad_weight_hm, grad_h0,
    grad_c0)."""
    with no_autocast(x.device.type):
        return registry.module(backend).layer_backward(grad_output, grad_c_n, grad_cell_states, x, weight_ih,
                                                       weight_im, weight_hh, weight_hm, h0, c0, lengths, output,
                                                       cell_states, act)


@layer_backward.register_fake
def _(grad_output, grad_c_n, grad_cell_states, x, weight_ih, weight_im, weight_hh, weight_hm, h0, c0, lengths,
      output, cell_states, act, backend):
    acc = accumulation_dtype(output.dtype)
    return (x.new_empty(x.shape), weight_ih.new_empty(weight_ih.shape), weight_im.new_empty(weight_im.shape),
            weight_hh.new_empty(weight_hh.shape[0]), weight_hh.new_empty(weight_hh.shape),
            weight_hm.new_empty(weight_hm.shape), h0.new_empty(h0.shape, dtype=acc), c0.new_empty(c0.shape, dtype=acc))


def _link(forward_op, backward_op, saved: Sequence[int]) -> None:
    """Register ``backward_op`` as the autograd formula of ``forward_op``.

    Both forward ops take ``(*tensors, backend, save_for_backward, return_cell_states)`` and return
    ``(output, c_n, cell_states, act)``; ``saved`` are the positions of the inputs the backward
    needs, which it takes, in that order, after the three incoming gradients and before ``(output,
    cell_states, act, backend)``. The backward returns one gradient per tensor input, in order.
    """

    def setup_context(ctx, inputs, output):
        # No zeros for outputs no gradient reached (act, cell states kept only for the backward, an
        # unused c_n): the backends take None there. Materialized, act's alone is a [T, B, 6H] fill.
        ctx.set_materialize_grads(False)
        ctx.backend, ctx.saved, ctx.return_cell_states = inputs[-3:]
        ctx.inputs = [(t.dtype if isinstance(t, Tensor) else None) for t in inputs]
        if ctx.saved:
            out, _, cell_states, act = output
            ctx.save_for_backward(*(inputs[i] for i in saved), out, cell_states, act)

    def backward(ctx, grad_output, grad_c_n, grad_cell_states, grad_act):
        if not ctx.saved:
            raise RuntimeError("fastmlstm: the recurrence ran without saving activations (save_for_backward=False); "
                               "call it with save_for_backward=True to differentiate it")
        if not ctx.return_cell_states:
            grad_cell_states = None  # cell_states was only saved for backward, not an output to the user
        grads = backward_op(grad_output, grad_c_n, grad_cell_states, *ctx.saved_tensors, ctx.backend)
        return tuple(None if dtype is None or k >= len(grads) else grads[k].to(dtype)
                     for k, dtype in enumerate(ctx.inputs))

    forward_op.register_autograd(backward, setup_context=setup_context)


_link(sequence_forward, sequence_backward, saved=(1, 2, 3, 4, 5))
_link(layer_forward, layer_backward, saved=(0, 1, 2, 4, 5, 6, 7, 8))
