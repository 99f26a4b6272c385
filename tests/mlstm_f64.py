"""An independent float64 implementation of the multiplicative LSTM, written from the equations in
MODEL.md with autograd, sharing no code with the package. The ground truth of the test suite."""

import torch


def weight_norm_f64(v, g):
    return g[:, None] * v / v.norm(dim=1, keepdim=True)


def recurrence_f64(proj, w_hh, w_hm, h0, c0, lengths=None):
    """The recurrence on input projections proj [T, B, 5H] = [x W_ih^T + b, x W_im^T].

    lengths: None, or [B] ints (list or tensor): row b stops updating after lengths[b] steps.
    Returns (out [T, B, H], h_n, c_n, cells [T, B, H]).
    """
    T, B, H5 = proj.shape
    H = H5 // 5
    if lengths is not None:
        lengths = torch.as_tensor(lengths, device=proj.device)
    h, c = h0, c0
    outs, cells = [], []
    for t in range(T):
        m = proj[t, :, 4 * H:] * (h @ w_hm.T)
        z = proj[t, :, :4 * H] + m @ w_hh.T
        i = torch.sigmoid(z[:, :H])
        f = torch.sigmoid(z[:, H:2 * H])
        o = torch.sigmoid(z[:, 2 * H:3 * H])
        u = torch.tanh(z[:, 3 * H:])
        c_new = f * c + i * u
        h_new = o * torch.tanh(c_new)
        if lengths is not None:
            keep = (t < lengths)[:, None]
            c_new = torch.where(keep, c_new, c)
            h_new = torch.where(keep, h_new, h)
        h, c = h_new, c_new
        outs.append(h)
        cells.append(c)
    out = torch.stack(outs) if T else proj.new_zeros(0, B, H)
    cells = torch.stack(cells) if T else proj.new_zeros(0, B, H)
    return out, h, c, cells


def mlstm_f64(x, w_ih, w_hh, w_im, w_hm, b, h0, c0, lengths=None):
    """x [T, B, I] float64; weights in torch [out, in] layout; returns (out, h_n, c_n, cells)."""
    xg = x @ w_ih.T
    if b is not None:
        xg = xg + b
    return recurrence_f64(torch.cat([xg, x @ w_im.T], dim=-1), w_hh, w_hm, h0, c0, lengths)
