"""Host side of the persistent kernels: the backend contract of :mod:`fastmlstm.ops.interface`
(``forward``/``backward``) for a design, the buffers the kernels read and write, one launch per
call, and the error word checked after it.

The same buffers feed the CPU executor (:mod:`.executor`), which CI runs in place of the launch:
so the buffer layout and the result assembly below are tested on every machine, the kernels
themselves only on a GPU (``bench/kernels/gpu_check.sh`` and the dispatcher's first-use check).

Dimension letters: T steps, B rows, H units (legend of :mod:`.schedule` for the rest).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Optional

import torch

from ..configs import FP_FUSION, Device
from ...interface import empty_like_none, new_buffer, recurrent_weight_grads, row_major_lengths
from . import schedule as _schedule

# Longest any single wait of a launch may take before the launch gives up (a step's wait is
# normally microseconds; a GPU that cannot hold every cluster at once never releases it).
WAIT_TIMEOUT_NS = 1_000_000_000


@dataclasses.dataclass
class ForwardBuffers:
    """h [T+1, B, H] (h[0] = h0; the output is h[1:]), c [c_mod, B, H] float32 (c[0] = c0; c_t in
    c[(t+1) % c_mod]), m [B, H], act [T, B, 6H] (with save)."""

    proj: torch.Tensor
    w_hh: torch.Tensor
    w_hm: torch.Tensor
    h: torch.Tensor
    c: torch.Tensor
    c_mod: int
    m: torch.Tensor
    act: Optional[torch.Tensor]
    lengths: Optional[torch.Tensor]
    save: bool
    T: int
    B: int
    H: int


@dataclasses.dataclass
class BackwardBuffers:
    """ghm [T+1, B, H] (ghm[t] = dhm_t, ghm[T] = 0), grad_proj [T, B, 5H], dh and dc [B, H]
    float32 (the carried gradients, the gradients of h0 and c0 at the end)."""

    w_hh: torch.Tensor
    w_hm: torch.Tensor
    ghm: torch.Tensor
    grad_proj: torch.Tensor
    dh: torch.Tensor
    dc: torch.Tensor
    dout: Optional[torch.Tensor]
    dcells: Optional[torch.Tensor]
    act: torch.Tensor
    cells: torch.Tensor
    c0: torch.Tensor
    lengths: Optional[torch.Tensor]
    T: int
    B: int
    H: int


Runner = Callable[[_schedule.Schedule, object], None]


def device_info(device: torch.device) -> Device | None:
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return Device(props.multi_processor_count, (props.major, props.minor), props.name)


def _plan(design: str, direction: str, B: int, H: int, dtype: torch.dtype, device: Device | None,
          tiles: dict | None):
    sched = _schedule.plan(design, direction, B, H, torch.finfo(dtype).bits // 8, device, **(tiles or {}))
    if sched is None:
        why = _schedule.applies(B, H, torch.finfo(dtype).bits // 8, device) or (
            "its weights fit neither on chip nor, for the rest, in the L2 it may keep")
        raise ValueError(f"the persistent {design} kernel does not apply to B={B}, H={H}, {dtype}: {why}")
    return sched



def forward(design: str, device: Device | None, runner: Runner, proj, weight_hh, weight_hm, h0, c0, lengths,
            save_for_backward, return_cell_states, *, tiles: dict | None = None):
    """The forward contract through ``design``'s schedule for ``device``, run by ``runner``
    (``tiles``: keyword overrides of :func:`.schedule.plan`, for the CPU tests' small tiles)."""
    T, B, H5 = proj.shape
    H = H5 // 5
    dtype, dev = proj.dtype, proj.device
    lengths = row_major_lengths(lengths)
    keep_cells = save_for_backward or return_cell_states
    h = new_buffer((T + 1, B, H), dtype, dev)
    h[0] = h0.to(dtype)
    c_mod = T + 1 if keep_cells else 2
    c = new_buffer((c_mod, B, H), torch.float32, dev)
    c[0] = c0.float()
    act = new_buffer((T, B, 6 * H), dtype, dev) if save_for_backward else empty_like_none(proj)
    if T > 0:
        bufs = ForwardBuffers(proj=proj.contiguous(), w_hh=weight_hh.contiguous(), w_hm=weight_hm.contiguous(), h=h,
                              c=c, c_mod=c_mod, m=new_buffer((B, H), dtype, dev),
                              act=act if save_for_backward else None, lengths=lengths, save=save_for_backward,
                              T=T, B=B, H=H)
        runner(_plan(design, "forward", B, H, dtype, device, tiles), bufs)
    cell_states = c[1:] if keep_cells else empty_like_none(c0)
    c_n = c[T % c_mod].clone()
    return h[1:], c_n, cell_states, act


def backward(design: str, device: Device | None, runner: Runner, grad_output, grad_c_n, grad_cell_states, weight_hh,
             weight_hm, h0, c0, lengths, output, cell_states, act, *, tiles: dict | None = None):
    """The backward contract through ``design``'s schedule for ``device``, run by ``runner``."""
    T, B, H = output.shape
    dtype, dev = output.dtype, output.device
    lengths = row_major_lengths(lengths)
    grad_proj = new_buffer((T, B, 5 * H), dtype, dev)
    ghm = new_buffer((T + 1, B, H), dtype, dev)
    ghm[T] = 0
    dh = torch.zeros(B, H, dtype=torch.float32, device=dev)
    # (contiguous first: clone() keeps the strides of a transposed gradient, which autograd may pass)
    dc = grad_c_n.float().contiguous().clone() if grad_c_n is not None else torch.zeros_like(dh)
    if T > 0:
        bufs = BackwardBuffers(
            w_hh=weight_hh.contiguous(), w_hm=weight_hm.contiguous(), ghm=ghm, grad_proj=grad_proj, dh=dh, dc=dc,
            dout=grad_output.contiguous() if grad_output is not None else None,
            dcells=grad_cell_states.float().contiguous() if grad_cell_states is not None else None,
            act=act.contiguous(), cells=cell_states.float().contiguous(), c0=c0.float().contiguous(),
            lengths=lengths, T=T, B=B, H=H)
        runner(_plan(design, "backward", B, H, dtype, device, tiles), bufs)
    grad_weight_hh, grad_weight_hm = recurrent_weight_grads(grad_proj, ghm[:T], act, output, h0)
    return grad_proj, grad_weight_hh, grad_weight_hm, dh, dc


def error_message(sched: _schedule.Schedule, code: int, T: int) -> str:
    """The RuntimeError the host raises for the kernels' error word (phase instance code - 1)."""
    from .executor import describe

    return (f"fastmlstm persistent {sched.design} kernel ({sched.direction}): a wait at "
            f"{describe(sched, code - 1, T)} ran out of time ({WAIT_TIMEOUT_NS / 1e9:g} s); its results are "
            f"invalid. Can this GPU hold all {sched.clusters} clusters of {sched.cluster} CTAs at once? "
            "Set FASTMLSTM_KERNEL=step to use the per-step kernels")


# ------------------------------------------------------------------------------------ the launch

def _tables(sched: _schedule.Schedule, device: torch.device) -> dict:
    table, counts = sched.item_table()
    groups = [-(-p.m_tiles // sched.cluster) for p in sched.phases]
    return {"p_table": torch.tensor(table, dtype=torch.int32, device=device).contiguous(),
            "p_counts": torch.tensor(counts, dtype=torch.int32, device=device).contiguous(),
            "tile_base1": groups[0] * sched.cluster, "n_tickets": sum(groups) * sched.cluster}


def _common(sched: _schedule.Schedule, B: int, instances: int, device: torch.device) -> tuple[dict, torch.Tensor]:
    """The workspace, the flags and the item table, and the error word."""
    tables = _tables(sched, device)
    err = torch.zeros(1, dtype=torch.int32, device=device)
    args = {"p_ws": torch.empty(max(1, sched.slots) * B * sched.cluster * sched.block_m, dtype=torch.float32,
                                device=device),
            "p_tickets": torch.zeros(tables["n_tickets"], dtype=torch.int32, device=device),
            "p_sync": torch.zeros(instances, dtype=torch.int32, device=device), "p_err": err,
            "p_table": tables["p_table"], "p_counts": tables["p_counts"]}
    ints = {"n_clusters": sched.clusters, "n_ctas": sched.ctas, "tile_base1": tables["tile_base1"],
            "max_items": sched.max_items(), "timeout_ns": WAIT_TIMEOUT_NS}
    return {**args, **ints}, err


def _descriptor(tensor, shape, strides, direction, sched, key):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from .targets import layouts

    dtype = {torch.bfloat16: "bf16", torch.float16: "fp16"}[tensor.dtype]
    block, layout = layouts(direction, sched.cluster, sched.block_k, sched.block_b, dtype, sched.block_m)[key]
    return TensorDescriptor(tensor, list(shape), list(strides), block, layout)


def _guard(device: torch.device):
    """Triton launches on the current CUDA device: make the tensors' device current."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _lengths(lengths, device):
    # Without lengths the kernels never read it; an int64 stand-in keeps the compiled variant.
    return lengths if lengths is not None else torch.zeros(1, dtype=torch.int64, device=device)


def _launch(kernel, sched: _schedule.Schedule, args: dict, err: torch.Tensor, T: int) -> None:
    from .targets import NUM_WARPS, constexprs

    const = constexprs(sched, heaviest=False)
    const.update({k: args.pop(k) for k in list(args) if k in const})
    kernel[(sched.clusters,)](**args, **const, num_warps=NUM_WARPS, num_ctas=sched.cluster,
                                enable_fp_fusion=FP_FUSION)
    code = int(err.item())  # waits for the launch: the results are not used before this check
    if code:
        raise RuntimeError(error_message(sched, code, T))


def gpu_forward(sched: _schedule.Schedule, b: ForwardBuffers) -> None:
    """Launch the forward kernel on ``b`` (CUDA tensors)."""
    from .gluon_forward import forward_kernel

    T, B, H, dev = b.T, b.B, b.H, b.proj.device
    args, err = _common(sched, B, 2 * T, dev)
    args.update(
        w0_desc=_descriptor(b.w_hm, (H, H), (H, 1), "forward", sched, "w0"),
        w1_desc=_descriptor(b.w_hh, (4 * H, H), (H, 1), "forward", sched, "w1"),
        h_desc=_descriptor(b.h, ((T + 1) * B, H), (H, 1), "forward", sched, "a"),
        m_desc=_descriptor(b.m, (B, H), (H, 1), "forward", sched, "a"),
        p_proj=b.proj, p_h=b.h, p_c=b.c, p_act=b.act if b.act is not None else b.h, p_m=b.m,
        p_len=_lengths(b.lengths, dev), T=T, B=B, H=H, c_mod=b.c_mod,
        SAVE=b.save, HAS_LEN=b.lengths is not None)
    with _guard(dev):
        _launch(forward_kernel, sched, args, err, T)


def gpu_backward(sched: _schedule.Schedule, b: BackwardBuffers) -> None:
    """Launch the backward kernel on ``b`` (CUDA tensors)."""
    from .gluon_backward import backward_kernel

    T, B, H, dev = b.T, b.B, b.H, b.grad_proj.device
    args, err = _common(sched, B, 2 * T + 1, dev)
    args.update(
        w0_desc=_descriptor(b.w_hm, (H, H), (H, 1), "backward", sched, "w0"),
        w1_desc=_descriptor(b.w_hh, (4 * H, H), (H, 1), "backward", sched, "w1"),
        dhm_desc=_descriptor(b.ghm, ((T + 1) * B, H), (H, 1), "backward", sched, "a"),
        # dz_t is the first 4H columns of grad_proj's rows: the box never reaches the dxm columns.
        dz_desc=_descriptor(b.grad_proj, (T * B, 4 * H), (5 * H, 1), "backward", sched, "a"),
        p_dout=b.dout if b.dout is not None else b.ghm, p_dh=b.dh, p_dc=b.dc,
        p_dcells=b.dcells if b.dcells is not None else b.dh, p_act=b.act, p_cells=b.cells, p_c0=b.c0,
        p_dproj=b.grad_proj, p_ghm=b.ghm, p_len=_lengths(b.lengths, dev),
        T=T, B=B, H=H, HAS_DOUT=b.dout is not None, HAS_DCELLS=b.dcells is not None,
        HAS_LEN=b.lengths is not None)
    with _guard(dev):
        _launch(backward_kernel, sched, args, err, T)
