"""Drives the fused Triton step kernels over time (forward, then backward in reverse time).

Implements the backend contract of :mod:`fastmlstm.ops.interface`. The input projections arrive
already computed for all steps (one GEMM by the caller), and the recurrent weight gradients are two
large GEMMs after the loop (:func:`~fastmlstm.ops.interface.recurrent_weight_grads`); inside the loop
each step is two fused launches, configured once per call by :func:`.configs.plan`.

Dimension letters: T time, B batch, H hidden, S splits of a kernel's reduction (split-K).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import torch

from ..interface import empty_like_none, new_buffer, recurrent_weight_grads, row_major_lengths
from . import configs as _configs
from .fused_step import HAS_GDC, bwd_h_kernel, bwd_m_kernel, fwd_m_kernel, fwd_z_kernel

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

# Offsets inside the kernels are 32-bit: keep the largest (B * 6H and 4 H^2) below 2^31. The
# split-K workspace is addressed per split in 64 bits, each split's [B, 4H] slab in 32.
_MAX_OFFSET = 2**31 - 1
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


# CUDA grids allow 65535 blocks along their second and third axes (hidden and batch tiles).
_MAX_BATCH = 65535 * 16


def _check_sizes(B: int, H: int) -> None:
    if 4 * H * H > _MAX_OFFSET or 6 * H * B > _MAX_OFFSET:
        raise ValueError(
            f"the triton backend supports 4*H^2 and 6*H*B below 2^31; got H={H}, B={B} "
            "(split the batch, or use backend='reference')"
        )
    if B > _MAX_BATCH:
        raise ValueError(f"the triton backend supports at most {_MAX_BATCH} rows per call (65535 batch tiles); "
                         f"got B={B} (split the batch, or use backend='reference')")


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype != torch.float32:
        return "ieee"  # ignored for 16-bit operands
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is not None and precision != "none":
        return "tf32" if precision == "tf32" else "ieee"
    return "tf32" if matmul.allow_tf32 else "ieee"


def _device_info(device: torch.device) -> _configs.Device | None:
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return _configs.Device(props.multi_processor_count, (props.major, props.minor), props.name)


def _guard(device: torch.device):
    """Make ``device`` current while launching: Triton launches on the current CUDA device and
    stream, so tensors on cuda:1 with cuda:0 current would otherwise run on the wrong GPU."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _check_devices(where: str, device: torch.device, **tensors) -> None:
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != device:
            raise ValueError(f"fastmlstm triton backend ({where}): {name} is on {tensor.device} but the recurrence "
                             f"runs on {device}; every tensor must be on that device")



class _Launcher:
    """One call's kernel configs, split-K workspace and tickets, and the launch of each kernel."""

    def __init__(self, B: int, H: int, dtype: torch.dtype, device: torch.device):
        self.B, self.H = B, H
        info = _device_info(device)
        self.plan = _configs.plan(B, H, _DTYPE_NAMES[dtype], _dot_precision(dtype), info, INTERPRET)
        self.pdl_ok = info is not None and info.capability >= (9, 0) and HAS_GDC
        self.common = {"PRECISION": _dot_precision(dtype),
                       "INTERPRET_BF16": INTERPRET and dtype == torch.bfloat16}
        # The partials of the widest split launch (float32; [S, B, 4H] for the gate kernel), and one
        # ticket per output tile of each kernel. Tickets start at 0 and the last program of each
        # tile puts its ticket back to 0, so one zeroed buffer serves every step of the call.
        width = {"fwd_m": H, "fwd_z": 4 * H, "bwd_h": H, "bwd_m": H}
        ws_elems = max([self.plan[k].split * B * width[k] for k in _configs.KERNELS
                        if _configs.uses_workspace(k, self.plan[k])] or [0])
        self.ws = torch.empty(ws_elems, dtype=torch.float32, device=device)
        n_tiles = {k: _configs.tiles(k, B, H, self.plan[k]) for k in _configs.KERNELS}
        self.ticket_offset, total = {}, 0
        for k in _configs.KERNELS:
            self.ticket_offset[k] = total
            total += n_tiles[k][0] * n_tiles[k][1]
        self.tickets = torch.zeros(max(total, 1), dtype=torch.int32, device=device)
        self.n_tiles = n_tiles
        # Everything a launch needs besides its tensors, worked out once per call: a step launches
        # two kernels, and at H = 1024 the host's time per launch is a term of the step's cost
        # (bench/kernels/costmodel.py's cpu_launch_us; bench/kernels/launch_overhead.py measures this side of it).
        self._launches = {(k, split): self._launch_params(k, split)
                          for k in _configs.KERNELS for split in (True, False)}

    def _launch_params(self, kernel_name: str, split: bool) -> tuple:
        config = self.plan[kernel_name]
        n_split = config.split if split else 1
        grid = (n_split, *self.n_tiles[kernel_name])
        use_pdl = config.pdl and self.pdl_ok
        launched = dataclasses.replace(config, split=n_split)
        keywords = {"BB": config.BB, "BN": config.BN, "BK": config.BK, "USE_PDL": use_pdl, **self.common,
                    "SPLIT": _configs.uses_workspace(kernel_name, launched),
                    "GATHER": _configs.gather_unroll(kernel_name, launched),
                    "num_warps": config.num_warps, "num_stages": config.num_stages,
                    "enable_fp_fusion": _configs.FP_FUSION}
        if kernel_name == "bwd_h":
            keywords["EPI_BN"] = _configs.epilogue_width(kernel_name, launched)
        if use_pdl:
            keywords["launch_pdl"] = True
        tail = (self.ws, self.tickets[self.ticket_offset[kernel_name]:], n_split)
        return grid, tail, keywords

    def bind(self, kernel_name: str, kernel, split: bool = True, **constexprs):
        """``kernel`` configured by this call's plan, with ``constexprs``: a function that launches
        it on its runtime arguments (the workspace, its tickets and the split count appended)."""
        grid, tail, keywords = self._launches[(kernel_name, split)]
        launch = kernel[grid]
        keywords = {**keywords, **constexprs}

        def run(*args):
            launch(*args, *tail, **keywords)

        return run


def forward(proj, weight_hh, weight_hm, h0, c0, lengths, save_for_backward, return_cell_states):
    T, B, H5 = proj.shape
    H = H5 // 5
    _check_sizes(B, H)
    dtype, device = proj.dtype, proj.device
    _check_devices("forward", device, weight_hh=weight_hh, weight_hm=weight_hm, h0=h0, c0=c0, lengths=lengths)
    lengths = row_major_lengths(lengths)
    with _guard(device):
        return _forward(proj, weight_hh, weight_hm, h0, c0, lengths, save_for_backward, return_cell_states,
                        T, B, H, dtype, device)


def _forward(proj, weight_hh, weight_hm, h0, c0, lengths, save_for_backward, return_cell_states, T, B, H, dtype,
             device):
    proj = proj.contiguous()
    weight_hh = weight_hh.contiguous()
    weight_hm = weight_hm.contiguous()
    keep_cells = save_for_backward or return_cell_states

    output = new_buffer((T, B, H), dtype, device)
    cell_states = new_buffer((T, B, H), torch.float32, device) if keep_cells else empty_like_none(c0)
    act = new_buffer((T, B, 6 * H), dtype, device) if save_for_backward else empty_like_none(proj)
    m = new_buffer((B, H), dtype, device)
    # Without stored cell states, c is updated in place: each element is read and rewritten by the
    # one program that runs its tile's epilogue.
    # (contiguous first: clone() keeps a transposed c0's strides, and the kernels index it row-major)
    c_state = None if keep_cells else c0.float().contiguous().clone()

    launcher = _Launcher(B, H, dtype, device)
    has_len = lengths is not None
    fwd_m = launcher.bind("fwd_m", fwd_m_kernel, SAVE=save_for_backward)
    fwd_z = launcher.bind("fwd_z", fwd_z_kernel, SAVE=save_for_backward, HAS_LEN=has_len)
    p_len = lengths if has_len else output
    h_prev = h0.to(dtype).contiguous()
    c_prev = c0.float().contiguous() if keep_cells else c_state
    # Each step's views, made up front: indexing a tensor costs microseconds of host time per step.
    proj_t, h_t = proj.unbind(0), output.unbind(0)
    act_t = act.unbind(0) if save_for_backward else [m] * T
    c_t = cell_states.unbind(0) if keep_cells else [c_state] * T
    for t in range(T):
        fwd_m(h_prev, weight_hm, proj_t[t], m, act_t[t], B, H)
        fwd_z(m, weight_hh, proj_t[t], h_prev, c_prev, h_t[t], c_t[t], act_t[t], p_len, t, B, H)
        h_prev, c_prev = h_t[t], c_t[t]
    if keep_cells:
        c_n = cell_states[T - 1].clone() if T > 0 else c0.float().clone()
    else:
        c_n = c_state
    return output, c_n, cell_states, act


def backward(grad_output, grad_c_n, grad_cell_states, weight_hh, weight_hm, h0, c0, lengths,
             output, cell_states, act):
    T, B, H = output.shape
    _check_sizes(B, H)
    device = output.device
    _check_devices("backward", device, grad_output=grad_output, grad_c_n=grad_c_n,
                   grad_cell_states=grad_cell_states, weight_hh=weight_hh, weight_hm=weight_hm, h0=h0, c0=c0,
                   lengths=lengths, cell_states=cell_states, act=act)
    lengths = row_major_lengths(lengths)
    with _guard(device):
        return _backward(grad_output, grad_c_n, grad_cell_states, weight_hh, weight_hm, h0, c0, lengths, output,
                         cell_states, act, T, B, H, device)


def _backward(grad_output, grad_c_n, grad_cell_states, weight_hh, weight_hm, h0, c0, lengths, output, cell_states,
              act, T, B, H, device):
    dtype = output.dtype
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

    launcher = _Launcher(B, H, dtype, device)
    flags = {"DO_CELL": True, "HAS_DOUT": has_dout, "HAS_DCELLS": has_dcells, "HAS_LEN": has_len}
    # At t = T-1 nothing comes from the future: no product, so one split.
    bwd_h_last = launcher.bind("bwd_h", bwd_h_kernel, split=False, HAS_REC=False, **flags)
    bwd_h = launcher.bind("bwd_h", bwd_h_kernel, HAS_REC=True, **flags)
    bwd_m = launcher.bind("bwd_m", bwd_m_kernel)
    # Each step's views, made up front (host time per step, as in the forward).
    dhm_t, dproj_t, act_t, c_t = grad_hm.unbind(0), grad_proj.unbind(0), act.unbind(0), cell_states.unbind(0)
    dout_t = grad_output.unbind(0) if has_dout else [dh] * T
    dcells_t = grad_cell_states.unbind(0) if has_dcells else [dh] * T
    for t in range(T - 1, -1, -1):
        step = bwd_h if t < T - 1 else bwd_h_last
        step(dhm_t[min(t + 1, T - 1)], weight_hm, dout_t[t], dh, dc, dcells_t[t], act_t[t], c_t[t],
             c_t[t - 1] if t > 0 else c0, dproj_t[t], p_len, t, B, H)
        bwd_m(dproj_t[t], weight_hh, act_t[t], dhm_t[t], B, H)
    if T > 0:
        # One more launch at t = -1 turns dhm_0 into the gradient of h0 (left in dh).
        launcher.bind("bwd_h", bwd_h_kernel, HAS_REC=True, DO_CELL=False, HAS_DOUT=False, HAS_DCELLS=False,
                      HAS_LEN=has_len)(dhm_t[0], weight_hm, dh, dh, dc, dh, dh, dh, dh, dh, p_len, -1, B, H)
    grad_weight_hh, grad_weight_hm = recurrent_weight_grads(grad_proj, grad_hm, act, output, h0)
    return grad_proj, grad_weight_hh, grad_weight_hm, dh, dc
