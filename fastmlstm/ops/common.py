"""The contract every recurrence backend implements, and the pieces they share.

Dimension letters: T time steps, B batch rows, H hidden units, G = 4 gates (order i, f, o, u).

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

The numerics every backend follows: activations (h, m, proj, the saved gates) are stored in the
weight dtype; every product is accumulated and every pointwise function evaluated in float32; the
cell state c lives in float32 throughout.
"""

from __future__ import annotations

import torch

GATES = 4

# Tests switch this on so that every buffer a kernel should fill starts as NaN: an element a kernel
# forgets to write then fails the comparison instead of passing by luck.
POISON_BUFFERS = False


def new_buffer(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer that the caller promises to overwrite completely."""
    if POISON_BUFFERS and dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


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
    m = (act[..., GATES * H : (GATES + 1) * H].float() * act[..., (GATES + 1) * H :].float()).to(dtype)
    grad_weight_hh = dz.t().mm(m.reshape(T * B, H))
    # h_{t-1} is output[t-1] for t >= 1 and h0 at t = 0: two GEMMs instead of concatenating a copy.
    grad_weight_hm = grad_hm[0].t().mm(h0.to(dtype))
    if T > 1:
        grad_weight_hm = grad_weight_hm.addmm(grad_hm[1:].reshape(-1, H).t(), output[:-1].reshape(-1, H))
    return grad_weight_hh, grad_weight_hm
