"""An independent float64 implementation of the multiplicative LSTM, written from the equations in
MODEL.md with autograd, sharing no code with the package. The ground truth of the test suite."""

import torch


def weight_norm_f64(v, g):
    return g[:, None] * v / v.norm(dim=1, keepdim=True)


def mlstm_f64(x, w_ih, w_hh, w_im, w_hm, b, h0, c0, lengths=None):
    """x [T, B, I] float64; weights in torch [out, in] layout; returns (out, h_n, c_n, cells)."""
    T, B, _ = x.shape
    H = w_hm.shape[0]
    h, c = h0, c0
    outs, cells = [], []
    for t in range(T):
        m = (x[t] @ w_im.T) * (h @ w_hm.T)
        z = x[t] @ w_ih.T + m @ w_hh.T
        if b is not None:
            z = z + b
        i = torch.sigmoid(z[:, :H])
        f = torch.sigmoid(z[:, H:2 * H])
        o = torch.sigmoid(z[:, 2 * H:3 * H])
        u = torch.tanh(z[:, 3 * H:])
        c_new = f * c + i * u
        h_new = o * torch.tanh(c_new)
        if lengths is not None:
            keep = torch.tensor([t < n for n in lengths], device=x.device)[:, None]
            c_new = torch.where(keep, c_new, c)
            h_new = torch.where(keep, h_new, h)
        h, c = h_new, c_new
        outs.append(h)
        cells.append(c)
    out = torch.stack(outs) if T else x.new_zeros(0, B, H)
    cells = torch.stack(cells) if T else x.new_zeros(0, B, H)
    return out, h, c, cells
