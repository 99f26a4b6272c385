"""Reference recurrence: a plain PyTorch loop over time with explicit forward and backward.

It is the fallback (CPUs where the C++ extension of the ``cpu`` backend cannot be built, GPUs
without Triton or the CUDA extension, other devices) and the specification the fused kernels are
tested against: it follows the same numerics (activations stored in the weight
dtype, float32 arithmetic and float32 cell state) and the same saved-tensor contract
(:mod:`fastmlstm.ops.common`).

Dimension letters: T time, B batch, H hidden, G = 4 gates (i, f, o, u).
"""

from __future__ import annotations

import functools
import logging
import weakref

import torch

from .common import GATES, empty_like_none, new_buffer, recurrent_weight_grads

__all__ = ["forward", "backward", "is_available"]

logger = logging.getLogger("fastmlstm")


def is_available() -> tuple[bool, str]:
    return True, ""


# Values derived from a weight (its float32 copy, its oneDNN layout), kept while the weight tensor
# lives unchanged: a generation loop that reuses one set of effective weights converts them once,
# not once per byte.
_DERIVED: dict[tuple[int, object], tuple[weakref.ref, int, torch.Tensor]] = {}


def _derived(weight: torch.Tensor, kind, make):
    key = (id(weight), kind)
    hit = _DERIVED.get(key)
    if hit is not None and hit[0]() is weight and hit[1] == weight._version:
        return hit[2]
    value = make(weight)
    _DERIVED[key] = (weakref.ref(weight, lambda _, key=key: _DERIVED.pop(key, None)), weight._version, value)
    return value


@functools.lru_cache(maxsize=None)
def _onednn_prepacking_works() -> bool:
    """Whether this PyTorch build can prepack a linear weight with oneDNN (x86 builds can), checked
    numerically once; anything else uses a plain mm."""
    try:
        x, w = torch.randn(8, 24), torch.randn(40, 24)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 8)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        ok = torch.allclose(y, x.mm(w.t()), rtol=1e-4, atol=1e-4)
    except Exception:  # ops absent from this build
        ok = False
    if not ok:
        logger.debug("fastmlstm: oneDNN weight prepacking unavailable; the reference loop uses plain mm")
    return ok


def _step_matmul(weight: torch.Tensor, rows: int):
    """``x -> x @ weight^T`` in float32 for a weight [out, in] reused at every time step.

    With oneDNN (x86 builds of PyTorch) a large enough weight is reordered once into oneDNN's blocked
    layout so that each step's small-batch GEMM does not repack it (1.2x to 1.4x faster per step at
    B = 16 from H = 512 up, measured on a 2-core EPYC; what torch.nn.LSTM's oneDNN path does). Below
    the threshold oneDNN's fixed cost per call (~15-20 us) outweighs the gain. The choice depends on
    the weight's shape and the batch, never on T, so a sequence run in chunks rounds exactly as in
    one call.
    """
    w32 = weight if weight.dtype == torch.float32 else _derived(weight, "float32", lambda w: w.float())
    size = weight.numel()
    large = size >= 2**19 or (size >= 2**18 and rows >= 8)
    if large and weight.device.type == "cpu" and _onednn_prepacking_works():
        packed = _derived(weight, ("onednn", rows),
                          lambda w: torch.ops.mkldnn._reorder_linear_weight(w32.contiguous(), rows))
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    w32_t = w32.t()
    return lambda x: x.mm(w32_t)


def forward(proj, weight_hh, weight_hm, h0, c0, lengths, save_for_backward, return_cell_states):
    T, B, H5 = proj.shape
    H = H5 // 5
    dtype, device = proj.dtype, proj.device
    keep_cells = save_for_backward or return_cell_states
    output = new_buffer((T, B, H), dtype, device)
    cell_states = new_buffer((T, B, H), torch.float32, device) if keep_cells else empty_like_none(c0)
    act = new_buffer((T, B, 6 * H), dtype, device) if save_for_backward else empty_like_none(proj)

    G = GATES * H
    hm_of = _step_matmul(weight_hm, B)  # h -> h Wmh^T
    z_of = _step_matmul(weight_hh, B)  # m -> m Wh^T
    h = h0.to(dtype)
    c = c0.float()
    for t in range(T):
        x_t = proj[t]
        xm = x_t[:, G:]
        hm = hm_of(h.float())
        m = (hm * xm).to(dtype)
        z = z_of(m.float()).add_(x_t[:, :G])
        z[:, : 3 * H].sigmoid_()
        z[:, 3 * H :].tanh_()
        i, f, o, u = z.split(H, dim=1)
        c_new = torch.addcmul(f * c, i, u)
        h_new = (o * torch.tanh(c_new)).to(dtype)
        if lengths is not None:
            active = (t < lengths).unsqueeze(1)
            c_new = torch.where(active, c_new, c)
            h_new = torch.where(active, h_new, h)
        output[t] = h_new
        if keep_cells:
            cell_states[t] = c_new
        if save_for_backward:
            act[t, :, :G] = z
            act[t, :, G : 5 * H] = xm
            act[t, :, 5 * H :] = hm
        h, c = h_new, c_new
    return output, c.clone() if c is c0 else c, cell_states, act


def backward(grad_output, grad_c_n, grad_cell_states, weight_hh, weight_hm, h0, c0, lengths,
             output, cell_states, act):
    T, B, H = output.shape
    dtype, device = output.dtype, output.device
    grad_proj = new_buffer((T, B, 5 * H), dtype, device)
    grad_hm = new_buffer((T, B, H), dtype, device)
    rec_of = _step_matmul(weight_hm.t(), B)  # dhm -> dhm Wmh
    dm_of = _step_matmul(weight_hh.t(), B)  # dz -> dz Wh

    # dh carries the full gradient reaching h_t; it only crosses a step on its own where the row was
    # padding (h_{t+1} = h_t), otherwise it flows through d hm_{t+1} Wmh.
    dh = torch.zeros(B, H, dtype=torch.float32, device=device)
    dc = grad_c_n.float().clone() if grad_c_n is not None else torch.zeros_like(dh)
    for t in range(T - 1, -1, -1):
        if t < T - 1:
            rec = rec_of(grad_hm[t + 1].float())
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
        dm = dm_of(dz.float())
        xm = act[t, :, GATES * H : 5 * H].float()
        hm = act[t, :, 5 * H :].float()
        grad_proj[t, :, GATES * H :] = dm * hm
        grad_hm[t] = dm * xm
    if T > 0:
        grad_h0 = rec_of(grad_hm[0].float())
        if lengths is not None:
            grad_h0 = grad_h0 + torch.where((0 < lengths).unsqueeze(1), 0.0, dh)
    else:
        grad_h0 = torch.zeros(B, H, dtype=torch.float32, device=device)
    grad_weight_hh, grad_weight_hm = recurrent_weight_grads(grad_proj, grad_hm, act, output, h0)
    return grad_proj, grad_weight_hh, grad_weight_hm, grad_h0, dc
