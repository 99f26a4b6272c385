"""The interface every recurrence backend implements, and the pieces they share.

A backend is a package of :mod:`fastmlstm.ops` listed in :data:`fastmlstm.ops.registry.REGISTRY`;
its module has the members of :class:`BackendModule`. Two entry points:

- the **sequence** (every backend): the recurrence over T steps on precomputed input projections,
  ``forward``/``backward`` below. A generation step is a sequence of one step.
- the **layer** (optional, ``layer_forward``/``layer_backward``): the whole layer from its input x,
  for backends that compute the input projections inside their time loop (the CPU backend).
  Without it, :mod:`fastmlstm.ops.autograd` computes the projections with one GEMM and runs the
  sequence.

Dimension letters: T time steps, B batch rows, I input features, H hidden units, G = 4 gates
(order i, f, o, u).

``forward(proj, weight_hh, weight_hm, h0, c0, lengths, save_for_backward, return_cell_states)``
    proj       [T, B, 5H]  input projections, activation dtype: columns [0, 4H) are x Wx + b for
                           the gates i, f, o, u; columns [4H, 5H) are xm = x Wmx.
    weight_hh  [4H, H]     effective gate weights applied to m (torch's [out, in] layout).
    weight_hm  [H, H]      effective weights of the m product applied to h.
    h0, c0     [B, H]      initial state, float32.
    lengths    [B] int64 on the tensors' device, or None: row b is updated only while t < lengths[b];
                           afterwards its h and c are carried unchanged (and output[t] repeats h).
    returns (output [T, B, H] activation dtype,
             c_n [B, H] float32,
             cell_states [T, B, H] float32 if save_for_backward or return_cell_states, else [0],
             act [T, B, 6H] activation dtype if save_for_backward, else [0]:
                 columns [0, 4H) the gate activations i, f, o, u; [4H, 5H) xm; [5H, 6H) hm = h Wmh^T)

``backward(grad_output, grad_c_n, grad_cell_states, weight_hh, weight_hm, h0, c0, lengths,
           output, cell_states, act)``
    grad_* may be None (no gradient reached that output).
    returns (grad_proj [T, B, 5H], grad_weight_hh [4H, H], grad_weight_hm [H, H],
             grad_h0 [B, H] float32, grad_c0 [B, H] float32)

``layer_forward(x, weight_ih, weight_im, bias, weight_hh, weight_hm, h0, c0, lengths,
                save_for_backward, return_cell_states)``
    x [T, B, I], weight_ih [4H, I], weight_im [H, I], bias [4H] or None; the rest and the returns
    as ``forward``.

``layer_backward(grad_output, grad_c_n, grad_cell_states, x, weight_ih, weight_im, weight_hh,
                 weight_hm, h0, c0, lengths, output, cell_states, act)``
    returns (grad_x [T, B, I], grad_weight_ih, grad_weight_im, grad_bias [4H], grad_weight_hh,
             grad_weight_hm, grad_h0 [B, H] float32, grad_c0 [B, H] float32)

The numerics every backend follows: activations (h, m, proj, the saved gates) are stored in the
weight dtype; every product is accumulated and every pointwise function evaluated in float32 (in
float64 for float64 tensors, which only the reference backend takes); the cell state c lives in
float32 (float64) throughout.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch
from torch import Tensor

GATES = 4


class BackendModule(Protocol):
    """What a backend package provides (``layer_forward``/``layer_backward`` only where it computes
    the input projections itself; :data:`LAYER_ENTRIES`)."""

    def is_available(self) -> tuple[bool, str]:
        """``(True, "")`` when the backend can run (its extension builds, its compiler imports),
        else ``(False, reason)``; never raises. Device types are the registry's business."""

    def forward(self, proj: Tensor, weight_hh: Tensor, weight_hm: Tensor, h0: Tensor, c0: Tensor,
                lengths: Optional[Tensor], save_for_backward: bool,
                return_cell_states: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]: ...

    def backward(self, grad_output: Optional[Tensor], grad_c_n: Optional[Tensor],
                 grad_cell_states: Optional[Tensor], weight_hh: Tensor, weight_hm: Tensor, h0: Tensor,
                 c0: Tensor, lengths: Optional[Tensor], output: Tensor, cell_states: Tensor,
                 act: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]: ...


SEQUENCE_ENTRIES = ("is_available", "forward", "backward")
LAYER_ENTRIES = ("layer_forward", "layer_backward")
# Optional, beside the layer entries: a one-step ``layer_forward`` without autograd, prepared once
# per set of weights (``prepare_step(weight_ih, weight_im, bias, weight_hh, weight_hm, B) ->
# step(x [1, B, I], h0, c0) -> (output [1, B, H], c_n [B, H])``), valid while the weights and
# ``step_key(dtype, B, H, I)`` are unchanged. Generation loops call it step by step.
STEP_ENTRIES = ("step_key", "prepare_step")
# Optional, beside the sequence entries: a one-step ``forward`` without autograd, prepared once per
# pair of recurrent weights (``prepare_sequence_step(weight_hh, weight_hm, B) -> step(proj [1, B, 5H],
# h0, c0) -> (output [1, B, H], c_n [B, H])``, h0 and c0 float32 and contiguous), valid while the
# weights are unchanged. Byte generation calls it byte by byte.
SEQUENCE_STEP_ENTRY = "prepare_sequence_step"


def has_layer(backend) -> bool:
    """Whether a backend module computes whole layers (input projections inside its loop)."""
    return all(callable(getattr(backend, name, None)) for name in LAYER_ENTRIES)


def has_step(backend) -> bool:
    """Whether a backend module prepares single steps (:data:`STEP_ENTRIES`)."""
    return has_layer(backend) and all(callable(getattr(backend, name, None)) for name in STEP_ENTRIES)


def has_sequence_step(backend) -> bool:
    """Whether a backend module prepares single steps of the recurrence (:data:`SEQUENCE_STEP_ENTRY`)."""
    return callable(getattr(backend, SEQUENCE_STEP_ENTRY, None))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of every product, pointwise function and cell state for activations of ``dtype``:
    float32, or float64 for float64 tensors."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# Tests switch this on so that every buffer a kernel should fill starts as NaN: an element a kernel
# forgets to write then fails the comparison instead of passing by luck.
POISON_BUFFERS = False


def new_buffer(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer that the caller promises to overwrite completely."""
    if POISON_BUFFERS and dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def row_major_lengths(lengths: torch.Tensor | None) -> torch.Tensor | None:
    """``lengths`` as a kernel reads them: one int per row at consecutive addresses (a strided view,
    e.g. a column of a [B, 2] tensor, would otherwise be read at the wrong rows)."""
    return None if lengths is None else lengths.contiguous()


def empty_like_none(ref: torch.Tensor) -> torch.Tensor:
    """The placeholder for an output that was not asked for."""
    return ref.new_empty(0)


def recurrent_weight_grads(grad_proj: torch.Tensor, grad_hm: torch.Tensor, act: torch.Tensor,
                           output: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the recurrent matrices as two large GEMMs over all T*B rows (not T small ones).

    grad_proj [T, B, 5H] (its first 4H columns are dz), grad_hm [T, B, H] (d hm per step),
    act [T, B, 6H] saved by the forward, output [T, B, H], h0 [B, H] float32.
    dWh = sum_t dz_t^T m_t with m_t = xm_t * hm_t; dWmh = sum_t d(hm_t)^T h_{t-1}.
    """
    T, B, H = output.shape
    dtype = output.dtype
    if T == 0:
        zeros = output.new_zeros
        return zeros(GATES * H, H), zeros(H, H)
    dz = grad_proj[..., : GATES * H].reshape(T * B, GATES * H)
    acc = accumulation_dtype(dtype)
    m = (act[..., GATES * H : (GATES + 1) * H].to(acc) * act[..., (GATES + 1) * H :].to(acc)).to(dtype)
    grad_weight_hh = dz.t().mm(m.reshape(T * B, H))
    # h_{t-1} is output[t-1] for t >= 1 and h0 at t = 0: two GEMMs instead of concatenating a copy.
    grad_weight_hm = grad_hm[0].t().mm(h0.to(dtype))
    if T > 1:
        grad_weight_hm = grad_weight_hm.addmm(grad_hm[1:].reshape(-1, H).t(), output[:-1].reshape(-1, H))
    return grad_weight_hh, grad_weight_hm
