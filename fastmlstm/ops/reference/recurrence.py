"""The recurrence written to be read against the paper's equations (MODEL.md; the multiplicative
LSTM of Krause et al. 2016 as Radford et al. 2017 use it), forward and backward:

    hm_t = h_{t-1} W_mh^T                      xm_t = x_t W_mx^T          (proj[..., 4H:])
    m_t  = xm_t * hm_t
    z_t  = x_t W_x^T + b + m_t W_h^T                                      (x_t W_x^T + b: proj[..., :4H])
    i, f, o = sigmoid(z_i), sigmoid(z_f), sigmoid(z_o);  u = tanh(z_u)
    c_t  = f * c_{t-1} + i * u
    h_t  = o * tanh(c_t)

A padded step (t >= lengths[b]) leaves row b's h and c unchanged.

It follows the numerics of the interface (:mod:`fastmlstm.ops.interface`): h, m and the saved
values are stored in the activation dtype, products and pointwise functions are evaluated in the
accumulation dtype (float32; float64 for float64 tensors), and c stays in that dtype. Nothing here
is optimized: the other backends are.

Dimension letters: T time, B batch, H hidden, G = 4H gate columns (i, f, o, u).
"""

from __future__ import annotations

import torch

from ..interface import GATES, accumulation_dtype, empty_like_none, new_buffer, recurrent_weight_grads

__all__ = ["forward", "backward"]


def forward(proj, weight_hh, weight_hm, h0, c0, lengths, save_for_backward, return_cell_states):
    T, B, H5 = proj.shape
    H, G = H5 // 5, GATES * H5 // 5
    dtype, device, acc = proj.dtype, proj.device, accumulation_dtype(proj.dtype)
    keep_cells = save_for_backward or return_cell_states
    # Each step's values are collected and stacked, never written into a buffer in place: so the
    # loop is also what torch.func's transforms (grad, vmap, jacrev) differentiate and batch.
    outputs, cells, saved = [], [], []
    W_h, W_mh = weight_hh.to(acc), weight_hm.to(acc)
    h, c = h0.to(dtype), c0.to(acc)
    for t in range(T):
        xz, xm = proj[t, :, :G].to(acc), proj[t, :, G:].to(acc)
        hm = h.to(acc) @ W_mh.t()
        m = (xm * hm).to(dtype)
        z = xz + m.to(acc) @ W_h.t()
        gates = torch.cat([torch.sigmoid(z[:, : 3 * H]), torch.tanh(z[:, 3 * H :])], dim=1)
        i, f, o, u = gates.split(H, dim=1)
        c_new = f * c + i * u
        h_new = (o * torch.tanh(c_new)).to(dtype)
        if lengths is not None:
            running = (t < lengths).unsqueeze(1)
            c_new, h_new = torch.where(running, c_new, c), torch.where(running, h_new, h)
        outputs.append(h_new)
        if keep_cells:
            cells.append(c_new)
        if save_for_backward:
            saved.append(torch.cat([gates, xm, hm], dim=1).to(dtype))
        h, c = h_new, c_new

    def stacked(steps, width, dtype_):
        return torch.stack(steps) if steps else new_buffer((0, B, width), dtype_, device)

    output = stacked(outputs, H, dtype)
    cell_states = stacked(cells, H, acc) if keep_cells else empty_like_none(c0)
    act = stacked(saved, 6 * H, dtype) if save_for_backward else empty_like_none(proj)
    return output, c.clone() if c is c0 else c, cell_states, act


def _cell_backward(dh, dc, gates, c, c_prev):
    """The derivatives of one step's cell: (dz [B, 4H], the gradient reaching c_{t-1})."""
    i, f, o, u = gates.chunk(GATES, dim=1)
    tanh_c = torch.tanh(c)
    dc = dc + dh * o * (1 - tanh_c * tanh_c)
    dz = torch.cat([dc * u * i * (1 - i), dc * c_prev * f * (1 - f), dh * tanh_c * o * (1 - o),
                    dc * i * (1 - u * u)], dim=1)
    return dz, dc * f


def backward(grad_output, grad_c_n, grad_cell_states, weight_hh, weight_hm, h0, c0, lengths,
             output, cell_states, act):
    T, B, H = output.shape
    G = GATES * H
    dtype, device, acc = output.dtype, output.device, accumulation_dtype(output.dtype)
    grad_proj = new_buffer((T, B, 5 * H), dtype, device)
    grad_hm = new_buffer((T, B, H), dtype, device)
    W_h, W_mh = weight_hh.to(acc), weight_hm.to(acc)
    # dh: the whole gradient reaching h_t. It reaches h_t through hm_{t+1} (and, where row b was
    # padding at t + 1, h_{t+1} = h_t passes it on unchanged), and from the output at t.
    dh = torch.zeros(B, H, dtype=acc, device=device)
    dc = grad_c_n.to(acc).clone() if grad_c_n is not None else torch.zeros_like(dh)
    for t in range(T - 1, -1, -1):
        if t < T - 1:
            through_hm = grad_hm[t + 1].to(acc) @ W_mh
            dh = through_hm if lengths is None else through_hm + torch.where((t + 1 < lengths).unsqueeze(1), 0, dh)
        if grad_output is not None:
            dh = dh + grad_output[t].to(acc)
        if grad_cell_states is not None:
            dc = dc + grad_cell_states[t].to(acc)
        c_prev = cell_states[t - 1] if t > 0 else c0.to(acc)
        dz, dc_prev = _cell_backward(dh, dc, act[t, :, :G].to(acc), cell_states[t], c_prev)
        if lengths is not None:  # a padded step is the identity on c: its gradient passes, its gates get none
            running = (t < lengths).unsqueeze(1)
            dz, dc_prev = torch.where(running, dz, 0), torch.where(running, dc_prev, dc)
        dc = dc_prev
        dz = dz.to(dtype)
        dm = dz.to(acc) @ W_h
        grad_proj[t, :, :G] = dz
        grad_proj[t, :, G:] = dm * act[t, :, 5 * H :].to(acc)
        grad_hm[t] = dm * act[t, :, G : 5 * H].to(acc)
    grad_h0 = torch.zeros(B, H, dtype=acc, device=device)
    if T > 0:
        grad_h0 = grad_hm[0].to(acc) @ W_mh
        if lengths is not None:  # rows that never started pass the gradient of h_0 straight through
            grad_h0 = grad_h0 + torch.where((0 < lengths).unsqueeze(1), 0, dh)
    grad_weight_hh, grad_weight_hm = recurrent_weight_grads(grad_proj, grad_hm, act, output, h0)
    return grad_proj, grad_weight_hh, grad_weight_hm, grad_h0, dc
