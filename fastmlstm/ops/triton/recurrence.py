"""Drives the fused Triton step kernels over time (forward, then backward in reverse time).

Implements the backend contract of :mod:`fastmlstm.ops.common`. The input projections arrive
already computed for all steps (one GEMM by the caller), and the recurrent weight gradients are two
large GEMMs after the loop (:func:`~fastmlstm.ops.common.recurrent_weight_grads`); inside the loop
each step is two fused launches.

Dimension letters: T time, B batch, H hidden.
"""

from __future__ import annotations

import os

import torch
import triton

from ..common import empty_like_none, new_buffer, recurrent_weight_grads
from .fused_step import bwd_h_kernel, bwd_m_kernel, fwd_m_kernel, fwd_z_kernel

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

# Offsets inside the kernels are 32-bit: keep the largest (B * 6H and 4 H^2) below 2^31.
_MAX_OFFSET = 2**31 - 1


def _check_sizes(B: int, H: int) -> None:
    if 4 * H * H > _MAX_OFFSET or 6 * H * B > _MAX_OFFSET:
        raise ValueError(
            f"the triton backend supports 4*H^2 and 6*H*B below 2^31; got H={H}, B={B} "
            "(split the batch, or use backend='reference')"
        )


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype != torch.float32:
        return "ieee"  # ignored for 16-bit operands
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is not None and precision != "none":
        return "tf32" if precision == "tf32" else "ieee"
    return "tf32" if matmul.allow_tf32 else "ieee"


def _launch_config(B: int, H: int, dtype: torch.dtype) -> tuple[tuple[int, int], dict]:
    """Block shapes and the grid for one step; one program owns BB rows x BN hidden units."""
    if INTERPRET:
        # The interpreter runs programs one after another: small tiles keep masks and
        # multi-program paths exercised at the tiny shapes CI uses.
        blocks = dict(BB=16, BN=16, BK=16, num_warps=1)
    else:
        # Memory-bound regime: cover the whole batch (up to 128) in one program so that each weight
        # tile is read from HBM once per step, and split H finely enough to occupy every SM.
        bb = min(128, max(16, triton.next_power_of_2(B)))
        bn = 32 if H >= 1024 else 16
        bk = 32 if dtype == torch.float32 else 64
        blocks = dict(BB=bb, BN=bn, BK=bk, num_warps=8 if bb >= 128 else 4)
    blocks["PRECISION"] = _dot_precision(dtype)
    blocks["INTERPRET_BF16"] = INTERPRET and dtype == torch.bfloat16
    grid = (triton.cdiv(H, blocks["BN"]), triton.cdiv(B, blocks["BB"]))
    return grid, blocks


def forward(proj, weight_hh, weight_hm, h0, c0, lengths, save_for_backward, return_cell_states):
    T, B, H5 = proj.shape
    H = H5 // 5
    _check_sizes(B, H)
    dtype, device = proj.dtype, proj.device
    proj = proj.contiguous()
    weight_hh = weight_hh.contiguous()
    weight_hm = weight_hm.contiguous()
    keep_cells = save_for_backward or return_cell_states

    output = new_buffer((T, B, H), dtype, device)
    cell_states = new_buffer((T, B, H), torch.float32, device) if keep_cells else empty_like_none(c0)
    act = new_buffer((T, B, 6 * H), dtype, device) if save_for_backward else empty_like_none(proj)
    m = new_buffer((B, H), dtype, device)
    # Without stored cell states, c is updated in place: each element is read and rewritten by the
    # one program that owns it.
    c_state = None if keep_cells else c0.float().clone()

    grid, blocks = _launch_config(B, H, dtype)
    has_len = lengths is not None
    p_len = lengths if has_len else output
    h_prev = h0.to(dtype).contiguous()
    c_prev = c0.float().contiguous() if keep_cells else c_state
    for t in range(T):
        act_t = act[t] if save_for_backward else m
        fwd_m_kernel[grid](h_prev, weight_hm, proj[t], m, act_t, B, H, SAVE=save_for_backward, **blocks)
        h_out = output[t]
        c_out = cell_states[t] if keep_cells else c_state
        fwd_z_kernel[grid](m, weight_hh, proj[t], h_prev, c_prev, h_out, c_out, act_t, p_len, t, B, H,
                           SAVE=save_for_backward, HAS_LEN=has_len, **blocks)
        h_prev, c_prev = h_out, c_out
    if keep_cells:
        c_n = cell_states[T - 1].clone() if T > 0 else c0.float().clone()
    else:
        c_n = c_state
    return output, c_n, cell_states, act


def backward(grad_output, grad_c_n, grad_cell_states, weight_hh, weight_hm, h0, c0, lengths,
             output, cell_states, act):
    T, B, H = output.shape
    dtype, device = output.dtype, output.device
    weight_hh = weight_hh.contiguous()
    weight_hm = weight_hm.contiguous()
    grad_proj = new_buffer((T, B, 5 * H), dtype, device)
    grad_hm = new_buffer((T, B, H), dtype, device)
    dh = torch.zeros(B, H, dtype=torch.float32, device=device)
    dc = grad_c_n.float().contiguous().clone() if grad_c_n is not None else torch.zeros_like(dh)
    has_dout = grad_output is not None
    has_dcells = grad_cell_states is not None
    grad_output = grad_output.contiguous() if has_dout else None
    grad_cell_states = grad_cell_states.float().contiguous() if has_dcells else None
    has_len = lengths is not None
    p_len = lengths if has_len else dh
    c0 = c0.float().contiguous()

    grid, blocks = _launch_config(B, H, dtype)
    for t in range(T - 1, -1, -1):
        bwd_h_kernel[grid](
            grad_hm[t + 1] if t < T - 1 else grad_hm[t], weight_hm,
            grad_output[t] if has_dout else dh, dh, dc,
            grad_cell_states[t] if has_dcells else dh,
            act[t], cell_states[t], cell_states[t - 1] if t > 0 else c0, grad_proj[t], p_len, t, B, H,
            HAS_REC=t < T - 1, DO_CELL=True, HAS_DOUT=has_dout, HAS_DCELLS=has_dcells, HAS_LEN=has_len,
            **blocks,
        )
        bwd_m_kernel[grid](grad_proj[t], weight_hh, act[t], grad_hm[t], B, H, **blocks)
    if T > 0:
        # One more launch at t = -1 turns dhm_0 into the gradient of h0 (left in dh).
        bwd_h_kernel[grid](
            grad_hm[0], weight_hm, dh, dh, dc, dh, dh, dh, dh, dh, p_len, -1, B, H,
            HAS_REC=True, DO_CELL=False, HAS_DOUT=False, HAS_DCELLS=False, HAS_LEN=has_len, **blocks,
        )
    grad_weight_hh, grad_weight_hm = recurrent_weight_grads(grad_proj, grad_hm, act, output, h0)
    return grad_proj, grad_weight_hh, grad_weight_hm, dh, dc
