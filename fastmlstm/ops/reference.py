"""Reference recurrence: a plain PyTorch loop over time with explicit forward and backward.

It is the CPU path, the fallback on GPUs without Triton or the extension, and the specification the
fused kernels are tested against: it follows the same numerics (activations stored in the weight
dtype, float32 arithmetic and float32 cell state) and the same saved-tensor contract
(:mod:`fastmlstm.ops.common`).

Dimension letters: T time, B batch, H hidden, G = 4 gates (i, f, o, u).
"""

from __future__ import annotations

import torch

from .common import GATES, empty_like_none, new_buffer, recurrent_weight_grads

__all__ = ["forward", "backward", "is_available"]


def is_available() -> tuple[bool, str]:
    return True, ""


def forward(proj, weight_hh, weight_hm, h0, c0, lengths, save_for_backward, return_cell_states):
    T, B, H5 = proj.shape
    H = H5 // 5
    dtype, device = proj.dtype, proj.device
    keep_cells = save_for_backward or return_cell_states
    output = new_buffer((T, B, H), dtype, device)
    cell_states = new_buffer((T, B, H), torch.float32, device) if keep_cells else empty_like_none(c0)
    act = new_buffer((T, B, 6 * H), dtype, device) if save_for_backward else empty_like_none(proj)

    w_hm_t = weight_hm.float().t()
    w_hh_t = weight_hh.float().t()
    h = h0.to(dtype)
    c = c0.float()
    for t in range(T):
        x_t = proj[t]
        xm = x_t[:, GATES * H :]
        hm = h.float().mm(w_hm_t)
        m = (xm.float() * hm).to(dtype)
        z = x_t[:, : GATES * H].float().addmm(m.float(), w_hh_t)
        ifo = torch.sigmoid(z[:, : 3 * H])
        u = torch.tanh(z[:, 3 * H :])
        i, f, o = ifo.chunk(3, dim=1)
        c_new = f * c + i * u
        h_new = (o * torch.tanh(c_new)).to(dtype)
        if lengths is not None:
            active = (t < lengths).unsqueeze(1)
            c_new = torch.where(active, c_new, c)
            h_new = torch.where(active, h_new, h)
        output[t] = h_new
        if keep_cells:
            cell_states[t] = c_new
        if save_for_backward:
            act[t, :, : 3 * H] = ifo
            act[t, :, 3 * H : GATES * H] = u
            act[t, :, GATES * H : 5 * H] = xm
            act[t, :, 5 * H :] = hm
        h, c = h_new, c_new
    return output, c.clone() if c is c0 else c, cell_states, act


def backward(grad_output, grad_c_n, grad_cell_states, weight_hh, weight_hm, h0, c0, lengths,
             output, cell_states, act):
    T, B, H = output.shape
    dtype, device = output.dtype, output.device
    grad_proj = new_buffer((T, B, 5 * H), dtype, device)
    grad_hm = new_buffer((T, B, H), dtype, device)
    w_hh = weight_hh.float()
    w_hm = weight_hm.float()

    # dh carries the full gradient reaching h_t; it only crosses a step on its own where the row was
    # padding (h_{t+1} = h_t), otherwise it flows through d hm_{t+1} Wmh.
    dh = torch.zeros(B, H, dtype=torch.float32, device=device)
    dc = grad_c_n.float().clone() if grad_c_n is not None else torch.zeros_like(dh)
    for t in range(T - 1, -1, -1):
        if t < T - 1:
            rec = grad_hm[t + 1].float().mm(w_hm)
            if lengths is not None:
                rec = rec + torch.where((t + 1 < lengths).unsqueeze(1), 0.0, dh)
            dh = rec
        if grad_output is not None:
            dh = dh + grad_output[t].float()
        if grad_cell_states is not None:
            dc = dc + grad_cell_states[t].float()
        gates = act[t, :, : GATES * H].float()
        i, f, o, u = gates.chunk(GATES, dim=1)
        c = cell_states[t]
        c_prev = cell_states[t - 1] if t > 0 else c0
        tanh_c = torch.tanh(c)
        dc_from_h = dh * o * (1.0 - tanh_c * tanh_c)
        if lengths is not None:
            active = (t < lengths).unsqueeze(1)
            dc_from_h = torch.where(active, dc_from_h, 0.0)
        dc = dc + dc_from_h
        dz = torch.cat(
            [dc * u * i * (1.0 - i), dc * c_prev * f * (1.0 - f), dh * tanh_c * o * (1.0 - o), dc * i * (1.0 - u * u)],
            dim=1,
        )
        if lengths is not None:
            dz = torch.where(active, dz, 0.0)
            dc = torch.where(active, dc * f, dc)
        else:
            dc = dc * f
        dz = dz.to(dtype)
        grad_proj[t, :, : GATES * H] = dz
        dm = dz.float().mm(w_hh)
        xm = act[t, :, GATES * H : 5 * H].float()
        hm = act[t, :, 5 * H :].float()
        grad_proj[t, :, GATES * H :] = dm * hm
        grad_hm[t] = dm * xm
    if T > 0:
        grad_h0 = grad_hm[0].float().mm(w_hm)
        if lengths is not None:
            grad_h0 = grad_h0 + torch.where((0 < lengths).unsqueeze(1), 0.0, dh)
    else:
        grad_h0 = torch.zeros(B, H, dtype=torch.float32, device=device)
    grad_weight_hh, grad_weight_hm = recurrent_weight_grads(grad_proj, grad_hm, act, output, h0)
    return grad_proj, grad_weight_hh, grad_weight_hm, grad_h0, dc
