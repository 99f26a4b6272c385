"""The recurrence's contract (fastmlstm/ops/interface.py) exercised the same way by every backend's
tests: seeded inputs, one backend's forward + backward, the float64 truth of the same inputs, and the
accuracy rule of tests/tolerances.py. Each backend's test file imports these instead of writing its own.
"""

import torch
from mlstm_f64 import recurrence_f64
from tolerances import ABS, FACTOR, rel_err

from fastmlstm.ops import autograd

NAMES = ("output", "c_n", "cell_states", "grad_proj", "grad_weight_hh", "grad_weight_hm", "grad_h0", "grad_c0")


def inputs(T, B, H, dtype, *, ragged=False, seed=0, device="cpu"):
    """(proj, w_hh, w_hm, h0, c0, lengths, (grad_output, grad_c_n, grad_cell_states)) for [T, B, H].

    With ``ragged`` the lengths are unsorted in [0, T] with the full length present and, for B > 2,
    an empty row. h0 is rounded to ``dtype`` (the backends read it in the activation dtype), so the
    float64 truth sees the same value."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(device)

    proj = randn(T, B, 5 * H).to(dtype)
    w_hh = randn(4 * H, H, scale=H ** -0.5).to(dtype)
    w_hm = randn(H, H, scale=H ** -0.5).to(dtype)
    h0 = randn(B, H, scale=0.5).to(dtype).float()
    c0 = randn(B, H)
    lengths = None
    if ragged:
        lens = [(T * (b + 1)) // B for b in range(B)][::-1]
        if B > 2:
            lens[1] = 0
        lengths = torch.tensor(lens, dtype=torch.int64, device=device)
    grads = (randn(T, B, H).to(dtype), randn(B, H), randn(T, B, H))
    return proj, w_hh, w_hm, h0, c0, lengths, grads


def run(backend, proj, w_hh, w_hm, h0, c0, lengths, grads):
    """The backend's forward and backward through the custom ops, as float64 CPU tensors by name."""
    fwd = autograd.sequence_forward(proj, w_hh, w_hm, h0, c0, lengths, backend, True, True)
    bwd = autograd.sequence_backward(*grads, w_hh, w_hm, h0, c0, lengths, fwd[0], fwd[2], fwd[3], backend)
    values = (*fwd[:3], *bwd)
    return {n: v.detach().double().cpu() for n, v in zip(NAMES, values)}


def truth(proj, w_hh, w_hm, h0, c0, lengths, grads):
    """Float64 autograd over the same inputs (tests/mlstm_f64.py), on the CPU; ``grads`` entries may
    be None (no gradient reaches that output)."""
    leaves = [t.detach().double().cpu().requires_grad_() for t in (proj, w_hh, w_hm, h0, c0)]
    out, _, c, cells = recurrence_f64(*leaves, None if lengths is None else lengths.cpu())
    loss = leaves[0].sum() * 0.0  # differentiable even when no gradient reaches anything (or T = 0)
    for value, grad in zip((out, c, cells), grads):
        if grad is not None:
            loss = loss + (value * grad.double().cpu()).sum()
    d = torch.autograd.grad(loss, leaves, allow_unused=True)
    d = [torch.zeros_like(x) if dx is None else dx for x, dx in zip(leaves, d)]
    return dict(zip(NAMES, (out.detach(), c.detach(), cells.detach(), *d)))


def failures(got, ref, expected, dtype):
    """Where ``got`` is more than FACTOR x the reference's error (plus ABS[dtype]) from the truth."""
    out = []
    for name, value in expected.items():
        err_ref, err = rel_err(ref[name], value), rel_err(got[name], value)
        if err > FACTOR * err_ref + ABS[dtype]:
            out.append(f"{name}: error {err:.2e} > {FACTOR} x reference {err_ref:.2e} + {ABS[dtype]:.0e}")
    return out
